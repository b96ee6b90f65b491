"""Clients on connections kept alive through a drain: THREADS threads, each with its own httpx.Client, loop over
/nli, /v1/completions and /health on a server at PORT; SIGTERM goes to PID after 3 s. Prints the outcomes counted
(statuses, ConnectError: a connection refused, so nothing was taken) and the requests lost without a reply (any other
error), with the seconds after SIGTERM they were sent (a review's script, tidied).
    python docs/results/drain_keepalive/keep_alive_clients.py PORT PID THREADS
"""
import collections
import os
import signal
import sys
import threading
import time

import httpx

port, pid, threads = (int(arg) for arg in sys.argv[1:4])
url = f"http://127.0.0.1:{port}"
BODIES = [("/nli", {"premise": "A man is playing guitar.", "hypothesis": "A man plays music."}),
          ("/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 2}), ("/health", None)]
counts, lost, signalled = collections.Counter(), [], []


def client(first: int) -> None:
    refused = 0
    with httpx.Client(timeout=60) as http:
        for k in range(first, first + 100_000):
            path, body = BODIES[k % len(BODIES)]
            sent = time.monotonic()
            try:
                reply = http.post(url + path, json=body) if body else http.get(url + path)
                counts[str(reply.status_code)] += 1
            except httpx.ConnectError:
                counts["ConnectError"] += 1
                refused += 1
                if refused > 3:
                    return
                time.sleep(0.05)
            except httpx.HTTPError as exc:
                counts[type(exc).__name__] += 1
                lost.append((path, type(exc).__name__, round(sent - (signalled or [sent])[0], 3)))


workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
for worker in workers:
    worker.start()
time.sleep(3)
signalled.append(time.monotonic())
os.kill(pid, signal.SIGTERM)
for worker in workers:
    worker.join(90)
print(dict(counts), "lost:", len(lost), lost[:6])

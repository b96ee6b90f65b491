"""SIGTERM under load loses no admitted request: `loraswap serve` on a tiny Llama, 16 clients sending completions
back to back (three adapters and the bare base, batches of 4, so most wait in the queue), the signal in the middle.
Every request the server took is answered whole and right (the greedy answer it gives alone); after the signal
the server refuses new ones with a 503 (draining) until it stops listening, then exits with status 0. A client
stops at its first refusal, as a client that retries elsewhere would. Each client opens a connection per request:
a kept-alive connection the server closes at shutdown would leave a request unsent and unanswered alike."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.e2e.test_live_server import free_port
from tests.server_helpers import copy_adapters, wait_ready

CLIENTS, MODELS, TOKENS = 16, ("one", "two", "base"), 48


def completion(url: str, i: int) -> httpx.Response:
    """Completion ``i`` (greedy, its own prompt and model), on a connection of its own."""
    body = {"model": MODELS[i % len(MODELS)], "prompt": f"Story {i % 8}:", "max_tokens": TOKENS, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def client(url: str, first: int, answers: dict, outcomes: list, stop: threading.Event) -> None:
    """Send completions one after another until refused or stopped; note each: (sent, ended, i, outcome)."""
    i = first
    while not stop.is_set():
        sent = time.monotonic()
        try:
            reply = completion(url, i)
        except httpx.ConnectError:  # the server no longer listens: nothing was taken
            outcomes.append((sent, time.monotonic(), i, "not taken"))
            return
        except httpx.HTTPError as exc:  # taken, then dropped: a lost request
            outcomes.append((sent, time.monotonic(), i, f"lost: {type(exc).__name__}"))
            return
        if reply.status_code == 503:
            outcomes.append((sent, time.monotonic(), i, "refused"))
            return
        right = reply.status_code == 200 and reply.json()["choices"][0]["text"] == answers[i % 8, MODELS[i % 3]]
        outcomes.append((sent, time.monotonic(), i, "right" if right else f"wrong: {reply.status_code} {reply.text}"))
        i += CLIENTS


def test_sigterm_under_load_answers_every_request_it_took(tiny_llama_dir, llama_adapters, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service.cli.main", "serve", "--base-model", str(tiny_llama_dir),
               "--adapters-dir", str(copy_adapters(llama_adapters, tmp_path / "adapters")), "--port", str(port),
               "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--qa-adapter", "one", "--nli-adapter", "two",
               "--max-batch", "4", "--max-new-tokens", str(TOKENS), "--drain-seconds", "2"]
    with open(tmp_path / "server.log", "w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(lambda path: httpx.get(url + path), timeout=120)
            answers = {(i % 8, MODELS[i % 3]): completion(url, i).json()["choices"][0]["text"] for i in range(24)}
            outcomes, stop = [], threading.Event()
            with ThreadPoolExecutor(CLIENTS) as pool:
                for first in range(CLIENTS):
                    pool.submit(client, url, first, answers, outcomes, stop)
                served_some = time.monotonic() + 60  # a slow host may take seconds over the first batches
                while not any(outcome == "right" for *_, outcome in outcomes) and time.monotonic() < served_some:
                    time.sleep(0.1)
                time.sleep(1)
                process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                assert process.wait(timeout=60) == 0
                stop.set()
        finally:
            if process.poll() is None:
                process.kill()
            log.seek(0)
            print(log.read()[-3000:])  # shown when the test fails
    kinds = {outcome.split(":")[0] for *_, outcome in outcomes}
    assert kinds <= {"right", "refused", "not taken"}, [o for o in outcomes if o[3].startswith(("lost", "wrong"))]
    in_flight = [o for o in outcomes if o[0] < signalled < o[1] and o[3] != "refused"]
    assert len(in_flight) >= CLIENTS // 2, f"only {len(in_flight)} requests were out at the signal: no load"
    assert all(outcome == "right" for *_, outcome in in_flight)
    assert sum(outcome == "right" for *_, outcome in outcomes) > len(in_flight)  # served before the signal too

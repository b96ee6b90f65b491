"""SIGTERM under load loses no admitted request: `loraswap serve` on a tiny Llama, 16 clients sending completions
back to back (three adapters and the bare base, batches of 4, so most wait in the queue), the signal in the middle.
Every request the server took is answered whole and right (the greedy answer it gives alone); after the signal
the server refuses new ones with a 503 (draining) until it stops listening, then exits with status 0. A client
stops at its first refusal, as a client that retries elsewhere would. Each client opens a connection per request:
a kept-alive connection the server closes at shutdown would leave a request unsent and unanswered alike. Chat
requests queued behind a hostile template's renders do not hold the shutdown: those not begun fail at once."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from service.tasks.template_sandbox import MAX_RENDER_SECONDS, STARVED_FACTOR
from tests.e2e.test_live_server import free_port
from tests.server_helpers import copy_adapters, scrape, value, wait_ready, wait_until
from tests.unit.test_template_sandbox import ENDLESS

CLIENTS, MODELS, TOKENS = 16, ("one", "two", "base"), 48
BACKLOG = 12  # chat requests to an adapter whose template runs to the render deadline


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


def serve_command(tiny_llama_dir, adapters, tmp_path, port: int, drain_seconds: float) -> list[str]:
    """``loraswap serve`` of the tiny Llama with ``adapters`` (a folder) on ``port``. A request may wait in its queue
    for as long as the test runs (a CI run on a busy host: one of 16 clients waited past the default 30 s, a 429)."""
    return [sys.executable, "-m", "service.cli.entry", "serve", "--base-model", str(tiny_llama_dir),
            "--adapters-dir", str(adapters), "--port", str(port), "--cache-dir", str(tmp_path / "cache"), "--device",
            "cpu", "--qa-adapter", "one", "--nli-adapter", "two", "--max-batch", "4", "--max-new-tokens", str(TOKENS),
            "--drain-seconds", str(drain_seconds), "--max-queue-wait", "600"]


def test_sigterm_under_load_answers_every_request_it_took(tiny_llama_dir, llama_adapters, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = serve_command(tiny_llama_dir, copy_adapters(llama_adapters, tmp_path / "adapters"), tmp_path, port, 2)
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


def test_sigterm_fails_the_renders_queued_behind_a_hostile_template_at_once(tiny_llama_dir, llama_adapters, tmp_path):
    """SIGTERM with chat requests queued behind a template that runs to the render deadline (2 s a render, one at a
    time once it is known for it): the renders not begun when the server stops listening fail at once with a 503
    saying it shuts down, and the server exits in seconds, not after each ran to its deadline (a review: 86 s)."""
    adapters = copy_adapters(llama_adapters, tmp_path / "adapters")
    (adapters / "one" / "chat_template.jinja").write_text(ENDLESS)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    chat = {"model": "one", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with open(tmp_path / "server.log", "w+") as log:
        process = subprocess.Popen(serve_command(tiny_llama_dir, adapters, tmp_path, port, 0.5), stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            wait_ready(lambda path: httpx.get(url + path), timeout=120)
            with ThreadPoolExecutor(BACKLOG) as pool:
                replies = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=chat, timeout=300)
                           for _ in range(BACKLOG)]
                with httpx.Client(base_url=url) as http:
                    wait_until(lambda: value(scrape(http), "loraswap_requests_in_flight") >= BACKLOG,
                               "the chat requests to arrive", timeout=30)
                process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                assert process.wait(timeout=120) == 0
                exited = time.monotonic() - signalled
                statuses = [reply.result().status_code for reply in replies]
        finally:
            if process.poll() is None:
                process.kill()
            log.seek(0)
            print(log.read()[-3000:])  # shown when the test fails
    print(f"exited {exited:.1f} s after SIGTERM; replies {sorted(statuses)}")
    # a render running when the server stops listening ends as it would: at its deadline (a 422), or past its wall
    # time (a 503 too, but not "shutting down") when a busy machine starved it of the CPU
    texts = [reply.result().text for reply in replies]
    shut_out = sum(status == 503 and "shutting down" in text for status, text in zip(statuses, texts))
    assert set(statuses) <= {422, 503} and shut_out >= BACKLOG // 2, texts
    # the drain, the renders running then (MAX_RENDER_SECONDS of CPU within STARVED_FACTOR times as long on the wall
    # clock), and 20 s for their processes' start and the server's exit (12.4 s in all with both cores kept busy by
    # others, 22.2 s once at a load average of 8; 3.8 to 6.4 s on a quiet machine): the review's server took 86 s;
    # that the queued renders did not run is shown by their 503s above, not by the time
    assert exited < 0.5 + STARVED_FACTOR * MAX_RENDER_SECONDS + 20

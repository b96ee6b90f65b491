"""A second stop (SIGTERM or Ctrl-C) while a command shuts down after the first changes nothing: one line, status 130
(a review: ``eval`` SIGTERMed twice 0.3 s apart ended by the second signal, status 143, hung in the engine's stop
with a lock the second KeyboardInterrupt left held, or aborted, status 134; ``bench`` under ``timeout`` printed a
traceback from ``threading._shutdown``)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.http.server import ACCEPTED_WAIT_S, NEXT_REQUEST_WAIT_S
from tests.data.make_corpus import SQUAD_SAMPLE
from tests.server_helpers import free_port, scrape, value, wait_ready, wait_until
from tests.tiny_models import build_llama
from tests.unit.test_training_refusals import TINY_RUN


def stopped_twice(command: list[str], log, started: callable, second: signal.Signals, gap: float = 0.3) -> int:
    """Run ``command``; once ``started()`` (polled), SIGTERM, then ``second`` ``gap`` seconds later; its exit
    status."""
    process = subprocess.Popen(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.DEVNULL,
                               stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not started() and process.poll() is None:
            assert time.monotonic() < deadline, "the command did not start its work within 120 s"
            time.sleep(0.2)
        time.sleep(1)
        process.send_signal(signal.SIGTERM)
        time.sleep(gap)
        process.send_signal(second)
        return process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_eval_stopped_twice_ends_with_one_line_and_status_130(second, tiny_llama_dir, tmp_path):
    log = tmp_path / "eval.log"
    command = [sys.executable, "-m", "service.cli.entry", "eval", "--task", "squad", "--adapter", "none", "--data",
               str(SQUAD_SAMPLE), "--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path),
               "--device", "cpu", "--json", str(tmp_path / "report.json")]
    with log.open("w") as stderr:
        status = stopped_twice(command, stderr, lambda: "is not registered" in log.read_text(), second)
    err = log.read_text()
    assert status == 130 and err.count("loraswap eval: interrupted\n") == 1, err[-2000:]
    assert "Traceback" not in err and "terminate called" not in err, err[-2000:]
    assert not (tmp_path / "report.json").exists()


def test_train_stopped_twice_ends_with_one_line_and_leaves_no_partial_folder(tiny_gpt2_dir, nli_data,
                                                                             tmp_path):
    out, log = tmp_path / "adapter", tmp_path.parent / f"{tmp_path.name}.log"
    command = [sys.executable, "-m", "service.cli.entry", "train", *TINY_RUN, "--max-steps", "100000", "--base-model",
               str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out)]
    with log.open("w") as stderr:
        status = stopped_twice(command, stderr, lambda: bool(list(tmp_path.glob(".adapter.partial-*"))),
                               signal.SIGTERM)
    err = log.read_text()
    assert status == 130 and err.count("loraswap train: interrupted\n") == 1, err[-2000:]
    assert err.endswith("\nloraswap train: interrupted\n"), err[-2000:]  # not on the line of training's progress bar
    assert "Traceback" not in err and "terminate called" not in err, err[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]  # no adapter, no .partial folder


@pytest.mark.parametrize(("gap", "second"), [(0.05, signal.SIGTERM), (0.3, signal.SIGINT)])
def test_a_ready_server_stopped_twice_ends_once_its_last_line_uvicorn_s(gap, second, tiny_llama_dir, tmp_path):
    """A second stop while the server drains stops it at once (README), and was raised again once it had stopped
    (uvicorn's handler keeps the signals it handled for that): the process then said 'loraswap serve: stopped' after
    uvicorn's 'Finished server process', its documented last line."""
    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "service.cli.entry", "serve", "--base-model", str(tiny_llama_dir),
               "--adapters-dir", str(tmp_path), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
        except httpx.TransportError:
            return False

    with log.open("w") as stderr:
        status = stopped_twice(command, stderr, ready, second, gap)
    err = log.read_text()
    assert status == 0 and err.count("Finished server process") == 1, err[-2000:]
    assert err.splitlines()[-1].startswith("INFO:     Finished server process"), err[-2000:]
    assert "Traceback" not in err and "loraswap serve: stopped" not in err, err[-2000:]


TOKENS = 400  # a completion's tokens: seconds on ``slow_llama_dir`` on the CPU, so that each is in flight at the stop


@pytest.fixture(scope="module")
def slow_llama_dir(tiny_tokenizer_dir, tmp_path_factory):
    """A random Llama of 8 layers of width 256, whose decoding steps take milliseconds: on the 2-layer one of width 64
    the suite's run of c3e14ac finished three completions of TOKENS tokens in the 0.3 s between two stops."""
    return build_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("slow_llama"), layers=8, hidden=256)
FORCED_STOP_REPLY = "the service is shutting down: a forced stop (Ctrl-C) cut the request short"


def streamed(url: str, body: dict, begun: threading.Event) -> str:
    """Stream completion ``body``, ``begun`` set at its first line: 'whole' where it ended with [DONE], 'cut' where
    the server closed the connection before, else what came."""
    lines = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as reply:
            for line in reply.iter_lines():
                lines.append(line)
                begun.set()
    except httpx.RemoteProtocolError:  # 'peer closed connection without sending complete message body'
        return "cut"
    return "whole" if "data: [DONE]" in lines else f"{reply.status_code} {lines[-3:]}"


def replied(reply: httpx.Response) -> str:
    """'whole' for a 200, 'forced' for the forced stop's 503 in the route's error shape, else the reply."""
    if reply.status_code == 200:
        return "whole"
    try:
        body = reply.json()
    except ValueError:  # not JSON (uvicorn's plain-text 500)
        return f"{reply.status_code} {reply.text}"
    message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
    return "forced" if reply.status_code == 503 and message == FORCED_STOP_REPLY else f"{reply.status_code} {body}"


@contextlib.contextmanager
def serving(model_dir: Path, tmp_path: Path, *options: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """A ready ``loraswap serve`` process of ``model_dir`` (at most TOKENS new tokens, ``options`` added; its stderr
    in ``tmp_path``/serve.log) and its port; killed at the end."""
    port = free_port()
    command = [sys.executable, "-m", "service.cli.entry", "serve", "--base-model", str(model_dir),
               "--adapters-dir", str(tmp_path), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
               "--max-new-tokens", str(TOKENS), *options]
    with (tmp_path / "serve.log").open("w") as stderr:
        process = subprocess.Popen(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    try:
        wait_ready(lambda path: httpx.get(f"http://127.0.0.1:{port}{path}"), timeout=120)
        yield process, port
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def serving_a_stream(model_dir: Path, tmp_path: Path, pool: ThreadPoolExecutor, completion: dict, *options: str):
    """A ready server (``serving``) with a stream of ``completion`` begun on ``pool``: (process, its URL, the
    stream's ``streamed`` future)."""
    with serving(model_dir, tmp_path, *options) as (process, port):
        url = f"http://127.0.0.1:{port}"
        begun = threading.Event()
        stream = pool.submit(streamed, url, completion, begun)
        assert begun.wait(60), "the stream did not begin within 60 s"
        yield process, url, stream


@pytest.mark.parametrize("signals", [("INT", "INT"), ("TERM", "INT"), ("TERM", "INT", "INT"), ("TERM", "TERM"),
                                     ("INT", "TERM")], ids="-".join)
def test_a_server_stopped_twice_with_requests_in_flight(signals, slow_llama_dir, tmp_path):
    """Stops 0.3 s apart while completions and /answer run, one streamed completion begun: a Ctrl-C after the first
    stop forces the exit at once (as uvicorn's second Ctrl-C), whenever it comes: the requests whose reply had not
    begun get the forced stop's 503 in their route's error shape, the stream begun is cut (its connection closed);
    a second SIGTERM ends the drain, the requests finished. Either way status 0, uvicorn's line last, no traceback.
    A review: a Ctrl-C within the drain (1 s) waited for the requests all the same, and a forced stop answered each
    with a plain-text 500 'Internal Server Error' and logged its CancelledError's traceback after uvicorn's last
    line."""
    completion = {"model": "base", "prompt": "Story 1:", "max_tokens": TOKENS, "temperature": 0}
    answer = {"context": "The Normans gave their name to Normandy. " * 4, "question": "Who?", "extractive": False,
              "decoding": {"max_new_tokens": TOKENS}}
    with ThreadPoolExecutor(6) as pool, serving_a_stream(slow_llama_dir, tmp_path, pool, completion,
                                                         "--max-queue-wait", "600") as (process, url, stream):
        replies = [pool.submit(httpx.post, f"{url}/v1/completions", json=completion, timeout=120) for _ in range(3)]
        replies += [pool.submit(httpx.post, f"{url}/answer", json=answer, timeout=120)]
        with httpx.Client(base_url=url) as http:
            wait_until(lambda: value(scrape(http), "loraswap_requests_in_flight") >= 5, "5 requests in flight")
        for k, name in enumerate(signals):
            time.sleep(0.3 if k else 0)
            process.send_signal(getattr(signal, f"SIG{name}"))
        status = process.wait(timeout=120)
        outcomes = [replied(reply.result()) for reply in replies] + [stream.result()]
    err = (tmp_path / "serve.log").read_text()
    forced = "INT" in signals[1:]
    assert outcomes == ["forced"] * 4 + ["cut"] if forced else ["whole"] * 5, (outcomes, err[-3000:])
    assert status == 0 and err.splitlines()[-1].startswith("INFO:     Finished server process"), err[-3000:]
    assert "Traceback" not in err and "Internal Server Error" not in err, err[-3000:]


QUEUED = 10  # completions queued behind the one running at the stop: more than 3 s of work on any CPU


def test_requests_queued_at_a_stop_are_served_or_told_the_server_shuts_down(slow_llama_dir, tmp_path):
    """SIGTERM with completions queued behind one running (``--max-batch 1``): those taken before their wait passes
    ``--max-queue-wait`` (3 s) are answered whole, the others get a 503 saying the service is shutting down (code
    engine_stopped), without Retry-After; never the 429 'the server is past capacity; retry later' (Retry-After 1)
    that sent their clients back to the server going away (a review: SmolLM2, 7 requests in flight at SIGTERM)."""
    completion = {"model": "base", "prompt": "Story 1:", "max_tokens": TOKENS, "temperature": 0}
    with ThreadPoolExecutor(1 + QUEUED) as pool, serving_a_stream(slow_llama_dir, tmp_path, pool, completion,
                                                                  "--max-batch", "1", "--max-queue-wait", "3") as (
            process, url, stream):
        replies = [pool.submit(httpx.post, f"{url}/v1/completions", json={**completion, "stream": k % 3 == 1},
                               timeout=120) for k in range(QUEUED)]
        with httpx.Client(base_url=url) as http:  # all queued within the bound: it passes after the signal
            wait_until(lambda: value(scrape(http), "loraswap_requests_waiting") >= QUEUED, "requests queued")
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=120)
        refused = [reply.result() for reply in replies if reply.result().status_code != 200]
        served = [reply.result() for reply in replies if reply.result().status_code == 200]
    err = (tmp_path / "serve.log").read_text()
    assert stream.result() == "whole" and status == 0, err[-3000:]
    assert refused, "every queued request was served: none waited past --max-queue-wait"
    assert all("data: [DONE]" in reply.text or reply.json()["choices"][0]["text"] for reply in served)
    for reply in refused:
        assert reply.status_code == 503 and "retry-after" not in reply.headers, (reply.status_code, reply.text)
        assert reply.json()["error"]["code"] == "engine_stopped", reply.text
        assert reply.json()["error"]["message"].startswith("the service is shutting down: the request waited 3 s")


@pytest.mark.parametrize("whole", [True, False], ids=["next request", "a part of one"])
def test_a_stream_begun_before_the_drain_has_its_connection_kept_for_the_next_request(whole, slow_llama_dir,
                                                                                      tmp_path):
    """A stream's headers went out before SIGTERM, so they say nothing of closing, and its client sends its next
    request on the same connection as the stream ends: after the drain, uvicorn's shutdown closed that connection as
    the stream ended, and the request met a reset with no reply (a review). Now it is answered as the drain answers
    (503, ``Connection: close``), then the connection closes and the server exits with status 0. A request sent only
    in part holds nothing: the connection closes ``NEXT_REQUEST_WAIT_S`` after the stream's end (a review: the
    exit waited for it without end)."""
    drain = 0  # the drain's end at once: uvicorn's shutdown 2 x ACCEPTED_WAIT_S after the signal
    body = (b'{"model": "base", "prompt": "Story:", "max_tokens": %d, "temperature": 0, "n": 8, "stream": true}'
            % TOKENS)  # 8 choices: each decoding step 8 rows, so that the stream outlives the drain by far
    with serving(slow_llama_dir, tmp_path, "--drain-seconds", str(drain)) as (process, port):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            received = raw.recv(65536)
            assert received.startswith(b"HTTP/1.1 200"), received
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while not (b"[DONE]" in received and received.endswith(b"\r\n0\r\n\r\n")):  # its last chunk
                chunk = raw.recv(65536)
                assert chunk, f"the stream was cut: {received[-300:]!r}"
                received += chunk
            ended = time.monotonic() - signalled
            assert ended > 2 * ACCEPTED_WAIT_S + 0.2, f"the stream ended {ended:.2f} s after SIGTERM: not the case"
            raw.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n" if whole else b"GET /rea")
            stream_end, reply = time.monotonic(), b""
            while chunk := raw.recv(65536):  # until the server closes the connection (a reset fails the test)
                reply += chunk
            closed = time.monotonic() - stream_end
        if whole:
            assert reply.startswith(b"HTTP/1.1 503") and b"\r\nconnection: close\r\n" in reply.lower(), reply
        else:
            assert reply == b"" and closed < NEXT_REQUEST_WAIT_S + 5, (reply, closed)
        assert process.wait(timeout=30) == 0

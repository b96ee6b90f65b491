"""`loraswap serve` as a real process on a tiny Llama: every route over HTTP, the real OpenAI client (completions,
chat, readable errors, the API key), vLLM's adapter routes, and a graceful SIGTERM (not ready at once, in-flight
requests finish, exit status 0)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_helpers import (
    ADMIN,
    ADMIN_KEY,
    SQUAD_CONTEXT,
    SQUAD_QUESTION,
    copy_adapters,
    free_port,
    scrape,
    value,
    wait_ready,
    wait_until,
)
from tests.tiny_models import make_adapter

API_KEY = "sk-live"
INFERENCE = {"Authorization": f"Bearer {API_KEY}"}  # the API key, sent by default (admin calls send ADMIN instead)
CAP = 256  # the server's max_new_tokens
DRAIN_SECONDS = 2.0
BATCH_WINDOW = 0.1  # seconds: long enough that a client hanging up at once does so while its request waits in it


class LiveServer:
    def __init__(self, process: subprocess.Popen, port: int, extra):
        self.process, self.port, self.extra = process, port, extra
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60, headers=INFERENCE)
        self.openai = openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def server(tiny_llama_dir, llama_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    extra = root / "extra"
    make_adapter(tiny_llama_dir, extra / "three", seed=2)
    port = free_port()
    command = [sys.executable, "-m", "service.cli.entry", "serve", "--base-model", str(tiny_llama_dir),
               "--adapters-dir", str(copy_adapters(llama_adapters, root / "adapters")), "--adapter-roots", str(extra),
               "--admin-key", ADMIN_KEY, "--api-key", API_KEY, "--port", str(port), "--host", "127.0.0.1",
               "--cache-dir", str(root / "cache"),
               "--device", "cpu", "--qa-adapter", "one", "--nli-adapter", "two", "--max-batch", "4",
               "--max-new-tokens", str(CAP), "--batch-window-ms", str(BATCH_WINDOW * 1000),
               "--drain-seconds", str(DRAIN_SECONDS),
               "--max-queue-wait", "0"]  # no bound: a busy machine must not shed the requests the drain test counts
    with open(root / "server.log", "w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        live = LiveServer(process, port, extra)
        try:
            wait_ready(live.http.get, timeout=120)
            yield live
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            live.http.close()
            log.seek(0)
            print(log.read()[-4000:])  # shown when a test fails


def test_every_route_over_http(server):
    http = server.http
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json() == {"ready": True}

    answer = http.post("/answer", json={"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION,
                                        "decoding": {"strategy": "nucleus", "top_p": 0.9, "seed": 3}})
    assert answer.status_code == 200 and answer.json()["adapter"] == "one"
    nli = http.post("/nli", json={"premise": "A man sleeps.", "hypothesis": "Nobody sleeps.", "adapter": None})
    assert nli.status_code == 200 and nli.json()["adapter"] is None
    assert sum(nli.json()["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {"base", "one", "two"}

    assert http.post("/answer", json={"context": "c", "question": "q", "adapter": "nope"}).status_code == 404
    invalid = http.post("/nli", json={"premise": "p"})
    assert invalid.status_code == 422 and invalid.headers["content-type"] == "application/json"
    assert http.post("/adapters", json={"name": "three", "path": str(server.extra / "three")}).status_code == 403

    loaded = http.post("/adapters", json={"name": "three", "path": str(server.extra / "three")}, headers=ADMIN)
    assert loaded.status_code == 201, loaded.text
    assert {a["name"] for a in http.get("/adapters").json()["adapters"]} == {"one", "two", "three"}
    greedy = {"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION, "adapter": "three"}
    alone = http.post("/answer", json=greedy).json()["answer"]
    assert http.post("/adapters/three/merge", headers=ADMIN).json()["merged"] == "three"
    assert http.post("/answer", json=greedy).json()["answer"] == alone
    assert http.post("/adapters/unmerge", headers=ADMIN).json()["merged"] is None
    assert http.delete("/adapters/three", headers=ADMIN).json() == {"deleted": "three"}
    assert http.post("/answer", json=greedy).status_code == 404

    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    families = {family.name for family in text_string_to_metric_families(metrics.text)}
    assert {"loraswap_request_duration_seconds", "loraswap_queue_wait_seconds", "loraswap_batch_size",
            "loraswap_time_to_first_token_seconds", "loraswap_generated_tokens", "loraswap_adapter_load_seconds",
            "loraswap_adapters_resident", "loraswap_requests_in_flight"} <= families


def test_the_openai_client(server):
    client = server.openai
    assert {"base", "one", "two"} <= {model.id for model in client.models.list()}
    completion = client.completions.create(model="one", prompt="The Normans gave their name to", max_tokens=5,
                                           temperature=0)
    assert completion.model == "one" and len(completion.choices) == 1
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert 0 < completion.usage.completion_tokens <= 5
    again = client.completions.create(model="one", prompt="The Normans gave their name to", max_tokens=5,
                                      temperature=0)
    assert again.choices[0].text == completion.choices[0].text
    base = client.completions.create(model="base", prompt="The Normans gave their name to", max_tokens=5,
                                     temperature=0)
    assert base.choices[0].text != completion.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hi", max_tokens=2)


CONVERSATION = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Who won?"},
                {"role": "assistant", "content": "Denver."}, {"role": "user", "content": "Where?"}]


def rendered(conversation: list[dict]) -> str:
    """The conversation as the tiny tokenizer's chat template renders it (tests.tiny_models.CHAT_TEMPLATE)."""
    return "".join(f"{m['role']}: {m['content']}<|endoftext|>\n" for m in conversation) + "assistant:"


@pytest.mark.parametrize("conversation", [CONVERSATION[1:2], CONVERSATION], ids=["one turn", "multi-turn, system"])
def test_chat_with_the_openai_client(server, conversation):
    """A chat is the completion of its rendered template (sent raw, so that its control tokens parse as such)."""
    chat = server.openai.chat.completions.create(model="one", messages=conversation, max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.model == "one" and len(chat.choices) == 1
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    completion = server.openai.completions.create(model="one", prompt=rendered(conversation), max_tokens=8,
                                                  temperature=0)
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage == completion.usage
    again = server.openai.chat.completions.create(model="one", messages=conversation, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content


def test_errors_read_through_the_openai_client(server):
    """OpenAI's client shows our message, type, param and code (it showed only "Error code: 422" before)."""
    client = server.openai
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="nope", messages=CONVERSATION[1:2])
    assert "unknown adapter 'nope'" in str(raised.value) and raised.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.chat.completions.create(model="one", messages=CONVERSATION[1:2], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert "body.tools: Extra inputs are not permitted" in str(raised.value) and raised.value.param == "tools"
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.completions.create(model="one", prompt="Hi", max_tokens=CAP + 1)
    assert f"less than or equal to {CAP}" in str(raised.value) and raised.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="base", prompt="Once upon a time " * 300)
    assert raised.value.code == "context_length_exceeded" and "tokens; at most" in str(raised.value)


def test_the_api_key_guards_the_routes_that_run_the_model(server):
    for key in ("wrong", API_KEY + "x", API_KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as raised:
            openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0).completions.create(
                model="one", prompt="Hi", max_tokens=2)
        assert "Bearer <API key>" in str(raised.value)
    bare = httpx.Client(base_url=server.url, timeout=60)
    assert bare.post("/answer", json={"context": "c", "question": "q"}).status_code == 401
    assert bare.post("/answer", json={"context": "c", "question": "q"}, headers=ADMIN).status_code == 403  # known
    assert bare.get("/v1/models").status_code == 401  # OpenAI's and vLLM's: every /v1 route needs the key
    assert bare.get("/ready").status_code == 200  # a probe: open


def test_the_locustfile_sends_the_api_key(server, tmp_path):
    """A review: the locust scenario (``loadtest/locustfile.py``, as ``locust_ab.sh`` runs it) sent no API key, so a
    server with one answered every request with a 401."""
    env = {**os.environ, "LORASWAP_API_KEY": API_KEY, "LORASWAP_LOADTEST_ADAPTERS": "one"}
    ran = subprocess.run([sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "--users", "1",
                          "--spawn-rate", "1", "--run-time", "6s", "--host", server.url, "--csv",
                          str(tmp_path / "run"), "--only-summary"], env=env, capture_output=True, text=True,
                         timeout=120)
    rows = list(csv.DictReader((tmp_path / "run_stats.csv").open()))
    total = next(row for row in rows if row["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0 and total["Failure Count"] == "0", ran.stderr[-2000:]


def test_vllms_adapter_routes(server):
    """A tool written for vLLM loads and unloads an adapter with the admin key, and gets vLLM's replies."""
    http = server.http
    body = {"lora_name": "four", "lora_path": str(server.extra / "three")}
    assert http.post("/v1/load_lora_adapter", json=body).status_code == 403  # the API key is not the admin key
    loaded = http.post("/v1/load_lora_adapter", json=body, headers=ADMIN)
    assert (loaded.status_code, loaded.text) == (200, "Success: LoRA adapter 'four' added successfully.")
    assert "four" in {model.id for model in server.openai.models.list()}
    assert server.openai.completions.create(model="four", prompt="Hi", max_tokens=2).model == "four"
    again = http.post("/v1/load_lora_adapter", json=body, headers=ADMIN)
    assert again.status_code == 409 and "already loaded" in again.json()["error"]["message"]
    unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "four"}, headers=ADMIN)
    assert (unloaded.status_code, unloaded.text) == (200, "Success: LoRA adapter 'four' removed successfully.")
    with pytest.raises(openai.NotFoundError):
        server.openai.completions.create(model="four", prompt="Hi", max_tokens=2)


def in_flight_and_answered(http: httpx.Client, status: str | None = None) -> tuple[float, float]:
    """HTTP requests in flight now, and completions answered so far (with ``status``, if given), from /metrics."""
    return in_flight_and_answered_in(scrape(http), status)


def in_flight_and_answered_in(samples, status: str | None = None) -> tuple[float, float]:
    """``in_flight_and_answered`` of one scrape's ``samples``."""
    answered = sum(count for (name, labels), count in samples.items()
                   if name == "loraswap_request_duration_seconds_count" and ("endpoint", "/v1/completions") in labels
                   and (status is None or ("status", status) in labels))
    return value(samples, "loraswap_requests_in_flight"), answered


def test_a_client_that_disconnects_gets_its_request_dropped(server):
    http = server.http
    body = {"model": "one", "prompt": "Story:", "max_tokens": 256, "temperature": 0}
    whole = http.post("/v1/completions", json=body).json()
    assert whole["usage"]["completion_tokens"] == 256, "this request must run long enough to be cut off"
    idle, dropped = in_flight_and_answered(http, status="499")
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                       % (API_KEY.encode(), len(payload), payload))
        wait_until(lambda: in_flight_and_answered(http)[0] > idle, "the request never reached the server", timeout=30)
    wait_until(lambda: in_flight_and_answered(http, status="499") == (idle, dropped + 1),
               "the disconnected request was not recorded as 499 (client closed request)", timeout=30)
    assert http.post("/v1/completions", json=body).json()["choices"] == whole["choices"]


def test_a_chat_client_that_leaves_while_its_template_renders_is_recorded_as_gone(server):
    """An adapter whose chat template runs to the render deadline (2 s): chat clients that leave while their render
    runs or waits its turn are recorded as 499 at once, not as the 422 of the render's failure (a review). That a
    render withdrawn before it starts never runs: test_template_sandbox."""
    http = server.http
    folder = server.extra / "endless"
    shutil.copytree(server.extra / "three", folder)
    (folder / "chat_template.jinja").write_text(
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}{{ messages }}")
    assert http.post("/adapters", json={"name": "endless", "path": str(folder)}, headers=ADMIN).status_code == 201
    chats = lambda status: sum(count for (name, labels), count in scrape(http).items()  # noqa: E731
                               if name == "loraswap_request_duration_seconds_count" and ("status", status) in labels
                               and ("endpoint", "/v1/chat/completions") in labels)
    gone, refused = chats("499"), chats("422")
    payload = json.dumps({"model": "endless", "messages": CONVERSATION[1:2]}).encode()
    clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    for client in clients:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                       % (API_KEY.encode(), len(payload), payload))
    time.sleep(0.5)  # both arrived: one renders, one waits its turn
    for client in clients:
        client.close()
    wait_until(lambda: chats("499") == gone + 2, "the chat clients that left were not recorded as 499", timeout=30)
    time.sleep(3)  # past the first render's deadline: its failure is not recorded for a client that left
    assert chats("422") == refused
    assert http.delete("/adapters/endless", headers=ADMIN).status_code == 200


def test_a_client_that_goes_away_while_sending_its_body_is_recorded_as_gone_not_as_a_bad_body(server):
    """A body cut short by its client's leaving was recorded as 400 (FastAPI's "error parsing the body")."""
    http = server.http
    idle, gone = in_flight_and_answered(http, status="499")
    bad = in_flight_and_answered(http, status="400")[1]
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer %s\r\nContent-Length: 1000\r\n\r\n{\"model\": " % API_KEY.encode())
        wait_until(lambda: in_flight_and_answered(http)[0] > idle, "the request never reached the server", timeout=30)
    wait_until(lambda: in_flight_and_answered(http, status="499") == (idle, gone + 1),
               "the request whose client left mid-body was not recorded as 499", timeout=30)
    assert in_flight_and_answered(http, status="400")[1] == bad


def test_clients_that_hang_up_at_once_leave_the_engine_serving(server):
    """POST /answer over a raw socket closed as soon as it is sent: the request, alone in the queue, is withdrawn
    while the engine waits out the batch window, which then ends with the queue empty."""
    payload = json.dumps({"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION}).encode()
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.sendall(b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                           % (API_KEY.encode(), len(payload), payload))
        time.sleep(2 * BATCH_WINDOW)  # one request per window
    reply = server.http.post("/answer", json={"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert server.http.get("/health").json() == {"status": "ok"}


def streamed_choices(stream) -> dict[int, tuple[str, str]]:
    """{choice index: (text, finish reason)} of an OpenAI client stream (completions or chat)."""
    texts, reasons = {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else choice.delta.content or ""
            texts[choice.index] = texts.get(choice.index, "") + piece
            reasons[choice.index] = choice.finish_reason
    return {index: (texts[index], reasons[index]) for index in texts}


def whole_choices(reply) -> dict[int, tuple[str, str]]:
    return {choice.index: (choice.text if hasattr(choice, "text") else choice.message.content, choice.finish_reason)
            for choice in reply.choices}


def create(server, route: str, **fields):
    """A greedy completion (route "completions") or chat completion ("chat") by the OpenAI client."""
    fields = {"temperature": 0, **fields}
    if route == "completions":
        return server.openai.completions.create(model="one", prompt="The Normans gave their name to", **fields)
    return server.openai.chat.completions.create(model="one", messages=CONVERSATION, **fields)


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_streamed_equals_non_streamed_and_honours_stop_logprobs_and_n(server, route):
    whole = create(server, route, max_tokens=24)
    chunks = list(create(server, route, max_tokens=24, stream=True))
    assert streamed_choices(chunks) == whole_choices(whole) and len(chunks) > 3

    pieces = [piece for chunk in chunks for piece in [chunk.choices[0].text if route == "completions" else
                                                      chunk.choices[0].delta.content or ""] if piece]
    text = "".join(pieces)
    ends = [len("".join(pieces[:k + 1])) for k in range(1, len(pieces) - 1)]
    at = next(end - 1 for end in ends if text.find(text[end - 1:end + 1]) == end - 1)
    stop = text[at:at + 2]  # across two streamed chunks
    assert streamed_choices(create(server, route, max_tokens=24, stream=True, stop=[stop])) == {0: (text[:at], "stop")}
    assert whole_choices(create(server, route, max_tokens=24, stop=stop)) == {0: (text[:at], "stop")}

    if route == "completions":
        logprobs = create(server, route, max_tokens=6, logprobs=2).choices[0].logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
        assert all(len(top) <= 3 and top[token] == lp for token, lp, top in zip(
            logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs))
    else:
        content = create(server, route, max_tokens=6, logprobs=True, top_logprobs=2).choices[0].logprobs.content
        assert len(content) == 6 and all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)

    sampled = {"max_tokens": 8, "n": 3, "seed": 4, "temperature": 1.5}
    choices = whole_choices(create(server, route, **sampled))
    assert sorted(choices) == [0, 1, 2] and len({text for text, _ in choices.values()}) > 1
    assert streamed_choices(create(server, route, stream=True, **sampled)) == choices


def test_a_stream_whose_client_disconnects_has_its_rows_dropped(server):
    """A client that hangs up after the first event: its two rows leave the batch long before their 256 tokens,
    the request is recorded as 499, and the next request is served as before."""
    http = server.http
    body = {"model": "two", "prompt": "Story:", "max_tokens": CAP, "temperature": 0, "n": 2}
    whole = http.post("/v1/completions", json=body).json()
    assert whole["usage"]["completion_tokens"] == 2 * CAP, "the request must run long enough to be cut off"
    idle, dropped = in_flight_and_answered(http, status="499")
    generated = value(scrape(http), "loraswap_generated_tokens_total", adapter="two")
    payload = json.dumps({**body, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                       % (API_KEY.encode(), len(payload), payload))
        received = b""
        client.settimeout(30)  # a recv past it raises: the test fails, never hangs
        while b"data: " not in received:
            chunk = client.recv(4096)
            assert chunk, f"the server closed the connection before the stream began: {received!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and b"text/event-stream" in received
    wait_until(lambda: in_flight_and_answered(http, status="499") == (idle, dropped + 1),
               "the stream whose client left was not recorded as 499 (client closed request)", timeout=30)
    def counted() -> float:  # the engine counts a dropped row's tokens when it drops it
        return value(scrape(http), "loraswap_generated_tokens_total", adapter="two") - generated

    wait_until(lambda: counted() > 0, "the dropped rows' tokens were not counted", timeout=30)
    assert counted() < CAP, f"{counted()} tokens generated for the two rows: not dropped when their client left"
    assert http.post("/v1/completions", json=body).json()["choices"] == whole["choices"]


def test_sigterm_drains_then_exits_cleanly(server):
    """Runs last: SIGTERM with 12 slow requests in flight (256 tokens, batches of 4). Every reply during the drain
    closes its connection (``Connection: close``): a request sent on a connection kept alive as the drain ended was
    lost with no reply (a review)."""
    http, slow = server.http, 12
    idle, answered_before = in_flight_and_answered(http)

    def arrived() -> float:  # completions that reached the server: in flight, or already answered
        now, answered = in_flight_and_answered(http)
        return now - idle + answered - answered_before

    def admitted() -> float:  # completions past the readiness check: in the engine (one scrape: none counted twice)
        samples = scrape(http)
        engine = value(samples, "loraswap_requests_running") + value(samples, "loraswap_requests_waiting")
        return engine + in_flight_and_answered_in(samples)[1] - answered_before

    def complete(i: int) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/completions", timeout=120, headers=INFERENCE,
                          json={"model": ("one", "two", "base")[i % 3], "prompt": f"Story {i}:", "max_tokens": 256,
                                "temperature": 0})  # greedy: a sampled end-of-text first token would end it at once

    with ThreadPoolExecutor(max_workers=slow) as pool:
        futures = [pool.submit(complete, i) for i in range(slow)]
        wait_until(lambda: arrived() >= slow, "the slow requests did not reach the server", timeout=30)
        assert in_flight_and_answered(http)[0] > idle, "every request was answered before SIGTERM: nothing to drain"
        # counted in flight by the middleware before the readiness check: a signal before it would refuse them
        wait_until(lambda: admitted() >= slow, "the slow requests did not reach the engine", timeout=30)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        ready = http.get("/ready")
        refused = http.post("/answer", json={"context": "c", "question": "q"})
        assert time.monotonic() - signalled < DRAIN_SECONDS
        assert ready.status_code == 503 and ready.json() == {"ready": False, "reason": "draining"}
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        assert ready.headers["connection"] == refused.headers["connection"] == "close"
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:  # HTTP/1.1: kept alive
            raw.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while chunk := raw.recv(4096):  # until the server closes the connection (socket.timeout: it did not)
                received += chunk
        assert received.startswith(b"HTTP/1.1 503") and b"\r\nconnection: close\r\n" in received.lower(), received
        replies = [future.result() for future in futures]
    assert [reply.status_code for reply in replies] == [200] * slow, [reply.text for reply in replies]
    assert [(reply.json()["choices"][0]["finish_reason"], reply.json()["usage"]["completion_tokens"])
            for reply in replies] == [("length", 256)] * slow, "a drained request was cut short"
    assert server.process.wait(timeout=60) == 0

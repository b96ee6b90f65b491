"""Errors on /v1/* take OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the type from the
status and the code from the domain error (or pydantic's kind of problem), so that OpenAI's clients show the message;
/answer, /nli and the admin routes keep ``{"error": message}``. The API documentation says which shape each route
answers with."""
from __future__ import annotations

import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.http.app import create_app
from service.http.server import DrainingServer
from service.runtime import Runtime
from tests.engine.engine_helpers import paused
from tests.http.replies import error_message, settings_by_field
from tests.server_helpers import (
    ADMIN,
    SQUAD_CONTEXT,
    SQUAD_QUESTION,
    ready_client,
    settings_in,
    wait_until,
)

COMPLETION = {"model": "one", "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": "one", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
LONG = "Once upon a time " * 300
ANSWER = {"context": "The Normans gave their name to Normandy.", "question": "What got its name from the Normans?"}
# a second message's content refused, the param where in the request (not naming the form of the content, "parts")
PART_ERRORS = [
    ([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], "messages.1.content.0.type",
     "not_supported"),
    ([{"type": "text", "text": "a"}, {"type": "input_audio", "input_audio": {}}], "messages.1.content.1.type",
     "not_supported"),
    ([{"type": "text", "text": 3}], "messages.1.content.0.text", "string_type"),
    ([{"text": "a"}], "messages.1.content.0.type", "missing"),
    (["a"], "messages.1.content.0", "model_type"),
    ([{"type": "text", "text": "a"}] * 2, "messages.1.content", "not_supported"),
    (3, "messages.1.content", "string_or_parts"),
]

# (method, path, body, headers, status, type, param, code)
OPENAI_ERRORS = [
    ("post", "/v1/completions", {**COMPLETION, "best_of": 2}, {}, 422, "invalid_request_error", "best_of",
     "not_supported"),
    ("post", "/v1/completions", {**COMPLETION, "n": 9}, {}, 422, "invalid_request_error", "n", "less_than_equal"),
    ("post", "/v1/completions", {**COMPLETION, "colour": "red"}, {}, 422, "invalid_request_error", "colour",
     "extra_forbidden"),
    ("post", "/v1/chat/completions", {"model": "one"}, {}, 422, "invalid_request_error", "messages", "missing"),
    ("post", "/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, {}, 422,
     "invalid_request_error", "messages.0.role", "literal_error"),
    *[("post", "/v1/chat/completions", {**CHAT, "messages": [*CHAT["messages"], {"role": "user", "content": content}]},
       {}, 422, "invalid_request_error", param, code) for content, param, code in PART_ERRORS],
    ("post", "/v1/completions", [1], {}, 422, "invalid_request_error", None, "model_attributes_type"),
    ("post", "/v1/completions", b"{", {"content-type": "application/json"}, 400, "invalid_request_error", None,
     "json_invalid"),
    ("post", "/v1/completions", b"1\xff\xff", {"content-type": "application/json"}, 400, "invalid_request_error", None,
     "json_invalid"),
    ("post", "/v1/completions", {**COMPLETION, "model": ""}, {}, 422, "invalid_request_error", "model",
     "string_too_short"),
    ("post", "/v1/chat/completions", {**CHAT, "model": ""}, {}, 422, "invalid_request_error", "model",
     "string_too_short"),
    # a review: the budgets' conflict was the body's error (param null); a lone stop string's was 'stop.0'
    ("post", "/v1/chat/completions", {**CHAT, "max_tokens": 3, "max_completion_tokens": 4}, {}, 422,
     "invalid_request_error", "max_completion_tokens", "conflict"),
    *[("post", path, {**body, "stop": ""}, {}, 422, "invalid_request_error", "stop", "string_too_short")
      for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT))],
    ("post", "/v1/completions", {**COMPLETION, "stop": [""]}, {}, 422, "invalid_request_error", "stop.0",
     "string_too_short"),
    ("get", "/v1/nowhere", None, {}, 404, "invalid_request_error", None, None),
    ("get", "/v1/completions", None, {}, 405, "invalid_request_error", None, None),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x"}, {}, 401, "authentication_error", None,
     "invalid_api_key"),
]
# domain errors a request field is the fault of, which their param names (method, path, body, status, param, code);
# those of completions streamed too (refused before the stream begins)
FIELD_ERRORS = [
    *[("post", path, {**body, "model": "nope", **streamed}, 404, "model", "model_not_found")
      for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT))
      for streamed in ({}, {"stream": True})],
    *[("post", "/v1/completions", {**COMPLETION, "prompt": LONG, **streamed}, 400, "prompt", "context_length_exceeded")
      for streamed in ({}, {"stream": True})],
    *[("post", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONG}], **streamed}, 400,
       "messages", "context_length_exceeded") for streamed in ({}, {"stream": True})],
    ("get", "/v1/models/nope", None, 404, "model", "model_not_found"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, 403, "lora_path",
     "adapter_path_refused"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "nowhere"}, 404, "lora_path",
     "adapter_path_missing"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": ""}, 422, "lora_path", "adapter_error"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "one", "lora_path": "two"}, 409, "lora_name", "adapter_conflict"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "no way", "lora_path": "two"}, 422, "lora_name",
     "adapter_name_refused"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "Base", "lora_path": "two"}, 422, "lora_name",
     "adapter_name_refused"),
    ("post", "/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "lora_name", "model_not_found"),
    ("post", "/v1/unload_lora_adapter", {"lora_name": "no way"}, 422, "lora_name", "adapter_name_refused"),
]
# the same kinds of error elsewhere: {"error": message}
PLAIN_ERRORS = [
    ("post", "/answer", {"context": "c", "question": "q", "adapter": "nope"}, {}, 404),
    ("post", "/nli", {"premise": "p"}, {}, 422),
    ("post", "/nli", {"premise": LONG, "hypothesis": "h"}, {}, 413),
    ("post", "/adapters", {"name": "x", "path": "/x"}, {}, 401),
    ("post", "/adapters", {"name": "x", "path": "/etc"}, ADMIN, 403),
    ("get", "/nowhere", None, {}, 404),
]


@pytest.fixture(scope="module")
def served(tiny_gpt2_dir, gpt2_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai_errors")
    return settings_in(root, tiny_gpt2_dir, gpt2_adapters)


@pytest.fixture(scope="module")
def client(served):
    with ready_client(served) as client:
        yield client


def send(client, method: str, path: str, body, headers: dict):
    sent = {"content": body} if isinstance(body, bytes) else {"json": body}
    return client.request(method, path, headers=headers, **sent)


@pytest.mark.parametrize("method,path,body,headers,status,kind,param,code", OPENAI_ERRORS)
def test_errors_on_v1_are_in_openais_shape(client, method, path, body, headers, status, kind, param, code):
    reply = send(client, method, path, body, headers)
    assert reply.status_code == status, reply.text
    assert error_message(reply) and reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (kind, param, code), error
    if param is not None:
        assert f"body.{param}: " in error["message"]


@pytest.mark.parametrize("method,path,body,status,param,code", FIELD_ERRORS)
def test_a_domain_error_a_request_field_is_the_fault_of_names_it(client, method, path, body, status, param, code):
    """A review: such errors said param null (an unknown model, a prompt too long, vLLM's adapter routes' faults)."""
    before = client.get("/v1/models").json()
    reply = send(client, method, path, body, ADMIN)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("permission_error" if status == 403 else
                                                              "invalid_request_error", param, code), error
    assert error_message(reply) and client.get("/v1/models").json() == before


@pytest.mark.parametrize("method,path,body,headers,status", PLAIN_ERRORS)
def test_errors_elsewhere_keep_their_shape(client, method, path, body, headers, status):
    reply = send(client, method, path, body, headers)
    assert reply.status_code == status and isinstance(reply.json()["error"], str) and error_message(reply)


def test_the_api_documents_each_routes_shape(client):
    paths = client.get("/openapi.json").json()["paths"]
    documented = 0
    for path, operations in paths.items():
        shape = "OpenAIErrorOut" if path.startswith("/v1/") else "ErrorOut"
        for operation in operations.values():
            for status, reply in operation["responses"].items():
                if status[0] in "45" and "content" in reply:  # not the probes' 503 (no error message)
                    assert reply["content"]["application/json"]["schema"] == {
                        "$ref": f"#/components/schemas/{shape}"}, (path, status)
                    documented += 1
    assert documented > 40
    assert {"/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= set(paths)


def test_loading_and_a_full_queue_in_openais_shape(served):
    """503 while the model loads and 429 when the queue is full: OpenAI's types, and when to retry."""
    loading = TestClient(create_app(rt=Runtime(served))).post("/v1/chat/completions", json=CHAT)  # no lifespan
    assert loading.status_code == 503 and loading.headers["Retry-After"]
    assert loading.json()["error"]["type"] == "server_error" and loading.json()["error"]["code"] == "still_loading"
    with (ready_client(served.model_copy(update={"max_queue": 1, "batch_window_ms": 1500})) as client,
          ThreadPoolExecutor(max_workers=4) as pool):
        replies = list(pool.map(lambda _: client.post("/v1/completions", json=COMPLETION), range(4)))
    full = [reply for reply in replies if reply.status_code == 429]
    assert len(full) == 3, [reply.status_code for reply in replies]
    for reply in full:
        assert "queue is full" in error_message(reply) and int(reply.headers["Retry-After"]) >= 1
        assert (reply.json()["error"]["type"], reply.json()["error"]["code"]) == ("rate_limit_error", "queue_full")


def test_more_choices_than_the_queue_holds_are_refused_not_retried(served):
    """n above max_queue (or max_batch) can never be served: a 422 naming the cap, not a 429 that clients retry."""
    with ready_client(served.model_copy(update={"max_queue": 2})) as client:
        refused = client.post("/v1/completions", json={**COMPLETION, "n": 3})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["param"] == "n" and "LORASWAP_MAX_QUEUE" in error_message(refused)
        assert len(client.post("/v1/completions", json={**COMPLETION, "n": 2}).json()["choices"]) == 2


def test_the_openai_client_shows_the_message(client):
    """Before, it showed "Error code: 422" and nothing of what was wrong."""
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        api.chat.completions.create(model="nope", messages=CHAT["messages"])
    assert "unknown adapter 'nope'" in str(raised.value)
    assert (raised.value.type, raised.value.code) == ("invalid_request_error", "model_not_found")
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        api.completions.create(model="one", prompt="Hi", frequency_penalty=1)
    assert "frequency_penalty is not supported yet" in str(raised.value) and raised.value.param == "frequency_penalty"
    with pytest.raises(openai.BadRequestError) as raised:  # a 413 was an APIStatusError of no kind
        api.completions.create(model="one", prompt=LONG)
    assert raised.value.code == "context_length_exceeded" and "at most" in str(raised.value)


def test_the_openai_client_retrieves_each_listed_model(client):
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    listed = [model.id for model in api.models.list()]
    assert listed[0] == "base" and {"one", "two"} <= set(listed)
    assert [api.models.retrieve(model_id).id for model_id in listed] == listed


def test_answer_and_nli_errors_name_the_same_problems(client):
    """The shapes differ; the messages of the same problem do not."""
    answer = client.post("/answer", json={"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION, "adapter": "nope"})
    completion = client.post("/v1/completions", json={**COMPLETION, "model": "nope"})
    assert answer.json()["error"] == completion.json()["error"]["message"] == "unknown adapter 'nope'"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_a_request_left_in_the_queue_past_max_queue_wait_is_429_with_retry_after_streamed_or_not(served, path, body,
                                                                                                 stream):
    """The engine held (a control call) while the request waits past ``max_queue_wait``: 429 with Retry-After, code
    queue_timeout, counted as a 429 in /metrics, never a 200 whose stream carries the error (as streams did)."""
    with ready_client(served.model_copy(update={"max_queue_wait": 0.2})) as client, ThreadPoolExecutor(1) as pool:
        engine = client.app.state.runtime.engine
        refused_before = requests_counted(client, path, "429")
        with paused(engine):
            pending = pool.submit(client.post, path, json={**body, "stream": stream})
            wait_until(lambda: engine.queue_depth > 0, "the request queued")
            reply = pending.result(30)  # refused as its wait runs out, the engine thread still held
        assert reply.status_code == 429, reply.text
        assert "(the server's LORASWAP_MAX_QUEUE_WAIT)" in error_message(reply)  # was its field, max_queue_wait
        assert settings_by_field(error_message(reply)) == [] and int(reply.headers["Retry-After"]) >= 1
        assert reply.json()["error"]["code"] == "queue_timeout"
        assert requests_counted(client, path, "429") == refused_before + 1
        assert client.post(path, json={**body, "stream": stream}).status_code == 200  # served once the queue moves


QUEUED = [*((path, {**body, "stream": stream}) for stream in (False, True) for path, body in (
    ("/v1/completions", COMPLETION), ("/v1/completions", {**COMPLETION, "n": 2}), ("/v1/chat/completions", CHAT))),
    ("/answer", ANSWER)]


def sigterm(rt: Runtime) -> Callable[[], None]:
    """What SIGTERM does to a serving ``loraswap serve`` (``DrainingServer.handle_exit``: it drains), made ready to
    send at once (building the app takes a while on a busy machine)."""
    server = DrainingServer(uvicorn.Config(create_app(rt=rt)), rt, grace_seconds=0)
    return lambda: server.handle_exit(signal.SIGTERM, None)


@pytest.mark.parametrize("path, body", QUEUED)
def test_a_request_queued_at_a_stop_past_max_queue_wait_is_a_503_saying_the_server_shuts_down(served, path, body):
    """SIGTERM (the service drains) while the request waits in the queue, then its wait runs past
    ``max_queue_wait``: a 503 in the route's error shape, code engine_stopped, saying the service is shutting down,
    without Retry-After (its client retries elsewhere). It was the 429 'the server is past capacity; retry later',
    Retry-After 1, which sent the client back to the server going away (a review: SIGTERM, 7 requests in flight).
    A request queued at the stop and served before its wait runs out is answered whole."""
    with ready_client(served.model_copy(update={"max_queue_wait": 1})) as client, ThreadPoolExecutor(1) as pool:
        rt = client.app.state.runtime
        stop = sigterm(rt)
        with paused(rt.engine):
            pending = pool.submit(client.post, path, json=body)
            wait_until(lambda: rt.engine.queue_depth > 0, "the request queued")
            stop()
            reply = pending.result(30)  # refused as its wait runs out, the engine thread still held
        assert reply.status_code == 503, reply.text
        assert error_message(reply).startswith("the service is shutting down: the request waited 1 s in the queue")
        assert "(the server's LORASWAP_MAX_QUEUE_WAIT), and it will not be served here" in error_message(reply)
        assert "retry" not in error_message(reply) and "retry-after" not in reply.headers
        assert path == "/answer" or reply.json()["error"]["code"] == "engine_stopped"


def test_a_request_queued_at_a_stop_is_served_within_the_drain(served):
    """Queued at SIGTERM (the service drains) and taken before its wait runs out: answered whole, while
    a new request is refused with the same 503 (engine_stopped, no Retry-After)."""
    with ready_client(served) as client, ThreadPoolExecutor(1) as pool:
        rt = client.app.state.runtime
        with paused(rt.engine):
            pending = pool.submit(client.post, "/v1/completions", json=COMPLETION)
            wait_until(lambda: rt.engine.queue_depth > 0, "the request queued")
            sigterm(rt)()
            refused = client.post("/v1/completions", json=COMPLETION)
        reply = pending.result(30)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"], reply.text
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "engine_stopped"), refused.text
    assert error_message(refused).startswith("the service is shutting down") and "retry-after" not in refused.headers


def requests_counted(client: TestClient, endpoint: str, status: str) -> float:
    """Requests to ``endpoint`` answered with ``status``, as /metrics counts them."""
    families = text_string_to_metric_families(client.get("/metrics").text)
    return sum(sample.value for family in families if family.name == "loraswap_request_duration_seconds"
               for sample in family.samples if sample.name.endswith("_count")
               and sample.labels["endpoint"] == endpoint and sample.labels["status"] == status)


def test_a_content_part_of_another_type_is_refused_at_its_type_alone(client):
    """Not also for lacking text and for its own fields: one problem, saying which type is not supported."""
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}
    reply = client.post("/v1/chat/completions", json={**CHAT, "messages": [*CHAT["messages"], image]})
    assert error_message(reply) == ("invalid request: body.messages.1.content.0.type: content parts of type "
                                    "'image_url' are not supported yet; only text parts are")

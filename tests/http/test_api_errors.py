"""Error replies of the HTTP API in process on the tiny GPT-2 and Llama bases.

Unknown adapters are 404; every error reply is in the shape its route promises and documented in the API schema;
invalid input is 422 naming the field; a prompt over max_input_tokens is 413 (one of exactly that many is served);
a full queue answers 429 with Retry-After; task and admin routes answer 503 until the model is loaded, and /ready
reports a failed start.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from service.http.app import create_app
from service.runtime import Runtime
from service.tasks.prompts import answer_prompt
from tests.http.api_helpers import ADMIN_CALLS
from tests.http.replies import error_message
from tests.server_helpers import ADMIN, SQUAD_CONTEXT, SQUAD_QUESTION, ask, ready_client


@pytest.mark.parametrize("method,path,body", [
    ("post", "/answer", {"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION, "adapter": "nope"}),
    ("post", "/nli", {"premise": "A b.", "hypothesis": "C d.", "adapter": "nope"}),
    ("post", "/v1/completions", {"model": "nope", "prompt": "Hello"}),
    ("delete", "/adapters/nope", None),
    ("post", "/adapters/nope/merge", None),
])
def test_unknown_adapter_is_404(client, method, path, body):
    reply = client.request(method, path, json=body, headers=ADMIN)
    assert reply.status_code == 404, reply.text
    assert "'nope'" in error_message(reply)


@pytest.mark.parametrize("method,path,route,body,headers,status", [
    ("post", "/answer", "/answer", {"context": "x", "question": "y", "adapter": "nope"}, {}, 404),
    ("post", "/nli", "/nli", {"premise": "A man sleeps in a chair. " * 200, "hypothesis": "x"}, {}, 413),
    ("post", "/v1/completions", "/v1/completions", b"1\xff\xff", {"content-type": "application/json"}, 400),
    ("post", "/adapters", "/adapters", {"name": "one", "path": "."}, {}, 401),
    ("post", "/adapters", "/adapters", {"name": "x", "path": "/etc"}, ADMIN, 403),
    ("delete", "/adapters/nope", "/adapters/{name}", None, ADMIN, 404),
    ("post", "/adapters/nope/merge", "/adapters/{name}/merge", None, ADMIN, 404),
])
def test_error_replies_are_documented_in_the_api_schema(client, method, path, route, body, headers, status):
    sent = {"content": body} if isinstance(body, bytes) else {"json": body}
    reply = client.request(method, path, headers=headers, **sent)
    assert reply.status_code == status and error_message(reply), reply.text
    documented = client.get("/openapi.json").json()["paths"][route][method]["responses"]
    shape = "OpenAIErrorOut" if route.startswith("/v1/") else "ErrorOut"
    assert documented[str(status)]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{shape}"}


GOOD = {"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION, "adapter": "one"}


@pytest.mark.parametrize("body,field", [
    ({**GOOD, "decoding": {"strategy": "beam"}}, "strategy"),
    ({**GOOD, "decoding": {"strategy": "temperature", "temperature": -1}}, "temperature"),
    ({**GOOD, "decoding": {"temperature": 11}}, "temperature"),
    ({**GOOD, "decoding": {"top_p": 1.5}}, "top_p"),
    ({**GOOD, "decoding": {"top_k": 0}}, "top_k"),
    ({**GOOD, "decoding": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({**GOOD, "decoding": {"seed": -1}}, "seed"),
    ({**GOOD, "decoding": {"beams": 4}}, "beams"),
    ({**GOOD, "question": ""}, "question"),
    ({**GOOD, "question": "   "}, "blank"),
    ({**GOOD, "colour": "red"}, "colour"),
    ({"question": SQUAD_QUESTION}, "context"),
    ({**GOOD, "adapter": 3}, "adapter"),
    ({**GOOD, "decoding": {"seed": False}}, "seed"),  # no coercion: a boolean is not a seed...
    ({**GOOD, "decoding": {"top_k": "5"}}, "top_k"),  # ...nor a string a number
])
def test_invalid_answer_input_is_422(client, body, field):
    reply = client.post("/answer", json=body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"].startswith("invalid request") and field in reply.json()["error"]


@pytest.mark.parametrize("decoding,said", [
    ({"max_new_tokens": 0}, "max_new_tokens 0 is not supported: an answer is generated, at least one token"),
    ({"strategy": "top_k", "top_k": 0}, "top_k 0 is not supported: top_k is how many of the likeliest tokens "
                                        "strategy 'top_k' samples from (transformers takes 0 for all of them: here, "
                                        "strategy 'temperature')")], ids=["max_new_tokens", "top_k"])
def test_a_count_of_0_that_other_servers_take_is_refused_saying_why(client, decoding, said):
    """A review: these were pydantic's bare 'greater than or equal to 1' (as /v1's max_tokens 0 was): 0 means
    something elsewhere (no top-k filtering, in transformers), or nothing here; the 422 says which."""
    reply = client.post("/answer", json={**GOOD, "decoding": decoding})
    assert reply.status_code == 422, reply.text
    assert said in reply.json()["error"] and reply.json()["detail"][0]["type"] == "not_supported"


@pytest.mark.parametrize("path,body", [
    ("/nli", {"premise": "", "hypothesis": "x"}),
    ("/nli", {"premise": "x", "hypothesis": "y", "extra": 1}),
    ("/v1/completions", {"model": "one", "prompt": "x", "n": 0}),
    ("/v1/completions", {"model": "one", "prompt": "x", "temperature": -0.5}),
    ("/v1/completions", {"model": "one", "prompt": "x", "max_tokens": "3"}),
    ("/adapters", {"name": "x"}),
])
def test_invalid_input_elsewhere_is_422(client, path, body):
    reply = client.post(path, json=body, headers=ADMIN)
    assert reply.status_code == 422, reply.text
    assert error_message(reply).startswith("invalid request")


@pytest.mark.parametrize("path,body", [  # /answer: a free answer past one prompt; an extractive one past the windows
    ("/answer", {"context": "Normandy is a region in France. " * 200, "question": SQUAD_QUESTION, "extractive": False}),
    ("/answer", {"context": "Normandy is a region in France. " * 3000, "question": SQUAD_QUESTION}),
    ("/nli", {"premise": "A man sleeps in a chair. " * 200, "hypothesis": "Nobody sleeps."}),
])
def test_input_too_long_is_413(client, path, body):
    reply = client.post(path, json=body)
    assert reply.status_code == 413, reply.text
    assert "tokens" in error_message(reply)


def test_input_too_long_on_v1_is_openais_400_context_length_exceeded(client):
    """As OpenAI's API and vLLM answer a prompt past the context (it was a 413, which OpenAI's Python client raises
    as an APIStatusError of no kind, not its BadRequestError)."""
    reply = client.post("/v1/completions", json={"model": "base", "prompt": "Once upon a time " * 300})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "context_length_exceeded" and "tokens" in error_message(reply)


def test_max_input_tokens_is_the_longest_prompt_accepted(tiny):
    """A prompt of exactly max_input_tokens tokens is served; a longer one is 413 when decoded freely, and answered in
    windows of its context when extractive (the default stride fits them: half their context tokens)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny.base_dir)

    def prompt_tokens(context: str) -> int:
        return len(tokenizer.encode(answer_prompt(context, SQUAD_QUESTION), add_special_tokens=False))

    words = SQUAD_CONTEXT.split()
    n = max(n for n in range(1, len(words)) if prompt_tokens(" ".join(words[:n])) <= 40)
    fits, over = " ".join(words[:n]), " ".join(words[:n + 1])
    limit = prompt_tokens(fits)
    assert prompt_tokens(over) > limit
    with ready_client(tiny.settings(max_input_tokens=limit)) as client:
        assert ask(client, None, context=fits, max_new_tokens=1)["tokens"] == 1
        too_long = ask(client, None, context=over, extractive=False, status=413)
        windowed = ask(client, None, context=over, max_new_tokens=1)
        assert len(asyncio.run(client.app.state.runtime.tasks.answer_windows(over, SQUAD_QUESTION))) > 1
    assert over[windowed["start"]:windowed["end"]] == windowed["answer"]
    assert f"at most {limit}" in too_long["error"]


def test_a_full_queue_answers_429_with_retry_after(tiny):
    """max_queue=1 and a long batch window: the first request waits in the queue for the window, so the
    others find the queue full at once; they get 429 with Retry-After and the first one its answer."""
    with (ready_client(tiny.settings(max_queue=1, batch_window_ms=1500)) as client,
          ThreadPoolExecutor(max_workers=6) as pool):
        replies = list(pool.map(lambda _: client.post("/answer", json={**GOOD, "decoding": {"max_new_tokens": 2}}),
                                range(6)))
    statuses = sorted(reply.status_code for reply in replies)
    assert statuses == [200] + [429] * 5, statuses
    for reply in replies:
        if reply.status_code == 429:
            assert int(reply.headers["Retry-After"]) >= 1
            assert "queue is full" in reply.json()["error"]


def test_503_until_the_model_is_loaded(tiny):
    """Without the lifespan the runtime never starts: task routes answer 503 with Retry-After, /health 200."""
    client = TestClient(create_app(rt=Runtime(tiny.settings())))  # no `with`: startup never runs
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 503 and client.get("/ready").json()["reason"] == "loading"
    for method, path, body in [("post", "/answer", GOOD), ("post", "/nli", {"premise": "a", "hypothesis": "b"}),
                               ("post", "/v1/completions", {"model": "base", "prompt": "x"}),
                               ("get", "/v1/models", None), ("get", "/adapters", None), *ADMIN_CALLS]:
        reply = client.request(method, path, json=body, headers=ADMIN)
        assert reply.status_code == 503, (path, reply.text)
        assert "loading" in error_message(reply) and reply.headers["Retry-After"]


def test_ready_says_when_to_ask_again_only_while_loading(tiny):
    """/ready's 503 while the model loads sent no Retry-After, which the other 503s of a loading service send (1 s);
    while draining it sends none: this server will not be ready again (its clients go elsewhere)."""
    rt = Runtime(tiny.settings())
    client = TestClient(create_app(rt=rt))  # no `with`: startup never runs
    loading = client.get("/ready")
    assert (loading.status_code, loading.json()["reason"], loading.headers.get("Retry-After")) == (503, "loading", "1")
    rt.draining = True
    draining = client.get("/ready")
    assert (draining.status_code, draining.json()["reason"]) == (503, "draining"), draining.text
    assert "retry-after" not in draining.headers and client.get("/health").status_code == 200


def test_a_failed_start_is_reported_by_ready(tiny, tmp_path):
    with TestClient(create_app(tiny.settings(base_model=str(tmp_path / "missing")))) as client:
        for _ in range(200):
            reply = client.get("/ready")
            if reply.json()["reason"] != "loading":
                break
            time.sleep(0.05)
        assert reply.status_code == 503 and "no Hugging Face model directory" in reply.json()["reason"]
        assert "retry-after" not in reply.headers and "retry-after" not in client.get("/health").headers
        assert client.post("/answer", json=GOOD).status_code == 503

"""Fields OpenAI's clients send that change nothing here are taken, as vLLM takes them, and what cannot be honoured is
refused by name: on /v1/chat/completions ``store`` false, ``metadata`` and ``parallel_tool_calls`` (without tools)
were 422s for unknown fields; ``store`` true is refused (nothing is stored). A null ``model`` (required, so it has no
default for null to take) said "Field required", code ``missing``, though it was sent."""
from __future__ import annotations

import openai
import pytest

from tests.http.replies import error_message
from tests.server_helpers import ready_client, settings_in

CHAT = {"model": "one", "messages": [{"role": "user", "content": "Who gave their name to Normandy?"}],
        "max_tokens": 4, "temperature": 0}
COMPLETION = {"model": "one", "prompt": "The Normans gave their name to", "max_tokens": 4, "temperature": 0}
NO_OPS = [("store", False), ("store", None), ("metadata", {}), ("metadata", None),
          ("metadata", {"run": "nightly", "k" * 64: "v" * 512}), ("parallel_tool_calls", False),
          ("parallel_tool_calls", True), ("parallel_tool_calls", None)]
REFUSED = [("store", True, "store: store is not supported yet; only null or false is accepted"),
           ("metadata", {"k" * 65: "v"}, "metadata."), ("metadata", {"k": "v" * 513}, "metadata.k"),
           ("metadata", {f"k{i}": "v" for i in range(17)}, "metadata: Dictionary should have at most 16 items"),
           ("metadata", {"k": 1}, "metadata.k: Input should be a valid string"),
           ("parallel_tool_calls", "no", "parallel_tool_calls: Input should be a valid boolean")]


@pytest.fixture(scope="module")
def client(tiny_llama_dir, llama_adapters, tmp_path_factory):
    with ready_client(settings_in(tmp_path_factory.mktemp("no_ops"), tiny_llama_dir, llama_adapters)) as client:
        yield client


def chat(client, **fields) -> dict:
    reply = client.post("/v1/chat/completions", json={**CHAT, **fields})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"]


@pytest.mark.parametrize("field,value", NO_OPS)
def test_a_chat_field_that_changes_nothing_is_taken(client, field, value):
    assert chat(client, **{field: value}) == chat(client)


@pytest.mark.parametrize("field,value,words", REFUSED)
def test_a_chat_field_that_cannot_be_honoured_is_refused_by_name(client, field, value, words):
    reply = client.post("/v1/chat/completions", json={**CHAT, field: value})
    assert reply.status_code == 422 and reply.json()["error"]["param"].startswith(field), reply.text
    assert f"body.{words}" in error_message(reply)


@pytest.mark.parametrize("route,body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_a_null_model_is_refused_naming_the_model_sent(client, route, body):
    reply = client.post(route, json={**body, "model": None})
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == ("model", "string_type"), error
    assert error_message(reply) == "invalid request: body.model: Input should be a valid string"


def test_the_openai_client_sends_them(client):
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    sent = api.chat.completions.create(**CHAT, store=False, metadata={"run": "nightly"}, parallel_tool_calls=False)
    assert [choice.message.content for choice in sent.choices] == [c["message"]["content"] for c in chat(client)]
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        api.chat.completions.create(**CHAT, store=True)
    assert raised.value.param == "store"


@pytest.mark.parametrize("route,body,field", [
    ("/answer", {"context": None, "question": "Who?"}, "context"),
    ("/nli", {"premise": "A dog runs.", "hypothesis": None}, "hypothesis"),
])
def test_null_for_any_required_field_is_refused_as_its_value(client, route, body, field):
    """The same rule on every route: null takes the default of a field that has one; a required field has none."""
    reply = client.post(route, json=body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"][0]["type"] == "string_type" and f"body.{field}: " in error_message(reply)

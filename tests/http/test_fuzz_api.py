"""Schemathesis over every operation of ``/openapi.json``, in process (ASGI), on a server of the tiny Llama with its
adapters one and two: schema-valid and schema-breaking requests alike get no 5xx, and every reply conforms to the
schema (status codes, content types, bodies, headers, 405s and their Allow header). Admin routes get the admin key.
The server generates at most ``SERVER_CAP`` tokens a request, so the fuzz stays quick."""
from __future__ import annotations

import asyncio
import re
from typing import Annotated

import jsonschema_rs
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import settings
from hypothesis import strategies as st
from pydantic import ConfigDict, TypeAdapter, ValidationError
from schemathesis.python import asgi

from service.http.app import create_app
from service.http.schemas import AnswerIn, ChatCompletionIn, CompletionIn, NliIn
from service.settings import Settings
from tests.server_helpers import ADMIN, ready_client, settings_in

EXAMPLES = 15  # per operation, in the fuzzing phase
CONFIG = schemathesis.Config.from_dict({
    "base-url": f"http://{asgi.HOST}",
    "headers": ADMIN,
    # a schema-valid request may still be refused (422) for what JSON Schema does not say: rules across fields
    # (top_logprobs needs logprobs), the server's caps (max_tokens), adapter names the registry refuses
    "checks": {"positive_data_acceptance": {"enabled": False},
               # schemathesis' refusals, and 413: a body past the server's max_body_bytes is refused before it is read
               "negative_data_rejection": {"expected-statuses": [
                   "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]}},
    # /adapters/unmerge is also DELETE /adapters/{name} of an adapter named "unmerge": its 405's Allow header names
    # DELETE, which OpenAPI (a concrete path before a templated one) does not list there
    "operations": [{"include-path": "/adapters/unmerge", "checks": {"allow_header_conformance": {"enabled": False}}}],
})
# an app never started (no model): the API's schema does not depend on one, nor do 405s
UNSTARTED = create_app(Settings(device="cpu"))
SCHEMA = schemathesis.openapi.from_dict(UNSTARTED.openapi(), config=CONFIG)

SERVED = ("one", "two", "base")  # what the tiny server serves: its adapters and the bare base model
# body fields with a few values that matter most, by route (and its body's model): drawn at random, nearly every
# request names a model or an adapter the server lacks (404), and few stream or ask for logprobs (chat's top_logprobs
# needs them)
FAVOURED = {"/answer": (AnswerIn, {"adapter": SERVED}), "/nli": (NliIn, {"adapter": SERVED}),
            "/v1/completions": (CompletionIn, {"model": SERVED, "stream": (True,)}),
            "/v1/chat/completions": (ChatCompletionIn, {"model": SERVED, "stream": (True,), "logprobs": (True,)})}
ABSENT = object()  # an optional field the body was drawn without


@SCHEMA.hook
def flatmap_body(context, body):
    """Each favoured field that may take a favoured value (``replaceable``) takes one, or stays as drawn."""
    if context.operation.path not in FAVOURED or not isinstance(body, dict):
        return st.just(body)
    model, favoured = FAVOURED[context.operation.path]
    choices = {key: st.sampled_from((*values, body.get(key, ABSENT))) for key, values in favoured.items()
               if replaceable(model, body, key, values[0])}
    return st.fixed_dictionaries(choices).map(
        lambda chosen: {**body, **{key: value for key, value in chosen.items() if value is not ABSENT}})


def replaceable(model, body: dict, key: str, value) -> bool:
    """Whether ``body``'s field ``key`` may take ``value`` and leave the body as valid, or as invalid, as drawn: it
    holds a valid value of the same type (not ``"model": ""``, which breaks the schema's minLength), or is absent and
    optional (pydantic's ``model`` of the body says)."""
    if key in body:
        return type(body[key]) is type(value) and valid(model, key, body[key])
    return not model.model_fields[key].is_required()


def valid(model, key: str, value) -> bool:
    """Whether ``value`` is valid for the field ``key`` of ``model`` (its type and constraints, strictly)."""
    field = model.model_fields[key]
    try:
        TypeAdapter(Annotated[field.annotation, field], config=ConfigDict(strict=True)).validate_python(value)
    except ValidationError:
        return False
    return True


@SCHEMA.hook
def flatmap_path_parameters(context, parameters):
    """Merges name a served adapter, or the drawn name (deletions keep drawn names: the adapters stay registered)."""
    if context.operation.path != "/adapters/{name}/merge" or not isinstance(parameters.get("name"), str):
        return st.just(parameters)
    return st.sampled_from(("one", "two", parameters["name"])).map(lambda name: {**parameters, "name": name})


@pytest.fixture(scope="module")
def session(tiny_llama_dir, llama_adapters, tmp_path_factory):
    """A requests session into a ready tiny server, in process (its lifespan is the fixture's, not schemathesis')."""
    root = tmp_path_factory.mktemp("fuzz")
    with ready_client(settings_in(root, tiny_llama_dir, llama_adapters, qa_adapter="one", nli_adapter="two")) as client:
        yield asgi.get_client(client.app)


@SCHEMA.parametrize()
@settings(max_examples=EXAMPLES, deadline=None)
def test_no_request_gets_a_5xx_and_every_reply_conforms_to_the_schema(case, session):
    case.call_and_validate(session=session)


@pytest.mark.parametrize("method,path,allowed", [
    ("OPTIONS", "/adapters", "GET, HEAD, POST"),  # Starlette's named only GET, the method of the first route there
    ("PUT", "/adapters/unmerge", "POST, DELETE"),  # POST /adapters/unmerge, DELETE /adapters/{name}
    ("DELETE", "/health", "GET, HEAD"),
    ("GET", "/v1/completions", "POST"),
    ("HEAD", "/v1/completions", "POST"),
])
def test_a_405_names_every_method_its_path_takes(method, path, allowed):
    """Found by the fuzz (RFC 9110: a 405's Allow header lists the methods the resource supports)."""
    reply = TestClient(UNSTARTED).request(method, path)
    assert (reply.status_code, reply.headers["allow"]) == (405, allowed)


# every route of the app by every method it takes, its path parameters filled in: the API's, and the documentation's
EVERY_ROUTE = [(method.upper(), re.sub(r"{[^}]+}", "one", path))
               for path, operations in UNSTARTED.openapi()["paths"].items() for method in operations] + [
    (method, route.path) for route in UNSTARTED.routes if hasattr(route, "methods") for method in sorted(route.methods)]


@pytest.mark.parametrize("method,path", EVERY_ROUTE)
def test_a_trailing_slash_is_a_json_404_not_a_redirect(method, path):
    """A review: GET /v1/models/, DELETE /adapters/ and the like got Starlette's empty 307 to the path without the
    slash (which a client may follow with another method, or not at all); no route takes the slash: a 404 in the
    route's error shape, as every unknown path (``redirect_slashes=False``)."""
    reply = TestClient(UNSTARTED).request(method, f"{path}/", follow_redirects=False)
    assert reply.status_code == 404 and "location" not in reply.headers, (reply.status_code, reply.headers)
    if method != "HEAD":
        error = reply.json()["error"]
        assert (error["message"] if path.startswith("/v1/") else error) == "Not Found", reply.text


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/adapters", "/v1/models", "/v1/models/base",
                                  "/openapi.json"])
def test_head_is_answered_as_get_without_the_body(path):
    """A load balancer's HEAD /health, curl -I: a 405 on every GET route FastAPI made (a review). On an app never
    started: /ready, /adapters and /v1/models answer 503 (loading), with Retry-After where GET sends it."""
    client = TestClient(UNSTARTED)
    got, head = client.get(path), client.head(path)
    assert head.status_code == got.status_code and head.content == b"", head
    ignored = {"content-length"} if path == "/metrics" else set()  # the metrics change between the two requests
    assert {k: v for k, v in head.headers.items() if k not in ignored} == \
        {k: v for k, v in got.headers.items() if k not in ignored}


def test_head_leaves_the_servers_scope_a_head():
    """The server reads the scope's method as the reply is sent: uvicorn took a HEAD run as GET in place for a GET,
    and failed its empty body ("Response content shorter than Content-Length")."""
    scope = {"type": "http", "method": "HEAD", "path": "/health", "raw_path": b"/health", "query_string": b"",
             "headers": [], "http_version": "1.1", "scheme": "http", "root_path": "", "server": ("test", 80)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    asyncio.run(UNSTARTED(scope, receive, send))
    assert scope["method"] == "HEAD" and sent[0]["status"] == 200
    assert b"".join(message.get("body", b"") for message in sent[1:]) == b""


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "one", "prompt": "The game", "stream": True, "max_tokens": 4}),
    ("/v1/chat/completions", {"model": "two", "messages": [{"role": "user", "content": "Hi"}], "stream": True}),
])
def test_streamed_replies_conform_to_the_schema(session, path, body):
    """Found by the fuzz: each server-sent event was documented as a string, not as the event (its data) it is."""
    reply = SCHEMA[path]["POST"].Case(body=body).call_and_validate(session=session)
    assert reply.headers["content-type"][0].startswith("text/event-stream") and reply.text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("prompt", ["x", ["x"], "", [], [""], ["x", "y"], "x" * 100_001],
                         ids=["text", "list of one", "empty", "empty list", "list of empty", "list of two", "too long"])
def test_the_documented_prompt_is_the_prompt_the_server_takes(prompt):
    """Found by the fuzz: the schema documented any string or list of strings as a prompt, "" and [] too."""
    documented = UNSTARTED.openapi()["components"]["schemas"]["CompletionIn"]["properties"]["prompt"]
    assert jsonschema_rs.validator_for(documented).is_valid(prompt) == taken(prompt)


def taken(prompt) -> bool:
    """Whether the server's validation takes ``prompt``."""
    try:
        CompletionIn(model="one", prompt=prompt)
    except ValidationError:
        return False
    return True

"""Input a fresh user sends that the server must refuse cleanly or take as documented: lone surrogates in any string
(``"\\ud800"``: valid JSON, not encodable as UTF-8), bodies past the size limit (declared or chunked), fields of a
megabyte echoed in error replies, bodies that are not JSON (400 on every POST route), ``bearer`` in lower case,
temperature 0 on /answer, the metric label of a request no adapter served, and adapter roots as a plain path."""
from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import TypeAdapter, ValidationError

from service.cli.main import build_parser, settings_from
from service.http.app import NO_ADAPTER_LABEL, create_app
from service.http.errors import ECHO_LIMIT, LISTED_PROBLEMS, MESSAGE_LIMIT
from service.http.keys import bearer_of
from service.http.schemas import DecodingIn, Float
from service.settings import Settings
from service.strict_json import PAST_ANY_BOUND
from tests.http.replies import error_message, settings_by_field
from tests.http.test_hostile_json import ADAPTER, ANSWER, COMPLETION, LONG, MARK, NLI, assert_refused, post, with_raw
from tests.server_helpers import (
    ADMIN,
    ADMIN_KEY,
    copy_adapters,
    listed,
    scrape,
    settings_in,
    value,
    wait_ready,
)

LIMIT = 2**21  # the test server's max_body_bytes: bodies of a few megabytes stay quick to send
CHAT = {"model": "one", "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 2, "user": "u", "stop": ["x"]}
BODIES = {"/answer": ANSWER, "/nli": NLI, "/v1/completions": {**COMPLETION, "stop": ["\n"], "suffix": None},
          "/v1/chat/completions": CHAT, "/adapters": ADAPTER,
          "/v1/load_lora_adapter": {"lora_name": "three", "lora_path": "/nowhere"},
          "/v1/unload_lora_adapter": {"lora_name": "nope"}}
NO_BODY = ["/adapters/one/merge", "/adapters/unmerge"]
POST_ROUTES = [*BODIES, *NO_BODY]
DURATION = "loraswap_request_duration_seconds_count"


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Two adapter roots; the second holds an adapter named ``three``."""
    return tmp_path_factory.mktemp("root_a"), tmp_path_factory.mktemp("root_b")


@pytest.fixture(scope="module")
def client(tiny_gpt2_dir, gpt2_adapters, roots, tmp_path_factory):
    """A server whose adapter roots come from LORASWAP_ADAPTER_ROOTS as two plain paths, and whose body limit is
    ``LIMIT``; ``client.app`` is its running app."""
    copy_adapters({"three": gpt2_adapters["one"]}, roots[1])
    root = tmp_path_factory.mktemp("hostile_input")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LORASWAP_ADAPTER_ROOTS", os.pathsep.join(map(str, roots)))
        settings = settings_in(root, tiny_gpt2_dir, gpt2_adapters, max_body_bytes=LIMIT)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client.get)
        yield client


def paths(body, kind: type, path: tuple = ()) -> Iterator[tuple]:
    """The path of every value of ``kind`` in ``body``, itself included (keys of dicts, indices of lists)."""
    if isinstance(body, kind):
        yield path
    items = body.items() if isinstance(body, dict) else enumerate(body) if isinstance(body, list) else ()
    for key, inner in items:
        yield from paths(inner, kind, (*path, key))


STRING_FIELDS = [(route, path) for route, body in BODIES.items() for path in paths(body, str)]
def numbers(spec: dict, schema: dict, path: tuple = ()) -> Iterator[tuple]:
    """The path of every number or integer a body of ``schema`` may hold (its ``$ref``s read in OpenAPI ``spec``): in
    an object's properties, a union's members, a map's values (under the key ``"5"``) and an array's items (at 0)."""
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    if schema.get("type") in ("number", "integer"):
        yield path
    for member in schema.get("anyOf", ()):
        yield from numbers(spec, member, path)
    for name, inner in schema.get("properties", {}).items():
        yield from numbers(spec, inner, (*path, name))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from numbers(spec, schema["additionalProperties"], (*path, "5"))
    if "items" in schema:
        yield from numbers(spec, schema["items"], (*path, 0))


SPEC = create_app(Settings(device="cpu")).openapi()  # the API's schema needs no model
NUMBER_FIELDS = list(dict.fromkeys(
    (route, path) for route in BODIES for path in numbers(
        SPEC, SPEC["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"])))


SURROGATES = ['"\\ud800"', '"a\\udc80b"', '"\\udfff\\ud800"', '"ok \\ude00"']  # lone high, low (surrogateescape's)


def strict_json(reply: httpx.Response) -> dict:
    """The reply's body: UTF-8 JSON without NaN (what any client can read)."""
    return json.loads(reply.content.decode("utf-8"), parse_constant=lambda constant: pytest.fail(constant))


@pytest.mark.parametrize("route,path", STRING_FIELDS, ids=lambda part: ".".join(map(str, part))
                         if isinstance(part, tuple) else part)
def test_a_lone_surrogate_in_any_string_is_422_naming_the_field(client, route, path):
    before = listed(client)
    for raw in SURROGATES:
        reply = post(client, route, with_raw(BODIES[route], path, raw))
        error = assert_refused(reply, 422)
        assert "body." + str(path[0]) in error and str(path[-1]) in error, error
        strict_json(reply)
    assert listed(client) == before


OBJECTS = [(route, path) for route, body in {**BODIES, **{route: {} for route in NO_BODY}}.items()
           for path in paths(body, dict)]


@pytest.mark.parametrize("route,path", OBJECTS, ids=lambda part: ".".join(map(str, part))
                         if isinstance(part, tuple) else part)
def test_a_lone_surrogate_in_any_key_is_422_naming_the_key(client, route, path):
    """A review: such a key was refused as the whole body ("unable to parse raw data as a unicode string", no param),
    or named with a U+FFFD for each of its bytes (in logit_bias); now named, spelt with its escapes."""
    before = listed(client)
    for raw in SURROGATES:
        body = json.loads(json.dumps(BODIES.get(route, {})))
        inner = body
        for key in path:
            inner = inner[key]
        inner[MARK] = 1
        reply = post(client, route, json.dumps(body).replace(json.dumps(MARK), raw).encode())
        error = assert_refused(reply, 422)
        field = ".".join(map(str, (*path, json.loads(raw).encode("utf-8", "backslashreplace").decode("utf-8"))))
        assert f"body.{field}: A key should be text that UTF-8 can encode, not a lone surrogate" in error, error
        if route.startswith("/v1/"):
            assert strict_json(reply)["error"]["param"] == field, reply.text
        strict_json(reply)
    assert listed(client) == before


def test_a_surrogate_pair_is_one_character_and_served(client):
    """The escapes of a character beyond the BMP (an emoji) are a pair, not lone surrogates: taken as that character."""
    for route, path in [("/answer", ("question",)), ("/nli", ("hypothesis",)), ("/v1/completions", ("prompt",)),
                        ("/v1/chat/completions", ("messages", 1, "content", 0, "text"))]:
        reply = post(client, route, with_raw(BODIES[route], path, '"Who \\ud83d\\ude00 won?"'))
        assert reply.status_code == 200, (route, reply.text)


@pytest.mark.parametrize("route", POST_ROUTES)
def test_error_replies_echo_what_was_sent_encodable_and_bounded(client, route):
    """A surrogate or a megabyte in a key, a name or a field comes back escaped and cut; a thousand problems list
    ``LISTED_PROBLEMS``: every error reply is UTF-8 JSON of a few kilobytes."""
    body = BODIES.get(route, {})
    huge = "x" * 2**20
    sent = [{**body, "\ud800": 1}, {**body, huge: 1}, {**body, **{f"k{i}": i for i in range(1000)}}]
    sent += [{**body, key: huge} for key in ("adapter", "model", "name", "lora_name", "context", "prompt")
             if key in body]
    for content in sent:
        reply = post(client, route, json.dumps(content).encode())
        assert 400 <= reply.status_code < 500 and len(reply.content) < 4 * MESSAGE_LIMIT, (route, reply.text[:500])
        error = strict_json(reply)["error"]
        assert len(error if isinstance(error, str) else error["message"]) <= MESSAGE_LIMIT + 50
        for problem in strict_json(reply).get("detail", []):
            assert all(len(part) <= ECHO_LIMIT + 50 for part in [*problem["loc"], problem.get("input")]
                       if isinstance(part, str)), problem
        assert len(strict_json(reply).get("detail", [])) <= LISTED_PROBLEMS


def placed(body: dict, path: tuple, raw: str) -> bytes:
    """``body`` with the field at ``path`` written as ``raw`` (``with_raw``), the objects on its way made where the body
    has none (``logit_bias`` of a chat request)."""
    body = json.loads(json.dumps(body))
    inner = body
    for key in path[:-1]:
        inner = inner.setdefault(key, {}) if isinstance(inner, dict) and inner.get(key) is None else inner[key]
    return with_raw(body, path, raw)


def refusal(reply: httpx.Response) -> dict:
    """A 422's body without the values it echoes (``input``)."""
    assert reply.status_code == 422, reply.text
    body = strict_json(reply)
    return {**body, "detail": [{k: v for k, v in problem.items() if k != "input"}
                               for problem in body.get("detail", [])]}


@pytest.mark.parametrize("route,path", NUMBER_FIELDS, ids=lambda part: ".".join(map(str, part))
                         if isinstance(part, tuple) else part)
def test_an_integer_past_python_is_refused_in_any_number_field_as_2_70_is(client, route, path):
    """An integer of more digits than Python converts (``strict_json.PAST_ANY_BOUND``) in every number or integer field
    of every route's schema: the same 422 as ``2**70`` of its sign, naming the field and its bound (a review: a float
    field, /answer's decoding.temperature, said "Input should be a valid number")."""
    for past, neighbour in ((LONG, 2**70), (f"-{LONG}", -2**70)):
        assert refusal(post(client, route, placed(BODIES[route], path, past))) == refusal(
            post(client, route, placed(BODIES[route], path, str(neighbour)))), (route, path, past[0])


def test_an_integer_past_every_float_is_not_a_finite_number_where_no_bound_refuses_it():
    """A float field without a bound takes no integer past the largest float as that float: refused as 1e400 is."""
    for past in (2**1100, -2**1100, PAST_ANY_BOUND):
        with pytest.raises(ValidationError, match="Input should be a finite number"):
            TypeAdapter(Float).validate_python(past, strict=True)
    assert TypeAdapter(Float).validate_python(2**70) == 2.0**70


def test_a_lone_surrogate_in_an_adapter_in_the_url_is_a_plain_422(client):
    """A name in the URL is percent-encoded bytes, decoded with replacement: an invalid sequence is no surrogate, and
    the name it decodes to, not a plain identifier, is refused as registering it is."""
    for method, url in [("delete", "/adapters/%ED%A0%80"), ("post", "/adapters/%ED%A0%80/merge")]:
        reply = client.request(method, url, headers=ADMIN)
        assert reply.status_code == 422 and "not a plain identifier" in strict_json(reply)["error"], reply.text


# ---- the body limit ------------------------------------------------------------------------------


def padded(route: str, size: int) -> bytes:
    """The route's body as JSON followed by spaces: ``size`` bytes in all."""
    content = json.dumps(BODIES.get(route, {})).encode()
    return content + b" " * (size - len(content))


@pytest.mark.parametrize("route", POST_ROUTES)
def test_a_body_over_the_limit_is_413_one_at_the_limit_is_read(client, route):
    """The body at the limit is served (which may load its adapter into a slot, or merge it), the one past it
    refused, changing nothing (compared after the first: it was run alone, the adapter's first load changed it)."""
    at_limit = post(client, route, padded(route, LIMIT))
    assert at_limit.status_code != 413, at_limit.text
    post(client, "/adapters/unmerge", b"")
    before = listed(client)
    message = assert_refused(post(client, route, padded(route, LIMIT + 1)), 413)
    assert f"{LIMIT} bytes (its LORASWAP_MAX_BODY_BYTES)" in message and settings_by_field(message) == []
    assert listed(client) == before


async def sent_to(app, route: str, chunks: AsyncIterator[bytes], headers: dict) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.post(route, content=chunks, headers={**ADMIN, "content-type": "application/json",
                                                                  **headers})


class Chunks:
    """A body sent in ``count`` chunks of ``size`` bytes (valid JSON if read whole), counting those read."""

    def __init__(self, count: int, size: int = 2**16):
        self.count, self.size, self.read = count, size, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for index in range(self.count):
            self.read += 1
            yield b"{" if index == 0 else b"}" if index == self.count - 1 else b" " * self.size


@pytest.mark.parametrize("route", POST_ROUTES)
def test_a_chunked_body_is_refused_once_it_passes_the_limit(client, route):
    """No Content-Length: the body is counted as it arrives, and refused at the chunk that passes the limit."""
    before = listed(client)
    chunks = Chunks(count=4 * LIMIT // 2**16)
    reply = asyncio.run(sent_to(client.app, route, chunks, {}))
    assert_refused(reply, 413)
    assert chunks.read <= LIMIT // 2**16 + 2, chunks.read
    assert listed(client) == before


@pytest.mark.parametrize("route", ["/answer", "/v1/completions", "/adapters"])
def test_a_declared_length_over_the_limit_is_refused_before_a_byte_is_read(client, route):
    chunks = Chunks(count=8)
    reply = asyncio.run(sent_to(client.app, route, chunks, {"content-length": str(LIMIT + 1)}))
    assert_refused(reply, 413)
    assert chunks.read == 0


def test_the_api_schema_documents_400_413_and_415_where_a_body_is_read(client):
    paths = client.get("/openapi.json").json()["paths"]
    for route in POST_ROUTES:
        documented = paths[route.replace("/one/", "/{name}/")]["post"]["responses"]
        assert {"400", "413", "415"} <= set(documented), route


def test_the_limit_is_a_setting_and_a_flag():
    assert Settings().max_body_bytes == 4 * 2**20
    assert settings_from(build_parser().parse_args(["serve", "--max-body-bytes", "1000"])).max_body_bytes == 1000


# ---- bodies that are not JSON ------------------------------------------------------------------


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("content", [b"{", b'{"a": }', b"nul", b'{"a": 1,}', b"\xff\xfe{}", b"[" * 100_000],
                         ids=["open", "no value", "nul", "trailing comma", "not utf-8", "deep"])
def test_a_body_that_is_not_json_is_400(client, route, content):
    assert_unreadable(client, route, content, "cannot be read as JSON")


@pytest.mark.parametrize("route", BODIES)
def test_an_empty_body_is_400_as_text_that_is_not_json(client, route):
    """A review: FastAPI took it for a body not sent, a 422 'body: Field required'; the README says 400."""
    assert_unreadable(client, route, b"", "cannot be read as JSON: the body is empty")


def assert_unreadable(client, route: str, content: bytes, words: str) -> None:
    """``content`` sent to ``route`` is a 400 saying ``words`` (code json_invalid on ``/v1``) that changes nothing."""
    before = listed(client)
    reply = post(client, route, content)
    assert words in assert_refused(reply, 400)
    if route.startswith("/v1/"):
        assert reply.json()["error"]["code"] == "json_invalid"
    assert listed(client) == before


@pytest.mark.parametrize("route", NO_BODY)
def test_an_empty_body_is_no_body_where_a_route_takes_none(client, route):
    assert post(client, route, b"").status_code != 400


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("compressed", [True, False])
def test_a_body_sent_compressed_is_415(client, route, compressed):
    """A review: Content-Encoding was not read: gzip's bytes were a 400 (not JSON), a plain body so labelled served."""
    before = listed(client)
    body = json.dumps(BODIES.get(route, {})).encode()
    reply = client.post(route, content=gzip.compress(body) if compressed else body, headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip", **ADMIN})
    assert "Content-Encoding gzip is not taken" in assert_refused(reply, 415)
    assert listed(client) == before


@pytest.mark.parametrize("headers,status", [
    ([("content-encoding", "identity"), ("content-encoding", "gzip")], 415),  # a review: the first header decided
    ([("content-encoding", "identity, gzip")], 415),
    ([("content-encoding", "identity"), ("content-encoding", "identity")], 200),
    ([("content-encoding", "identity,identity")], 200),
    ([("content-encoding", "")], 200),  # an empty list of codings: none
])
def test_every_content_encoding_header_is_read(client, headers, status):
    reply = client.post("/v1/completions", content=json.dumps(COMPLETION).encode(),
                        headers=[("content-type", "application/json"), *headers])
    assert reply.status_code == status, reply.text


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_a_json_body_sent_as_another_media_type_is_415(client, route, content_type):
    """Said so, where FastAPI's own refusal was a 422 'Input should be a valid dictionary'."""
    before = listed(client)
    reply = post(client, route, json.dumps(BODIES.get(route, {})).encode(), content_type)
    assert "Content-Type: application/json" in assert_refused(reply, 415)
    assert listed(client) == before


# ---- the admin key -----------------------------------------------------------------------------


@pytest.mark.parametrize("route,method", [("/adapters", "GET"), ("/adapters", "POST"), ("/answer", "POST"),
                                          ("/v1/models", "GET")])
def test_authorization_sent_twice_is_400_whichever_comes_first(client, route, method):
    """A review: the first header decided (wrong then right: 401; right then wrong: 200)."""
    before = listed(client)
    for keys in (["wrong", ADMIN_KEY], [ADMIN_KEY, "wrong"]):
        headers = [("authorization", f"Bearer {key}") for key in keys] + [("content-type", "application/json")]
        reply = client.request(method, route, content=json.dumps(BODIES.get(route, {})).encode(), headers=headers)
        assert "Authorization is sent more than once" in assert_refused(reply, 400)
    assert listed(client) == before


@pytest.mark.parametrize("route", [*POST_ROUTES, "/v1/models"])
def test_content_type_sent_twice_is_400_whichever_comes_first(client, route):
    """A review: the first header decided (JSON then text: served; text then JSON: a 415); the same value twice too.
    Refused by the dependency that refuses Authorization twice, before any route reads the body."""
    before, method = listed(client), "GET" if route == "/v1/models" else "POST"
    for media in (["application/json", "text/plain"], ["text/plain", "application/json"], ["application/json"] * 2):
        headers = [*ADMIN.items(), *(("content-type", value) for value in media)]
        reply = client.request(method, route, content=json.dumps(BODIES.get(route, {})).encode(), headers=headers)
        assert "Content-Type is sent more than once" in assert_refused(reply, 400)
    assert listed(client) == before


def test_the_bearer_scheme_is_case_insensitive_the_key_is_not(client):
    """The scheme in any case, then one space or more (RFC 9110 11.4: ``1*SP``; a review: two were a 401)."""
    for scheme in ("bearer", "BEARER", "bEaReR"):
        for spaces in (" ", "  ", " " * 7):
            assert bearer_of(f"{scheme}{spaces}{ADMIN_KEY}", ADMIN_KEY)
            reply = client.post("/adapters/unmerge", headers={"Authorization": f"{scheme}{spaces}{ADMIN_KEY}"})
            assert reply.status_code == 200, reply.text
    for wrong in (f"bearer {ADMIN_KEY.upper()}", f"bearer{ADMIN_KEY}", f"bearers {ADMIN_KEY}", f"basic {ADMIN_KEY}",
                  f"bearer\t{ADMIN_KEY}", f"bearer \t{ADMIN_KEY}", "bearer ", "bearer   ", f"bearer  {ADMIN_KEY}x"):
        assert not bearer_of(wrong, ADMIN_KEY)
        assert client.post("/adapters/unmerge", headers={"Authorization": wrong}).status_code == 401


# ---- temperature 0 -----------------------------------------------------------------------------


def test_temperature_0_on_answer_is_greedy_whatever_the_strategy(client):
    def answer(**decoding) -> str:
        reply = client.post("/answer", json={**ANSWER, "decoding": {"max_new_tokens": 6, **decoding}})
        assert reply.status_code == 200, reply.text
        return reply.json()["answer"]

    greedy = answer(strategy="greedy")
    for strategy, seed in [("temperature", 1), ("temperature", 2), ("top_k", 3), ("nucleus", 4)]:
        assert answer(strategy=strategy, temperature=0, seed=seed) == greedy, strategy


@pytest.mark.parametrize("decoding,field", [
    ({"strategy": "greedy", "top_k": 5}, "top_k"),
    ({"top_p": 0.5}, "top_p"),  # the strategy's default is greedy
    ({"strategy": "greedy", "temperature": 0.7}, "temperature"),
    ({"strategy": "greedy", "temperature": 0, "top_k": 5}, "top_k"),
    ({"strategy": "top_k", "top_p": 0.5}, "top_p"),
    ({"strategy": "nucleus", "top_k": 5}, "top_k"),
    ({"strategy": "temperature", "top_k": 5, "temperature": 0.5}, "top_k"),
    ({"strategy": "temperature", "top_p": 0.5}, "top_p"),
    ({"strategy": "greedy", "temperature": 0, "seed": 3}, "seed"),
    ({"seed": 3, "max_new_tokens": 2}, "seed"),  # the strategy's default is greedy
])
def test_a_sampling_parameter_the_strategy_does_not_read_is_422_naming_it(client, decoding, field):
    """It was taken and dropped: top_k with greedy answered greedily, with no word of it."""
    reply = client.post("/answer", json={**ANSWER, "decoding": decoding})
    assert reply.status_code == 422, reply.text
    problem = reply.json()["detail"][0]
    assert problem["loc"] == ["body", "decoding", field], problem
    assert problem["msg"].startswith(f"{field} is not read by strategy"), problem


# what each strategy reads, spelled out here (not from strategies.READ_BY): a seed only where tokens are drawn
READS = {"greedy": set(), "top_k": {"temperature", "top_k", "seed"}, "nucleus": {"temperature", "top_p", "seed"},
         "temperature": {"temperature", "seed"}}
A_VALUE = {"temperature": 0.5, "top_k": 5, "top_p": 0.5, "seed": 3}  # none a default


@pytest.mark.parametrize("strategy", READS)
@pytest.mark.parametrize("parameter", A_VALUE)
def test_every_parameter_of_every_strategy_is_read_or_refused_by_name(client, strategy, parameter):
    """Every strategy by every parameter: taken where the strategy reads it, else a 422 naming it (a review: a seed
    with greedy, which draws nothing, was taken and dropped without a word, as top_k was before)."""
    decoding = {"strategy": strategy, parameter: A_VALUE[parameter], "max_new_tokens": 2}
    reply = client.post("/answer", json={**ANSWER, "decoding": decoding})
    if parameter in READS[strategy]:
        assert reply.status_code == 200, reply.text
        return
    assert reply.status_code == 422, reply.text
    problem = reply.json()["detail"][0]
    assert problem["loc"] == ["body", "decoding", parameter] and problem["msg"].startswith(
        f"{parameter} is not read by strategy '{strategy}', which "), problem


def test_each_parameter_greedy_does_not_read_is_named_at_its_field(client):
    """A review: the refusal stood at ``decoding`` and named the first only. In the order of the fields, as pydantic
    orders its own errors."""
    decoding = {"strategy": "greedy", **A_VALUE}
    reply = client.post("/answer", json={**ANSWER, "decoding": decoding})
    assert reply.status_code == 422, reply.text
    assert [problem["loc"] for problem in reply.json()["detail"]] == [["body", "decoding", name] for name in
                                                                      DecodingIn.model_fields if name in A_VALUE]


@pytest.mark.parametrize("route,faults,fields", [
    ("/answer", {"decoding": {"strategy": "greedy", "seed": 5, "max_new_tokens": 0}},
     ["decoding.max_new_tokens", "decoding.seed"]),
    ("/answer", {"adapter": 5, "decoding": {"strategy": "greedy", "top_k": 5, "max_new_tokens": 10**6}},
     ["adapter", "decoding.top_k", "decoding.max_new_tokens"]),
    ("/answer", {"decoding": {"strategy": "top_k", "top_p": 0.5, "temperature": -1}},
     ["decoding.temperature", "decoding.top_p"]),
    ("/v1/completions", {"max_tokens": 10**6, "temperature": -1, "n": 100},
     ["max_tokens", "temperature", "n"]),
    ("/v1/completions", {"max_tokens": 10**6, "n": 2, "best_of": 3, "echo": True, "logprobs": 2, "suffix": "x"},
     ["max_tokens", "best_of", "logprobs", "suffix"]),
    ("/v1/chat/completions", {"n": 100, "max_completion_tokens": 10**6, "top_logprobs": 3, "stop": ""},
     ["n", "stop", "max_completion_tokens", "top_logprobs"]),
    # a check across fields says nothing of a field that is itself at fault: best_of is n, the stream and logprobs
    # are asked for
    ("/v1/completions", {"n": 100, "best_of": 100}, ["n"]),
    ("/v1/completions", {"stream": "yes", "stream_options": {"include_usage": True}}, ["stream"]),
    ("/v1/chat/completions", {"logprobs": 1, "top_logprobs": 2}, ["logprobs"]),
])
def test_every_fault_of_a_request_is_named_in_one_422_at_its_field(client, route, faults, fields):
    """A review: the checks after the schema's (a strategy reading each parameter given, the server's caps on
    max_new_tokens, max_tokens and n) ran once every field was valid, so a client fixing one fault met the next.
    Each fault at its own field, in the order of the fields; nothing changes."""
    before = listed(client)
    reply = post(client, route, json.dumps({**BODIES[route], **faults}).encode())
    assert reply.status_code == 422, reply.text
    message = error_message(reply)
    assert re.findall(r"body\.([\w.]+): ", message) == fields, message
    if route == "/answer":
        assert [".".join(problem["loc"][1:]) for problem in reply.json()["detail"]] == fields
    assert listed(client) == before


@pytest.mark.parametrize("decoding", [
    {"strategy": "greedy", "temperature": 0}, {"strategy": "top_k", "top_k": 5, "temperature": 0.5},
    {"strategy": "nucleus", "top_p": 0.5, "temperature": 0.5}, {"strategy": "temperature", "temperature": 0.5},
    {"strategy": "top_k", "top_k": 5}, {"strategy": "nucleus"}])
def test_the_parameters_a_strategy_reads_are_taken(client, decoding):
    reply = client.post("/answer", json={**ANSWER, "decoding": {**decoding, "max_new_tokens": 2}})
    assert reply.status_code == 200, reply.text


# ---- the metric label of a request no adapter served -------------------------------------------


def test_a_request_no_adapter_served_is_not_counted_as_the_base_models(client):
    before = scrape(client)
    unknown = [("/answer", {**ANSWER, "adapter": "nope"}), ("/nli", {**NLI, "adapter": "nope"}),
               ("/v1/completions", {**COMPLETION, "model": "nope"}),
               ("/v1/chat/completions", {**CHAT, "model": "nope"})]
    for route, body in unknown:
        assert client.post(route, json=body).status_code == 404
    assert client.post("/answer", json={**ANSWER, "colour": "red"}).status_code == 422
    base = {**ANSWER, "adapter": None, "decoding": {"max_new_tokens": 2}}
    assert client.post("/answer", json=base).status_code == 200
    after = scrape(client)

    def moved(route: str, adapter: str, status: str) -> float:
        labels = {"endpoint": route, "adapter": adapter, "status": status}
        return value(after, DURATION, **labels) - value(before, DURATION, **labels)

    for route, _ in unknown:
        assert (moved(route, NO_ADAPTER_LABEL, "404"), moved(route, "none", "404")) == (1, 0), route
    assert (moved("/answer", NO_ADAPTER_LABEL, "422"), moved("/answer", "none", "422")) == (1, 0)
    assert moved("/answer", "none", "200") == 1


# ---- adapter roots from the environment --------------------------------------------------------


def test_adapter_roots_from_the_environment_as_plain_paths(client, roots):
    reply = client.post("/adapters", json={"name": "three", "path": str(roots[1] / "three")}, headers=ADMIN)
    assert reply.status_code == 201, reply.text
    assert client.delete("/adapters/three", headers=ADMIN).status_code == 200


@pytest.mark.parametrize("text,paths", [
    ("/a", ["/a"]), (f"/a{os.pathsep}/b", ["/a", "/b"]), (f"/a{os.pathsep}", ["/a"]), ("", []),
    ('["/a", "/b"]', ["/a", "/b"]), ("[]", []), ("/with space", ["/with space"]),
])
def test_adapter_roots_read_from_text(monkeypatch, text, paths):
    monkeypatch.setenv("LORASWAP_ADAPTER_ROOTS", text)
    assert Settings().adapter_roots == [Path(p) for p in paths]


def test_adapter_roots_from_flags_are_taken_as_they_are():
    flags = build_parser().parse_args(["serve", "--adapter-roots", "/x", "/y"])  # a list already
    assert settings_from(flags).adapter_roots == [Path("/x"), Path("/y")]


@pytest.mark.parametrize("text", ["[1", "{not json", '{"a": 1}', "[1, 2]"])
def test_adapter_roots_that_look_like_json_but_are_not_a_list_are_refused(monkeypatch, text):
    monkeypatch.setenv("LORASWAP_ADAPTER_ROOTS", text)
    with pytest.raises(ValueError, match="adapter_roots"):
        Settings()


@pytest.mark.parametrize("route", [*POST_ROUTES, "/adapters/one"])
def test_a_query_parameter_no_route_reads_is_422_naming_it(client, route):
    """As an unknown body field is (a review: ``POST /answer?adapter=nli`` was served by the default adapter, the
    parameter dropped without a word); the registry is left as it was (a DELETE too)."""
    before = listed(client)
    body = json.dumps(BODIES[route]).encode() if route in BODIES else b""
    method = "POST" if route in POST_ROUTES else "DELETE"
    reply = client.request(method, f"{route}?adapter=nli&adapter=one&x=", content=body,
                           headers={**ADMIN, "content-type": "application/json"})
    error = assert_refused(reply, 422)
    assert error.count("query.adapter") == 1 and "query.x" in error, reply.text  # a name given twice named once
    assert listed(client) == before


@pytest.mark.parametrize("route", ["/health", "/ready", "/metrics", "/v1/models", "/adapters"])
def test_a_get_is_answered_whatever_its_query(client, route):
    """A GET reads nothing from its request: a probe or a scrape configured with parameters is answered as ever."""
    assert client.get(f"{route}?x=1", headers=ADMIN).status_code == 200

"""Bodies no JSON encoder writes: NaN, Infinity, 1e400, numbers past every bound, bodies that are not JSON, not
UTF-8 or not an object, deep nesting. Each POST route answers them with a 4xx in the documented JSON shape (an
error message, in OpenAI's shape on /v1/*; a reply that is itself valid JSON), and nothing changes."""
from __future__ import annotations

import json
import re

import pytest

from service.http.errors import ECHO_LIMIT
from tests.http.replies import error_message
from tests.server_helpers import (
    ADMIN,
    SQUAD_CONTEXT,
    SQUAD_QUESTION,
    listed,
    ready_client,
    settings_in,
)

ANSWER = {"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION, "adapter": "one", "extractive": True,
          "decoding": {"strategy": "nucleus", "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 4,
                       "seed": 1}}
NLI = {"premise": "A man plays a guitar.", "hypothesis": "A person makes music.", "adapter": "two"}
COMPLETION = {"model": "one", "prompt": "Hello", "max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "seed": 1,
              "n": 1, "best_of": None, "frequency_penalty": 0, "presence_penalty": 0, "echo": False, "user": "u",
              "logit_bias": {}, "stop": None}
ADAPTER = {"name": "three", "path": "/nowhere"}
ROUTES = {"/answer": ANSWER, "/nli": NLI, "/v1/completions": COMPLETION, "/adapters": ADAPTER}
# (route, path of the field inside the body): every field of every body
FIELDS = [(route, path) for route, body in ROUTES.items() for path in (
    [(key, inner) for key, value in body.items() if isinstance(value, dict) for inner in value]
    + [(key,) for key in body])]
NOT_JSON = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]
LONG = "9" * 5000  # more digits than Python converts to an int (sys.get_int_max_str_digits(): 4,300)
# numbers past the bound of every numeric field: integers of many digits, of more than Python converts, floats of a
# mantissa or an exponent as long
PAST_EVERY_BOUND = ["1" + "0" * 400, "-1" + "0" * 400, "2e400", LONG, f"-{LONG}", f"{LONG}.5", f"1e{LONG}",
                    f"-1e{LONG}", f"1{LONG}e{LONG}"]
MARK = "\u0000mark\u0000"


@pytest.fixture(scope="module")
def client(tiny_gpt2_dir, gpt2_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_json")
    settings = settings_in(root, tiny_gpt2_dir, gpt2_adapters)
    with ready_client(settings) as client:
        yield client


def with_raw(body: dict, path: tuple[str, ...], raw: str) -> bytes:
    """``body`` as JSON text with the field at ``path`` written as ``raw`` (any text, JSON or not)."""
    body = json.loads(json.dumps(body))
    inner = body
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = MARK
    return json.dumps(body).replace(json.dumps(MARK), raw).encode()


def post(client, route: str, content: bytes, content_type: str = "application/json"):
    return client.post(route, content=content, headers={**ADMIN, "content-type": content_type})


def assert_refused(reply, *statuses: int) -> str:
    """A 4xx among ``statuses`` with strict JSON (no NaN) holding an error message; returns the message."""
    assert reply.status_code in statuses, (reply.status_code, reply.text)
    assert reply.headers["content-type"] == "application/json"
    json.loads(reply.content, parse_constant=lambda constant: pytest.fail(f"{constant} in {reply.text}"))
    return error_message(reply)


@pytest.mark.parametrize("route,path", FIELDS, ids=lambda part: ".".join(part) if isinstance(part, tuple) else part)
def test_nan_and_infinity_in_any_field_are_refused(client, route, path):
    before = listed(client)
    for raw in NOT_JSON:
        error = assert_refused(post(client, route, with_raw(ROUTES[route], path, raw)), 422)
        assert ".".join(("body", *path)) in error, error
    assert listed(client) == before


@pytest.mark.parametrize("route,path", [("/answer", ("decoding", "seed")), ("/answer", ("decoding", "top_k")),
                                        ("/answer", ("decoding", "max_new_tokens")), ("/v1/completions", ("seed",)),
                                        ("/v1/completions", ("max_tokens",)), ("/v1/completions", ("n",)),
                                        ("/v1/completions", ("best_of",)), ("/v1/completions", ("temperature",)),
                                        ("/answer", ("decoding", "top_p"))])
def test_numbers_past_every_bound_are_refused(client, route, path):
    """Each is a 422 naming the field, an integer of more digits than Python converts too (a review: it was a 400
    saying that the body, valid JSON, could not be read as JSON), whose digits the reply echoes at most
    ``ECHO_LIMIT`` of."""
    for raw in PAST_EVERY_BOUND:
        reply = post(client, route, with_raw(ROUTES[route], path, raw))
        assert_names(reply, ".".join(path))


def assert_names(reply, field: str) -> None:
    """A 422 naming ``field`` (OpenAI's ``param`` on /v1/*), echoing no run of digits longer than ``ECHO_LIMIT``."""
    error = assert_refused(reply, 422)
    assert f"body.{field}" in error, error
    if reply.request.url.path.startswith("/v1/"):
        assert reply.json()["error"]["param"] == field, reply.text
    assert not re.search(rf"\d{{{ECHO_LIMIT + 1}}}", reply.text), reply.text[:1000]


@pytest.mark.parametrize("route,path,raw,field", [
    ("/v1/completions", ("stop",), f"[{LONG}]", "stop.0"),
    ("/v1/completions", ("stop",), f'["a", -{LONG}]', "stop.1"),
    ("/v1/completions", ("logit_bias",), f'{{"5": {LONG}}}', "logit_bias"),
    ("/v1/completions", ("logit_bias",), f'{{"5": -{LONG}}}', "logit_bias"),
    ("/nli", ("labels",), f'["yes", {LONG}]', "labels.1"),
    ("/adapters", ("path",), LONG, "path"),
    ("/adapters", ("replace",), f"-{LONG}", "replace"),
    ("/answer", ("decoding",), f'{{"strategy": "top_k", "top_k": {LONG}}}', "decoding.top_k"),
    # where an object is expected (a review: read as an object of defaults, and served)
    ("/answer", ("decoding",), LONG, "decoding"),
    ("/v1/completions", ("stream_options",), f"-{LONG}", "stream_options"),
    ("/v1/completions", ("logit_bias",), LONG, "logit_bias"),
])
def test_integers_of_more_digits_than_python_converts_are_refused_where_they_lie(client, route, path, raw, field):
    """In an array, as a value of logit_bias, in a nested object: a 422 naming where it lies (they were a 400), and
    nothing changes."""
    before = listed(client)
    assert_names(post(client, route, with_raw(ROUTES[route], path, raw)), field)
    assert listed(client) == before


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("content,content_type", [
    (b"", "application/json"), (b"{", "application/json"), (b'{"model": "one",}', "application/json"),
    (b"\xff\xfe{}", "application/json"), (b"1\xff\xff", "application/json"), (b"\xff\xfe\x00", "text/plain"),
    (b"[1, 2]", "application/json"), (b"3", "application/json"), (b'"text"', "application/json"),
    (b"null", "application/json"), (b"NaN", "application/json"), (LONG.encode(), "application/json"),
    (b"[" * 100_000, "application/json"),
    (b"[" * 500 + b"]" * 500, "application/json"), (b'{"a": ' * 500 + b"1" + b"}" * 500, "application/json"),
    (json.dumps(ANSWER).encode(), "text/plain"), (json.dumps(ANSWER).encode(), "application/x-www-form-urlencoded"),
])
def test_bodies_that_are_not_a_json_object_are_refused(client, route, content, content_type):
    before = listed(client)
    assert_refused(post(client, route, content, content_type), *((400, 422) if "json" in content_type else (415,)))
    assert listed(client) == before


@pytest.mark.parametrize("route,path", [("/answer", ("context",)), ("/answer", ("decoding", "strategy")),
                                        ("/nli", ("adapter",)), ("/v1/completions", ("prompt",)),
                                        ("/v1/completions", ("stop",)), ("/adapters", ("path",))])
def test_deeply_nested_values_are_refused(client, route, path):
    for raw in ("[" * 400 + "]" * 400, '{"a": ' * 400 + "NaN" + "}" * 400):
        assert_refused(post(client, route, with_raw(ROUTES[route], path, raw)), 400, 422)


def test_a_body_nested_past_the_parser_says_so_plainly(client):
    reply = post(client, "/answer", ("[" * 100_000 + "]" * 100_000).encode())
    assert reply.status_code == 400 and "nested too deeply" in reply.json()["error"], reply.text
    assert "recursion" not in reply.text


def test_negative_zero_is_zero(client):
    """-0.0 is 0: a greedy temperature, on /v1/completions and /answer alike."""
    greedy = {"model": "one", "prompt": "Hello", "max_tokens": 4}
    zero = post(client, "/v1/completions", json.dumps({**greedy, "temperature": 0}).encode())
    negative = post(client, "/v1/completions", json.dumps({**greedy, "temperature": -0.0}).encode())
    assert zero.status_code == negative.status_code == 200
    assert zero.json()["choices"] == negative.json()["choices"]
    decodings = ({"strategy": "greedy"}, {"strategy": "temperature", "temperature": -0.0})
    answers = [post(client, "/answer", json.dumps({**ANSWER, "decoding": {**decoding, "max_new_tokens": 4}}).encode())
               for decoding in decodings]
    assert [reply.status_code for reply in answers] == [200, 200], [reply.text for reply in answers]
    assert answers[0].json()["answer"] == answers[1].json()["answer"]


def test_routes_without_a_body_refuse_one(client):
    """The unmerge and merge routes take no body (none, or an empty object): a hostile one is refused like any other,
    and nothing changes."""
    assert post(client, "/adapters/one/merge", b"").status_code == 200
    before = listed(client)
    assert before["one"]["state"] == "merged"
    for route in ("/adapters/unmerge", "/adapters/two/merge"):
        assert "body.x" in assert_refused(post(client, route, b'{"x": NaN, "y": 1e400}'), 422)
        assert "body" in assert_refused(post(client, route, b"[]"), 422)
        assert listed(client) == before
    assert post(client, "/adapters/unmerge", b"{}").json()["merged"] is None


CHAT = {"model": "one", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


@pytest.mark.parametrize("route,body,key,twice", [
    ("/answer", ANSWER, "adapter", '"adapter": "two"'),
    ("/answer", ANSWER, "question", '"question": "Who won?"'),
    ("/answer", ANSWER, "adapter", '"\\u0061dapter": "two"'),  # the same key once its escape is read
    ("/nli", NLI, "hypothesis", '"hypothesis": "Nobody plays."'),
    ("/v1/completions", COMPLETION, "model", '"model": "two"'),
    ("/v1/chat/completions", CHAT, "model", '"model": "two"'),
    ("/adapters", ADAPTER, "name", '"name": "four"'),
])
def test_a_key_twice_in_the_body_is_refused_naming_it(client, route, body, key, twice):
    """JSON does not say which of two values of one key counts (RFC 8259, 4): the body is a 400 naming the key,
    never served with the last value picked silently, as Python's parser would."""
    before = listed(client)
    text = json.dumps(body)
    error = assert_refused(post(client, route, f"{text[:-1]}, {twice}}}".encode()), 400)
    assert f'the key "{key}" appears 2 times' in error, error
    assert listed(client) == before


@pytest.mark.parametrize("route,raw", [
    ("/answer", '{"strategy": "greedy", "max_new_tokens": 4, "max_new_tokens": 8}'),
    ("/v1/chat/completions", '[{"role": "user", "content": "Hi", "role": "system"}]'),
])
def test_a_key_twice_in_a_nested_object_is_refused_naming_it(client, route, raw):
    body, field = (ANSWER, ("decoding",)) if route == "/answer" else (CHAT, ("messages",))
    error = assert_refused(post(client, route, with_raw(body, field, raw)), 400)
    assert "appears 2 times" in error and ('"max_new_tokens"' in error or '"role"' in error), error


def test_keys_that_differ_only_in_case_are_two_keys(client):
    """Not a repeated key: ``Adapter`` is another (unknown) field, a 422 naming it, as ever."""
    text = json.dumps(ANSWER)
    error = assert_refused(post(client, "/answer", f'{text[:-1]}, "Adapter": "two"}}'.encode()), 422)
    assert "Adapter" in error, error

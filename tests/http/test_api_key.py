"""The optional API key (``--api-key``, ``LORASWAP_API_KEY``): once set, the routes that run the model need
``Authorization: Bearer <API key>``, compared in constant time; it is not the admin key, and neither opens the other's
routes. Unset, those routes are open (every other test module runs so)."""
from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.cli.main import build_parser, settings_from
from service.http.app import create_app
from service.runtime import Runtime
from service.settings import Settings
from tests.http.replies import error_message
from tests.server_helpers import (
    ADMIN,
    ADMIN_KEY,
    SQUAD_CONTEXT,
    SQUAD_QUESTION,
    ready_client,
    settings_in,
)

API_KEY = "sk-test"
KEYED = {"Authorization": f"Bearer {API_KEY}"}
INFERENCE = [("/answer", {"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION, "decoding": {"max_new_tokens": 2}}),
             ("/nli", {"premise": "A man sleeps.", "hypothesis": "Nobody sleeps."}),
             ("/v1/completions", {"model": "one", "prompt": "Hello", "max_tokens": 2}),
             ("/v1/chat/completions", {"model": "one", "messages": [{"role": "user", "content": "Hi"}],
                                       "max_tokens": 2})]
WRONG = ["Bearer " + "j" * len(API_KEY), "Bearer " + API_KEY * 40, "Bearer ", "", API_KEY,
         "Bearer\t" + API_KEY, "Bearer \t" + API_KEY, "Bearer " + API_KEY + "\t x", "Basic " + API_KEY,
         ("Bearer " + API_KEY + "\u00e9").encode(), b"Bearer \xff\xfe"]


@pytest.fixture(scope="module")
def client(tiny_gpt2_dir, gpt2_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("api_key")
    settings = settings_in(root, tiny_gpt2_dir, gpt2_adapters, api_key=API_KEY)
    with ready_client(settings) as client:
        yield client


# RFC 9110 11.4: the scheme in any case, then one space or more (a review: two spaces were a 401)
# the value's own spaces and tabs at its ends are no part of it (RFC 9110 5.5)
SPELLINGS = [f"{ends}{scheme}{' ' * spaces}{API_KEY}{ends}" for scheme in ("Bearer", "bearer") for spaces in (1, 2, 5)
             for ends in ("", " ", " \t ")]


@pytest.mark.parametrize("path,body", INFERENCE, ids=[path for path, _ in INFERENCE])
def test_the_routes_that_run_the_model_need_the_key(client, path, body):
    for authorization in SPELLINGS:
        assert client.post(path, json=body, headers={"Authorization": authorization}).status_code == 200
    for authorization in [None, *WRONG]:
        headers = {} if authorization is None else {"Authorization": authorization}
        reply = client.post(path, json=body, headers=headers)
        assert reply.status_code == 401, (authorization, reply.text)
        assert "Bearer <API key>" in error_message(reply) and reply.headers["WWW-Authenticate"] == "Bearer"
        if path.startswith("/v1/"):  # OpenAI's code for a key missing or wrong (it was null)
            assert reply.json()["error"]["code"] == "invalid_api_key", reply.text


def test_the_key_is_checked_before_the_body(client):
    """Without the key nothing is read: an invalid body gets 401, not a 422 that describes the schema."""
    for path, _ in INFERENCE:
        assert client.post(path, json={"colour": "red"}).status_code == 401
        assert client.post(path, json={"colour": "red"}, headers=KEYED).status_code == 422


def test_the_probes_stay_open_and_the_keys_do_not_mix(client):
    for path in ("/health", "/ready", "/metrics"):
        assert client.get(path).status_code == client.get(path, headers=KEYED).status_code == 200, path
    listing = client.get("/adapters", headers=KEYED)  # the key clients send everywhere: the listing, without paths
    assert listing.status_code == 200 and all("path" not in a for a in listing.json()["adapters"])
    assert all("path" in a for a in client.get("/adapters", headers=ADMIN).json()["adapters"])
    for method, path in [("post", "/adapters/unmerge"), ("post", "/v1/unload_lora_adapter"), ("delete", "/adapters/x")]:
        assert client.request(method, path, json={"lora_name": "x"}, headers=KEYED).status_code == 403, path


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/one", "/v1/models/base", "/adapters"])
def test_the_model_listings_need_the_key(client, path):
    """A review: with --api-key, GET /v1/models answered without it (OpenAI and vLLM need it on every /v1 route), and
    so did GET /adapters, which lists the same names."""
    for authorization in [None, *WRONG[:5]]:
        headers = {} if authorization is None else {"Authorization": authorization}
        reply = client.get(path, headers=headers)
        assert reply.status_code == 401 and reply.headers["WWW-Authenticate"] == "Bearer", (authorization, reply.text)
    assert client.get(path, headers=KEYED).status_code == 200
    if path.startswith("/v1/"):
        assert client.get(path).json()["error"]["code"] == "invalid_api_key"
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=client, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        api.models.list()


def test_the_key_is_compared_in_constant_time(client, compared_digests):
    body = dict(INFERENCE)["/nli"]
    assert client.post("/nli", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/nli", json=body, headers=KEYED).status_code == 200
    key, admin_key = KEYED["Authorization"].encode(), ADMIN["Authorization"].encode()
    assert compared_digests == [(b"Bearer wrong", key), (b"Bearer wrong", admin_key), (key, key)]


def test_the_openai_client_sends_it_as_its_api_key(client):
    keyed = openai.OpenAI(base_url="http://testserver/v1", api_key=API_KEY, http_client=client, max_retries=0)
    assert keyed.completions.create(model="one", prompt="Hi", max_tokens=2).usage.completion_tokens <= 2
    wrong = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-wrong", http_client=client, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.chat.completions.create(model="one", messages=[{"role": "user", "content": "Hi"}])
    assert "Bearer <API key>" in str(raised.value) and raised.value.type == "authentication_error"


def test_the_setting_comes_from_the_flag_or_the_environment_and_is_checked(monkeypatch):
    assert settings_from(build_parser().parse_args(["serve", "--api-key", "sk-flag"])).api_key == "sk-flag"
    monkeypatch.setenv("LORASWAP_API_KEY", "sk-env")
    assert Settings().api_key == "sk-env" and settings_from(build_parser().parse_args(["serve"])).api_key == "sk-env"
    assert Settings(api_key=None).api_key is None  # unset: the routes are open
    for setting in ("api_key", "admin_key"):  # an empty key is refused, not taken for none
        with pytest.raises(ValidationError, match="must not be empty"):
            Settings(**{setting: ""})
    with pytest.raises(ValidationError, match="api_key must differ from admin_key"):
        Settings(api_key=ADMIN_KEY, admin_key=ADMIN_KEY)
    for setting in ("api_key", "admin_key"):  # keys no Authorization header could carry (RFC 9110 5.5)
        for key in (" k", "k ", "\tk", "k\t", "a\nb", "a\x00b", "a\x7fb"):
            with pytest.raises(ValidationError, match="must not begin or end with a space or a tab"):
                Settings(**{setting: key})


# every route that takes a key: (method, path, body, the key it needs); GET /adapters takes either (``EITHER``)
EITHER = "API key or admin key"
KEYED_ROUTES = [
    *[("post", path, body, "API key") for path, body in INFERENCE],
    ("get", "/v1/models", None, "API key"), ("get", "/v1/models/one", None, "API key"),
    ("get", "/adapters", None, EITHER),
    ("post", "/adapters", {"name": "x", "path": "nowhere"}, "admin key"), ("delete", "/adapters/nobody", None,
                                                                            "admin key"),
    ("post", "/adapters/unmerge", None, "admin key"), ("post", "/adapters/nobody/merge", None, "admin key"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "nowhere"}, "admin key"),
    ("post", "/v1/unload_lora_adapter", {"lora_name": "nobody"}, "admin key")]
SENT = {"no key": None, "a wrong key": "Bearer sk-wrong", "the API key": KEYED["Authorization"],
        "the admin key": ADMIN["Authorization"]}


def refused_as(reply, status: int, code: str, *words: str) -> None:
    """``reply`` is a ``status`` naming each of ``words``; on ``/v1`` in OpenAI's shape with ``code``."""
    message = error_message(reply)
    assert reply.status_code == status and all(word in message for word in words), (reply.status_code, message)
    if reply.request.url.path.startswith("/v1/"):
        assert reply.json()["error"]["code"] == code
        assert reply.json()["error"]["type"] == ("authentication_error" if status == 401 else "permission_error")
    assert (reply.headers.get("WWW-Authenticate") == "Bearer") == (status == 401)


@pytest.mark.parametrize("method,path,body,needed", KEYED_ROUTES, ids=[f"{m} {p}" for m, p, _, _ in KEYED_ROUTES])
@pytest.mark.parametrize("sent", list(SENT))
def test_each_refusal_says_which_key_is_needed_and_what_was_sent(client, method, path, body, needed, sent):
    """A review: GET /adapters answered a wrong key that an admin key is needed, /v1 a wrong key that an API key is
    needed (as if none was sent), and no refusal said whether a key was sent at all, or that it was the other key
    (an admin route answered the API key as a wrong key)."""
    authorization = SENT[sent]
    reply = client.request(method, path, json=body,
                           headers={} if authorization is None else {"Authorization": authorization})
    if sent == "no key":
        refused_as(reply, 401, "invalid_api_key", "no key was sent", *needed.split(" or "))
    elif sent == "a wrong key":
        refused_as(reply, 401, "invalid_api_key", f"the key sent is not the {needed.replace(' or ', ' nor the ')}")
    elif needed == EITHER or sent == f"the {needed}":
        assert reply.status_code not in (401, 403), reply.text
    else:
        other = "admin key" if needed == "API key" else "API key"
        refused_as(reply, 403, f"{needed.split()[0].lower()}_key_needed", f"need the {needed}",
                   f"the {other} was sent, which does not open them")


SAID = {"loading": "still loading", "draining": "shutting down", "failed to start: OSError: no model": "no model"}


@pytest.mark.parametrize("state", list(SAID))
def test_a_key_missing_wrong_or_the_other_one_is_refused_for_it_whatever_the_state(tiny_gpt2_dir, gpt2_adapters,
                                                                                   tmp_path, state):
    """While the model loads, drains or failed to start, every route that takes a key refuses a request without the
    right one for its key (401 or 403), as when it is ready, and answers the right key with the state's 503. A review:
    GET /adapters answered no key or a wrong one with a 503 'still loading', before its key was checked."""
    rt = Runtime(settings_in(tmp_path, tiny_gpt2_dir, gpt2_adapters, api_key=API_KEY))
    rt.draining = state == "draining"
    rt.start_failure = state.partition(": ")[2] or None
    client = TestClient(create_app(rt=rt))  # no `with`: the start never runs
    for method, path, body, needed in KEYED_ROUTES:
        for sent, authorization in SENT.items():
            reply = client.request(method, path, json=body,
                                   headers={} if authorization is None else {"Authorization": authorization})
            if sent in {f"the {key}" for key in needed.split(" or ")}:
                assert reply.status_code == 503 and SAID[state] in error_message(reply), (path, sent, reply.text)
            else:
                assert reply.status_code in (401, 403), (state, method, path, sent, reply.text)


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_the_open_routes_take_any_key(client, path):
    for authorization in SENT.values():
        assert client.get(path, headers={} if authorization is None else {"Authorization": authorization}
                          ).status_code == 200


@pytest.fixture(scope="module")
def keys_apart(tiny_gpt2_dir, gpt2_adapters, tmp_path_factory):
    """Servers of one key each: the API key alone (admin routes disabled), the admin key alone (the routes that run
    the model open)."""
    root = tmp_path_factory.mktemp("keys_apart")
    with ready_client(settings_in(root / "api", tiny_gpt2_dir, gpt2_adapters, api_key=API_KEY, admin_key=None)
                      ) as api, ready_client(settings_in(root / "admin", tiny_gpt2_dir, gpt2_adapters)) as admin:
        yield api, admin


@pytest.mark.parametrize("method,path,body", [row[:3] for row in KEYED_ROUTES if row[3] == "admin key"],
                         ids=[f"{m} {p}" for m, p, _, needed in KEYED_ROUTES if needed == "admin key"])
def test_disabled_admin_routes_say_so_with_a_code(keys_apart, method, path, body):
    """A review: /v1/unload_lora_adapter's 403 had code null."""
    for authorization in SENT.values():
        reply = keys_apart[0].request(method, path, json=body,
                                      headers={} if authorization is None else {"Authorization": authorization})
        refused_as(reply, 403, "admin_disabled", "admin routes are disabled: no admin key is configured")


def test_the_listing_without_an_api_key_takes_no_key_or_the_admin_key(keys_apart):
    api, admin = keys_apart
    assert all("path" not in adapter for adapter in admin.get("/adapters").json()["adapters"])
    assert all("path" in adapter for adapter in admin.get("/adapters", headers=ADMIN).json()["adapters"])
    refused_as(admin.get("/adapters", headers={"Authorization": "Bearer sk-wrong"}), 401, "invalid_api_key",
               "takes no key, or the admin key", "the key sent is not the admin key")
    refused_as(api.get("/adapters", headers={"Authorization": "Bearer sk-wrong"}), 401, "invalid_api_key",
               "takes the API key", "the key sent is not the API key")
    assert admin.post("/nli", json=dict(INFERENCE)["/nli"], headers=KEYED).status_code == 200  # open: no API key


NOT_SENT = ["", "Bearer", "bearer   ", " \t"]  # headers that carry no key
NOT_BEARER = ["Basic c2stdGVzdA==", f"Bearer\t{API_KEY}", API_KEY]  # another scheme, a tab for the space, no scheme


@pytest.mark.parametrize("path", ["/v1/models", "/adapters", "/adapters/unmerge"])
def test_a_refusal_says_no_key_was_sent_or_that_the_header_is_not_bearer(client, path):
    """A review: an empty Authorization header, or `Bearer` alone, was answered 'the key sent is not the API key', as
    was another scheme (Basic) and the right key after a tab: neither sent a key. The header is never echoed."""
    method = client.post if path.endswith("unmerge") else client.get
    for authorization in NOT_SENT + NOT_BEARER:
        reply = method(path, headers={"Authorization": authorization})
        said = "no key was sent" if authorization in NOT_SENT else "is not 'Bearer <key>'"
        assert reply.status_code == 401 and said in error_message(reply), (authorization, reply.text)
        assert API_KEY not in error_message(reply)


def test_the_listings_refusal_names_paths_only_where_an_admin_key_is_set(keys_apart):
    """A review: with only an API key set, GET /adapters' refusal said the admin key lists the adapters' paths."""
    api, _ = keys_apart
    assert "paths" not in error_message(api.get("/adapters", headers={"Authorization": "Bearer sk-wrong"}))

"""The optional API key (``--api-key``, ``LORASWAP_API_KEY``): once set, the routes that run the model need
``Authorization: Bearer <API key>``, compared in constant time; it is not the admin key, and neither opens the other's
routes. Unset, those routes are open (every other test module runs so)."""
from __future__ import annotations

import openai
import pytest
from pydantic import ValidationError

from service.cli.main import build_parser, settings_from
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
         ADMIN["Authorization"], "Bearer  " + ADMIN["Authorization"].split()[-1],
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
        assert client.request(method, path, json={"lora_name": "x"}, headers=KEYED).status_code == 401, path


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
    key = KEYED["Authorization"].encode()
    assert compared_digests == [(b"Bearer wrong", key), (key, key)]


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

"""Admin details: the key compared in constant time whatever the header holds, adapter file paths only for the admin,
and a merge's lifetime stated where it is made and where it is listed."""
from __future__ import annotations

import pytest

from tests.server_helpers import ADMIN, ADMIN_KEY, ask, copy_adapters, ready_client, tiny_settings

ADMIN_CALLS = [("post", "/adapters", {"name": "x", "path": "/tmp"}), ("delete", "/adapters/one", None),
               ("post", "/adapters/one/merge", None), ("post", "/adapters/unmerge", None), ("get", "/adapters", None)]
WRONG = ["Bearer " + "j" * len(ADMIN_KEY), "Bearer " + ADMIN_KEY * 40, "Bearer ", "Bearer", "", ADMIN_KEY,
         "Bearer\t" + ADMIN_KEY, "Bearer " + ADMIN_KEY + " x", "Basic " + ADMIN_KEY,
         ("Bearer " + ADMIN_KEY + "\u00e9").encode(), ("Bearer " + ADMIN_KEY + "\u00e9").encode("latin-1"),
         "Bearer \u6f22\u5b57".encode(), b"Bearer \xff\xfe"]


@pytest.fixture(scope="module")
def served(tiny_gpt2_dir, gpt2_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("admin")
    return tiny_gpt2_dir, copy_adapters(gpt2_adapters, root / "adapters"), root


@pytest.fixture(scope="module")
def client(served):
    base_dir, adapters_dir, root = served
    with ready_client(tiny_settings(base_dir, adapters_dir, root / "cache")) as client:
        yield client


def adapters(client, headers: dict | None = None) -> dict[str, dict]:
    reply = client.get("/adapters", headers=headers or {})
    assert reply.status_code == 200, reply.text
    return {adapter["name"]: adapter for adapter in reply.json()["adapters"]}


@pytest.mark.parametrize("method,path,body", ADMIN_CALLS)
def test_a_wrong_key_of_any_length_or_bytes_is_401(client, method, path, body):
    before = adapters(client, ADMIN)
    for authorization in WRONG:
        reply = client.request(method, path, json=body, headers={"Authorization": authorization})
        assert reply.status_code == 401, (authorization, reply.text)
        assert "Bearer" in reply.json()["error"] and reply.headers["WWW-Authenticate"] == "Bearer"
    assert adapters(client, ADMIN) == before


def test_the_key_is_compared_in_constant_time(client, compared_digests):
    assert client.post("/adapters/unmerge", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/adapters/unmerge", headers=ADMIN).status_code == 200
    key = ADMIN["Authorization"].encode()
    assert compared_digests == [(b"Bearer wrong", key), (key, key)]


def test_a_key_that_is_not_ascii_matches_its_utf8_bytes_only(served):
    base_dir, adapters_dir, root = served
    key = "cl\u00e9-\u6f22"
    with ready_client(tiny_settings(base_dir, adapters_dir, root / "cache", admin_key=key)) as client:
        assert "path" in adapters(client, {"Authorization": f"Bearer {key}".encode()})["one"]
        for authorization in (f"Bearer {key}".encode("utf-16-le"), "Bearer cl\u00e9".encode("latin-1"), b"Bearer cl"):
            assert client.get("/adapters", headers={"Authorization": authorization}).status_code == 401


def test_adapter_paths_are_shown_only_with_the_admin_key(client, served):
    _, adapters_dir, _ = served
    public, private = adapters(client), adapters(client, ADMIN)
    assert set(public) == set(private) == {"one", "two"}
    for name in public:
        assert "path" not in public[name]
        assert private[name]["path"] == str((adapters_dir / name).resolve())
        assert {k: v for k, v in private[name].items() if k != "path"} == public[name]


def test_without_a_configured_key_the_listing_has_no_paths_and_a_key_is_refused(served):
    base_dir, adapters_dir, root = served
    with ready_client(tiny_settings(base_dir, adapters_dir, root / "cache", admin_key=None)) as client:
        assert all("path" not in adapter for adapter in adapters(client).values())
        reply = client.get("/adapters", headers={"Authorization": "Bearer None"})
        assert reply.status_code == 403 and "a key was sent, and this server has no API key and no admin key" in \
            reply.json()["error"]


def test_a_merge_states_how_long_it_lasts_and_does_last_that_long(client):
    reply = client.post("/adapters/one/merge", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    merged = reply.json()
    assert merged["merged"] == "one" and "other weights" in merged["merged_until"]
    for headers in ({}, ADMIN):
        listing = client.get("/adapters", headers=headers).json()
        assert (listing["merged"], listing["merged_until"]) == (merged["merged"], merged["merged_until"])
    ask(client, "one", max_new_tokens=2)  # its own weights: still merged
    assert client.get("/adapters").json()["merged"] == "one"
    ask(client, "two", max_new_tokens=2)  # other weights: unmerged, as stated
    listing = client.get("/adapters").json()
    assert (listing["merged"], listing["merged_until"]) == (None, None)
    assert client.post("/adapters/two/merge", headers=ADMIN).json()["merged"] == "two"
    ask(client, None, max_new_tokens=2)  # the bare base is other weights too
    assert client.get("/adapters").json()["merged"] is None
    assert client.post("/adapters/unmerge", headers=ADMIN).json() == {"merged": None, "merged_until": None}


@pytest.mark.parametrize("content", [b"null", b"[]", b"1", b'"x"', b"true", b"9" * 5000, b"-" + b"9" * 5000],
                         ids=["null", "[]", "1", '"x"', "true", "long", "-long"])
def test_merge_and_unmerge_take_no_body_or_an_empty_object_and_refuse_other_json_as_every_route_does(client, content):
    """A body sent to either must be a JSON object: null (once taken for no body), a list, a number (one of more
    digits than Python converts too: a review found it merged), a string are the 422 POST /adapters answers them
    with, and change nothing; no body and ``{}`` are taken."""
    sent = {"content": content, "headers": {**ADMIN, "Content-Type": "application/json"}}
    registering = client.post("/adapters", **sent)
    assert registering.status_code == 422, registering.text
    assert client.post("/adapters/one/merge", json={}, headers=ADMIN).json()["merged"] == "one"
    for path in ("/adapters/unmerge", "/adapters/two/merge"):
        reply = client.post(path, **sent)
        assert (reply.status_code, reply.json()) == (422, registering.json()), (path, reply.text)
        assert client.get("/adapters").json()["merged"] == "one"
    assert client.post("/adapters/unmerge", headers=ADMIN).json()["merged"] is None

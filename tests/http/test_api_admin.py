"""The admin routes of the HTTP API in process on the tiny GPT-2 and Llama bases.

Listing adapters with their rank, alpha, targets and size; loading and unloading at run time; merge and unmerge
restoring outputs (also when the merged adapter is deleted) and never serving other weights from the merged base;
the LRU bound on resident adapters, and a batch over more adapters than device slots; an unregistered default
adapter falling back to the bare base; the admin key (401 without it, 403 when the server has none).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors.torch import load_file

from tests.http.api_helpers import ADMIN_CALLS, assert_close
from tests.server_helpers import (
    ADMIN,
    SQUAD_CONTEXT,
    SQUAD_QUESTION,
    ask,
    classify,
    listed,
    ready_client,
    scrape,
    value,
)
from tests.tiny_models import LINEAR_TARGETS


def nli_probabilities(client, adapter: str | None) -> dict[str, float]:
    return classify(client, adapter)["probabilities"]


def test_list_adapters_describes_each_one(client, tiny):
    adapters = listed(client)
    assert set(adapters) == {"one", "two"}
    for name, path in tiny.adapters.items():
        adapter = adapters[name]
        assert (adapter["rank"], adapter["alpha"]) == (4, 8)
        assert sorted(adapter["target_modules"]) == sorted(LINEAR_TARGETS[tiny.arch])
        stored = load_file(path / "adapter_model.safetensors")
        assert adapter["size_bytes"] == sum(t.numel() * 4 for t in stored.values())  # fp32 A and B
        assert adapter["state"] in ("loaded", "resident")
    models = client.get("/v1/models").json()
    assert {m["id"] for m in models["data"]} == {"base", "one", "two"}


def test_load_and_unload_at_run_time(client, tiny):
    before = listed(client)
    reply = client.post("/adapters", json={"name": "three", "path": str(tiny.extra / "three")}, headers=ADMIN)
    assert reply.status_code == 201, reply.text
    assert reply.json()["name"] == "three" and reply.json()["rank"] == 4
    assert listed(client).keys() == before.keys() | {"three"}
    three = ask(client, "three")
    assert three["adapter"] == "three" and three["answer"] != ask(client, "one")["answer"]
    assert "three" in {m["id"] for m in client.get("/v1/models").json()["data"]}

    reply = client.delete("/adapters/three", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    assert listed(client).keys() == before.keys()
    assert "three" in ask(client, "three", status=404)["error"]
    assert classify(client, "three", status=404)["error"]
    assert client.post("/v1/completions", json={"model": "three", "prompt": "Hi"}).status_code == 404
    assert client.delete("/adapters/three", headers=ADMIN).status_code == 404


def test_merge_then_unmerge_restores_outputs(client):
    before = {a: (nli_probabilities(client, a), ask(client, a)["answer"]) for a in ("one", "two", None)}

    reply = client.post("/adapters/one/merge", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    assert listed(client)["one"]["state"] == "merged" and client.get("/adapters").json()["merged"] == "one"
    for _ in range(2):  # merged weights give the adapter's outputs
        assert_close(nli_probabilities(client, "one"), before["one"][0])
        assert ask(client, "one")["answer"] == before["one"][1]

    reply = client.post("/adapters/unmerge", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    assert client.get("/adapters").json()["merged"] is None and listed(client)["one"]["state"] != "merged"
    for adapter, (probabilities, answer) in before.items():
        assert_close(nli_probabilities(client, adapter), probabilities, tolerance=1e-6)
        assert ask(client, adapter)["answer"] == answer


def test_deleting_the_merged_adapter_restores_the_base_first(client, tiny):
    before = {a: (nli_probabilities(client, a), ask(client, a)["answer"]) for a in ("two", None)}
    reply = client.post("/adapters", json={"name": "three", "path": str(tiny.extra / "three")}, headers=ADMIN)
    assert reply.status_code == 201, reply.text
    assert client.post("/adapters/three/merge", headers=ADMIN).json()["merged"] == "three"
    reply = client.delete("/adapters/three", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    assert client.get("/adapters").json()["merged"] is None and "three" not in listed(client)
    for adapter, (probabilities, answer) in before.items():
        assert_close(nli_probabilities(client, adapter), probabilities, tolerance=1e-6)
        assert ask(client, adapter)["answer"] == answer
    assert "three" in ask(client, "three", status=404)["error"]


@pytest.mark.parametrize("other", [None, "two"])
def test_requests_for_other_weights_while_merged_get_their_own(client, other):
    """A request for the bare base or another adapter never runs on the merged weights."""
    want = (nli_probabilities(client, other), ask(client, other)["answer"])
    assert client.post("/adapters/one/merge", headers=ADMIN).status_code == 200
    assert_close(nli_probabilities(client, other), want[0])
    assert ask(client, other)["answer"] == want[1]
    assert client.post("/adapters/unmerge", headers=ADMIN).status_code == 200


def test_lru_keeps_a_bounded_number_resident(tiny):
    """max_resident=2 with four adapters in turn: two resident, the least recently used evicted, outputs unchanged."""
    with ready_client(tiny.settings(max_resident=2)) as client:
        for name, path in tiny.extra_adapters.items():
            assert client.post("/adapters", json={"name": name, "path": str(path)}, headers=ADMIN).status_code == 201
        first = {name: ask(client, name, max_new_tokens=4)["answer"] for name in ("one", "two", "three", "four")}
        states = {name: adapter["state"] for name, adapter in listed(client).items()}
        assert states == {"one": "loaded", "two": "loaded", "three": "resident", "four": "resident"}
        assert value(scrape(client), "loraswap_adapters_resident") == 2
        assert ask(client, "one", max_new_tokens=4)["answer"] == first["one"]  # evicts three, the LRU
        states = {name: adapter["state"] for name, adapter in listed(client).items()}
        assert states == {"one": "resident", "two": "loaded", "three": "loaded", "four": "resident"}
        for name in ("two", "three", "four", "one"):
            assert ask(client, name, max_new_tokens=4)["answer"] == first[name]
        assert value(scrape(client), "loraswap_adapters_resident") == 2


def test_a_batch_over_more_adapters_than_slots_still_succeeds(tiny):
    """Concurrent requests for three adapters with two slots: every one answers, with its own adapter's output."""
    with ready_client(tiny.settings(max_resident=2, batch_window_ms=200)) as client:
        assert client.post("/adapters", json={"name": "three", "path": str(tiny.extra / "three")},
                           headers=ADMIN).status_code == 201
        alone = {name: ask(client, name, max_new_tokens=4)["answer"] for name in ("one", "two", "three")}
        with ThreadPoolExecutor(max_workers=9) as pool:
            futures = {pool.submit(ask, client, name, max_new_tokens=4): name for name in ("one", "two", "three") * 3}
            assert all(future.result()["answer"] == alone[name] for future, name in futures.items())


def test_an_unregistered_default_adapter_falls_back_to_the_bare_base(tiny):
    with ready_client(tiny.settings(qa_adapter="squad", nli_adapter="nli")) as client:
        reply = client.post("/answer", json={"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION})
        assert reply.status_code == 200 and reply.json()["adapter"] is None
        assert reply.json()["answer"] == ask(client, None)["answer"]
        assert client.post("/nli", json={"premise": "A b.", "hypothesis": "C d."}).json()["adapter"] is None


@pytest.mark.parametrize("method,path,body", ADMIN_CALLS)
def test_admin_routes_need_the_key(client, method, path, body):
    before = client.get("/adapters").json()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
        reply = client.request(method, path, json=body, headers=headers)
        assert reply.status_code == 401, reply.text
        assert "Bearer" in reply.json()["error"] and reply.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/adapters").json() == before


def test_admin_routes_are_refused_without_a_configured_key(tiny):
    with ready_client(tiny.settings(admin_key=None)) as client:
        for method, path, body in ADMIN_CALLS:
            for headers in ({}, ADMIN, {"Authorization": "Bearer None"}):
                reply = client.request(method, path, json=body, headers=headers)
                assert reply.status_code == 403, reply.text
                assert "no admin key" in reply.json()["error"]
        assert set(listed(client)) == {"one", "two"}

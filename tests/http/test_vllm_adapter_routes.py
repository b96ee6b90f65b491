"""vLLM's runtime adapter routes, POST /v1/load_lora_adapter and /v1/unload_lora_adapter: behind the admin key, they
do what POST /adapters and DELETE /adapters/{name} do and answer as vLLM answers (200, a line of text), so tools
written for vLLM work unchanged. Their refusals are those of /adapters (see test_adapter_refusals)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.http.app import create_app
from service.runtime import Runtime
from tests.http.replies import error_message
from tests.server_helpers import ADMIN, ask, listed, ready_client, settings_in
from tests.tiny_models import make_adapter


@pytest.fixture(scope="module")
def served(tiny_gpt2_dir, gpt2_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_routes")
    extra = root / "extra"
    make_adapter(tiny_gpt2_dir, extra / "three", seed=2)
    settings = settings_in(root, tiny_gpt2_dir, gpt2_adapters, adapter_roots=[extra])
    return settings, extra


@pytest.fixture(scope="module")
def client(served):
    with ready_client(served[0]) as client:
        yield client


def load(client, name: str, path, headers: dict = ADMIN):
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, headers=headers)


def unload(client, name: str, headers: dict = ADMIN):
    return client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers)


def test_load_and_unload_answer_as_vllm_and_do_what_adapters_does(client, served):
    extra = served[1]
    reply = load(client, "three", extra / "three")
    assert (reply.status_code, reply.text) == (200, "Success: LoRA adapter 'three' added successfully.")
    assert reply.headers["content-type"].startswith("text/plain")
    same = client.post("/adapters", json={"name": "same", "path": str(extra / "three")}, headers=ADMIN)
    assert same.status_code == 201, same.text
    described = {name: {k: v for k, v in adapter.items() if k != "name"} for name, adapter in listed(client).items()}
    assert described["three"] == described["same"]
    assert "three" in {model["id"] for model in client.get("/v1/models").json()["data"]}
    assert ask(client, "three", max_new_tokens=6)["answer"] == ask(client, "same", max_new_tokens=6)["answer"]

    reply = client.post("/v1/unload_lora_adapter", json={"lora_name": "three", "lora_int_id": 7}, headers=ADMIN)
    assert (reply.status_code, reply.text) == (200, "Success: LoRA adapter 'three' removed successfully.")
    assert load(client, "four", extra / "three").status_code == 200  # null: the default, as on every route
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "four", "lora_path": str(extra / "three"),
                                                      "load_inplace": None}, headers=ADMIN).status_code == 409
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "four", "lora_int_id": None},
                       headers=ADMIN).status_code == 200
    assert set(listed(client)) == {"one", "two", "same"}
    ask(client, "three", status=404)
    assert client.delete("/adapters/same", headers=ADMIN).status_code == 200


def test_unloading_what_is_unknown_or_merged_is_as_delete(client, served):
    delete = client.delete("/adapters/nope", headers=ADMIN)
    reply = unload(client, "nope")
    assert reply.status_code == delete.status_code == 404
    assert error_message(reply) == error_message(delete) == "unknown adapter 'nope'"
    assert reply.json()["error"]["code"] == "model_not_found"
    assert client.post("/adapters/one/merge", headers=ADMIN).json()["merged"] == "one"
    answer = ask(client, "one", max_new_tokens=4)["answer"]
    assert unload(client, "one").status_code == 200  # unmerged first, as DELETE does
    assert client.get("/adapters").json()["merged"] is None and "one" not in listed(client)
    assert load(client, "one", served[0].adapters_dir / "one").status_code == 200
    assert ask(client, "one", max_new_tokens=4)["answer"] == answer


@pytest.mark.parametrize("route,body", [
    ("/v1/load_lora_adapter", {"lora_name": "x"}), ("/v1/load_lora_adapter", {"lora_path": "/x"}),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x", "load_inplace": "true"}),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x", "load_inplace": 1}),
    ("/v1/load_lora_adapter", {"lora_name": 3, "lora_path": "/x"}),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x", "lora_int_id": 1}),
    ("/v1/unload_lora_adapter", {"lora_name": "one", "lora_int_id": "1"}),
    ("/v1/unload_lora_adapter", {"lora_name": "one", "lora_int_id": 1.5}), ("/v1/unload_lora_adapter", {}),
    # past 64 bits (a review: 5000 digits were taken, and the adapter unloaded)
    ("/v1/unload_lora_adapter", {"lora_name": "one", "lora_int_id": 2**63}),
    ("/v1/unload_lora_adapter", {"lora_name": "one", "lora_int_id": -2**63 - 1}),
])
def test_fields_missing_unknown_or_of_the_wrong_type_are_refused_by_name(client, route, body):
    before = listed(client)
    reply = client.post(route, json=body, headers=ADMIN)
    assert reply.status_code == 422 and reply.json()["error"]["param"] in ("lora_name", "lora_path", "load_inplace",
                                                                          "lora_int_id"), reply.text
    assert f"body.{reply.json()['error']['param']}" in error_message(reply)
    assert listed(client) == before


@pytest.mark.parametrize("call", [lambda c, h: load(c, "x", "/x", h), lambda c, h: unload(c, "one", h)],
                         ids=["load", "unload"])
def test_they_need_the_admin_key(client, served, call):
    before = listed(client)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = call(client, headers)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error", reply.text
        assert "admin key" in error_message(reply) and reply.headers["WWW-Authenticate"] == "Bearer"
    assert listed(client) == before
    unstarted = TestClient(create_app(rt=Runtime(served[0].model_copy(update={"admin_key": None}))))  # no lifespan
    reply = call(unstarted, ADMIN)
    assert reply.status_code == 403 and reply.json()["error"]["type"] == "permission_error"
    assert "no admin key" in error_message(reply)
    reply = call(TestClient(create_app(rt=Runtime(served[0]))), ADMIN)
    assert reply.status_code == 503 and "loading" in error_message(reply) and reply.headers["Retry-After"]

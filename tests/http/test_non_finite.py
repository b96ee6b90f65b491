"""An adapter whose weights overflow in the forward pass (``lora_alpha`` -1e30: every weight is finite once scaled,
the activations are not): every route refuses its requests with a 422 naming the adapter, merged or not, never a 200
with NaN probabilities or tokens sampled from NaN; the requests beside them in a batch are served as alone."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.http.replies import error_message
from tests.server_helpers import ADMIN, SQUAD_CONTEXT, SQUAD_QUESTION, copy_adapters, ready_client, tiny_settings

REFUSAL = "adapter 'overflowing' gave NaN or infinite logits"
NLI = {"premise": "A man plays a guitar on stage.", "hypothesis": "A man is performing music."}
ROUTES = {"/nli": NLI, "/answer": {"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION},
          "/v1/completions": {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0},
          "/v1/completions stream": {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0, "stream": True}}


@pytest.fixture(scope="module")
def client(tiny_llama_dir, llama_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("non_finite")
    adapters = copy_adapters(llama_adapters, root / "adapters")
    folder = shutil.copytree(adapters / "one", adapters / "overflowing")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": -1e30}))
    with ready_client(tiny_settings(tiny_llama_dir, adapters, root / "cache")) as client:
        yield client


def post(client, route: str, adapter: str):
    path = route.split()[0]
    body = {**ROUTES[route], **({"model": adapter} if path.startswith("/v1/") else {"adapter": adapter})}
    return client.post(path, json=body)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("route", ROUTES)
def test_an_adapter_whose_logits_overflow_is_refused_on_every_route(client, route, merged):
    if merged:
        assert client.post("/adapters/overflowing/merge", headers=ADMIN).status_code == 200
    try:
        reply = post(client, route, "overflowing")
    finally:
        if merged:
            assert client.post("/adapters/unmerge", headers=ADMIN).status_code == 200
    assert reply.status_code == 422, reply.text
    assert REFUSAL in error_message(reply)
    if route.startswith("/v1/"):  # the field at fault, streamed or not (the stream had not begun)
        assert reply.json()["error"]["param"] == "model"


@pytest.mark.parametrize("route", ["/nli", "/v1/completions"])
def test_the_requests_beside_it_are_served_as_alone(client, route):
    alone = post(client, route, "one").json()
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda adapter: post(client, route, adapter), ["overflowing", "one"] * 4))
    for adapter, reply in zip(["overflowing", "one"] * 4, replies):
        if adapter == "overflowing":
            assert reply.status_code == 422 and REFUSAL in error_message(reply)
        else:
            assert reply.status_code == 200, reply.text
            if route == "/nli":
                assert reply.json()["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-5)
            else:
                assert reply.json()["choices"][0]["text"] == alone["choices"][0]["text"]

"""The gauges a router reads from GET /metrics: running and waiting requests in all and per adapter, each adapter's
resident and merged state, and vLLM's ``vllm:lora_requests_info`` read as the Kubernetes Gateway API Inference
Extension reads it (its model-server protocol, LoRA part), while the engine is held with requests of two adapters
running and of another and the base waiting."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.engine.requests import Generation
from service.engine.sampling import Decoding
from tests.server_helpers import ADMIN, ask, listed, ready_client, samples_of, scrape, settings_in, value
from tests.tiny_models import make_adapter

MAX_RESIDENT = 3


@pytest.fixture(scope="module")
def extra(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("router_extra")
    make_adapter(tiny_llama_dir, root / "three", seed=2)
    return root


@pytest.fixture(scope="module")
def client(tiny_llama_dir, llama_adapters, extra, tmp_path_factory):
    settings = settings_in(tmp_path_factory.mktemp("router"), tiny_llama_dir, llama_adapters, adapter_roots=[extra],
                           max_resident=MAX_RESIDENT)
    with ready_client(settings) as client:
        three = client.post("/adapters", json={"name": "three", "path": str(extra / "three")}, headers=ADMIN)
        assert three.status_code == 201, three.text
        yield client


def gateway_lora_view(text: str) -> tuple[set[str], set[str], int, float]:
    """What the Gateway API Inference Extension's metrics extractor takes from a scrape (Prometheus' text parser, then
    the family its --lora-info-metric names, vLLM's by default): of that family's series, the one with the largest
    value (the value is its creation timestamp); its running_lora_adapters and waiting_lora_adapters labels split on
    commas, each name trimmed, empty ones dropped; max_lora read as an integer. Returns (running, waiting, max_lora,
    the series' value)."""
    families = {family.name: family for family in text_string_to_metric_families(text)}
    latest = max(families["vllm:lora_requests_info"].samples, key=lambda sample: sample.value)

    def names(label: str) -> set[str]:
        return {name.strip() for name in latest.labels[label].split(",") if name.strip()}

    return names("running_lora_adapters"), names("waiting_lora_adapters"), int(latest.labels["max_lora"]), latest.value


def per_adapter(samples, name: str) -> dict[str, float]:
    """{adapter: value} of the gauge ``name``."""
    return {dict(labels)["adapter"]: sample for (metric, labels), sample in samples.items() if metric == name}


def hold_engine_mid_batch(client):
    """Two generations (adapters one and two) submitted together, the first one's token listener blocking the engine
    thread at their first decoding step until the returned gate is set: both are running, and whatever is sent
    meanwhile waits in the queue. Returns (gate, their futures)."""
    engine = client.app.state.runtime.engine
    gate, entered = threading.Event(), threading.Event()

    def hold(_token) -> None:
        entered.set()
        gate.wait(30)

    prompt = engine.tokenizer("The Normans gave their name to Normandy").input_ids
    works = [Generation(prompt, adapter, Decoding(max_new_tokens=3), False, ignore_eos=True)
             for adapter in ("one", "two")]
    futures = engine.submit_together(works, [hold, None])
    assert entered.wait(30)
    return gate, futures


def test_running_and_waiting_requests_by_adapter_and_as_the_gateway_reads_them(client):
    engine = client.app.state.runtime.engine
    gate, held = hold_engine_mid_batch(client)
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            queued = [pool.submit(ask, client, adapter, max_new_tokens=2) for adapter in ("three", "three", None)]
            for _ in range(1000):
                if engine.queue_depth == 3:
                    break
                time.sleep(0.01)
            assert engine.queue_depth == 3
            before = time.time()
            reply = client.get("/metrics")
            after = time.time()
            gate.set()
            assert [future.result()["adapter"] for future in queued] == ["three", "three", None]
    finally:
        gate.set()
    assert [len(future.result(30).token_ids) for future in held] == [3, 3]

    running, waiting, max_lora, stamp = gateway_lora_view(reply.text)
    assert (running, waiting, max_lora) == ({"one", "two"}, {"three"}, MAX_RESIDENT)  # the base is no LoRA
    assert before <= stamp <= after
    samples = samples_of(reply.text)
    assert value(samples, "loraswap_requests_running") == 2 and value(samples, "loraswap_requests_waiting") == 3
    assert per_adapter(samples, "loraswap_adapter_requests_running") == {"one": 1, "two": 1, "three": 0, "none": 0}
    assert per_adapter(samples, "loraswap_adapter_requests_waiting") == {"one": 0, "two": 0, "three": 2, "none": 1}

    idle = client.get("/metrics").text
    assert gateway_lora_view(idle)[:3] == (set(), set(), MAX_RESIDENT)
    samples = samples_of(idle)
    assert value(samples, "loraswap_requests_running") == value(samples, "loraswap_requests_waiting") == 0
    assert set(per_adapter(samples, "loraswap_adapter_requests_running").values()) == {0}


def test_one_lora_info_series_whose_value_is_the_newest(client):
    """vLLM leaves a series behind for every set of adapters it ever saw; here there is one, the state now, so the
    extension's pick of the newest is the only choice and the series stay bounded."""
    ask(client, "one", max_new_tokens=1)
    first = lora_info_samples(client.get("/metrics").text)
    ask(client, "two", max_new_tokens=1)
    second = lora_info_samples(client.get("/metrics").text)
    assert len(first) == len(second) == 1
    assert second[0].value > first[0].value


def test_resident_and_merged_state_per_adapter_follows_the_registry(client, extra):
    def states() -> dict[str, tuple[float, float]]:
        samples = scrape(client)
        resident, merged = (per_adapter(samples, f"loraswap_adapter_{gauge}") for gauge in ("resident", "merged"))
        assert set(resident) == set(merged)
        return {name: (resident[name], merged[name]) for name in resident}

    def expected() -> dict[str, tuple[float, float]]:
        return {name: (float(adapter["state"] in ("resident", "merged")), float(adapter["state"] == "merged"))
                for name, adapter in listed(client).items()}

    loaded = client.post("/adapters", json={"name": "four", "path": str(extra / "three")}, headers=ADMIN)
    assert loaded.status_code == 201, loaded.text
    assert states() == expected() and states()["four"] == (0, 0)  # registered, not yet in a slot
    ask(client, "four", max_new_tokens=1)
    assert states() == expected() and states()["four"] == (1, 0)
    assert client.post("/adapters/four/merge", headers=ADMIN).status_code == 200
    assert states() == expected() and states()["four"] == (1, 1)
    assert sum(merged for _, merged in states().values()) == 1
    assert client.post("/adapters/unmerge", headers=ADMIN).status_code == 200
    assert states()["four"][1] == 0
    assert client.delete("/adapters/four", headers=ADMIN).status_code == 200
    samples = scrape(client)
    assert not any(("adapter", "four") in labels for _, labels in samples), "an unregistered adapter's series stay"
    assert states() == expected()


def lora_info_samples(text: str) -> list:
    return [sample for family in text_string_to_metric_families(text) if family.name == "vllm:lora_requests_info"
            for sample in family.samples]

"""GET /metrics: scrape, make requests, scrape again; every metric of DESIGN.md moves where it should,
and label values come only from route templates and registered adapters."""
from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi import Request
from prometheus_client import REGISTRY

from service.http.app import NO_ADAPTER_LABEL
from service.http.routes import runtime
from service.lora.adapter_files import NAME_PATTERN
from service.metrics import UNREGISTERED_LABEL
from service.tasks.labels import MOST_LABEL_TOKENS
from tests.engine.engine_helpers import paused
from tests.server_helpers import (
    ADMIN,
    ask,
    classify,
    label_values,
    listed,
    ready_client,
    scrape,
    settings_in,
    value,
    wait_until,
)
from tests.tiny_models import make_adapter

DURATION = "loraswap_request_duration_seconds"
ROUTES = {"/answer", "/nli", "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model}",
          "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters", "/adapters/{name}", "/adapters/{name}/merge",
          "/adapters/unmerge", "/health", "/ready"}


@pytest.fixture(scope="module")
def extra(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics_extra")
    make_adapter(tiny_llama_dir, root / "three", seed=2)
    return root


@pytest.fixture(scope="module")
def client(tiny_llama_dir, llama_adapters, extra, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    settings = settings_in(root, tiny_llama_dir, llama_adapters, adapter_roots=[extra])
    with ready_client(settings) as client:
        yield client


def moved(before, after, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_request_duration_by_endpoint_adapter_and_status(client):
    before = scrape(client)
    for _ in range(3):
        ask(client, "one", max_new_tokens=3)
    ask(client, None, max_new_tokens=3)
    classify(client, "two")
    classify(client, "two")
    ask(client, "nope", status=404)
    assert client.post("/v1/completions", json={"model": "one", "prompt": "Hello", "max_tokens": 2}).status_code == 200
    after = scrape(client)

    expected = {("/answer", "one", "200"): 3, ("/answer", "none", "200"): 1, ("/nli", "two", "200"): 2,
                ("/answer", NO_ADAPTER_LABEL, "404"): 1, ("/v1/completions", "one", "200"): 1}
    for (endpoint, adapter, status), count in expected.items():
        labels = {"endpoint": endpoint, "adapter": adapter, "status": status}
        assert moved(before, after, f"{DURATION}_count", **labels) == count, labels
        assert moved(before, after, f"{DURATION}_bucket", le="+Inf", **labels) == count, labels
        assert moved(before, after, f"{DURATION}_sum", **labels) > 0, labels
    assert moved(before, after, f"{DURATION}_count", endpoint="/nli", adapter="one", status="200") == 0


def test_the_model_info_names_the_base_its_device_dtype_and_quantization(client, tiny_llama_dir):
    """One series of value 1 (``loadtest`` reads the dtype from it): the tests' base on the CPU, in float32, named by
    its folder's name, not its path (``/metrics`` needs no key)."""
    infos = [(dict(labels), count) for (name, labels), count in scrape(client).items() if name == "loraswap_model_info"]
    assert infos == [({"base": tiny_llama_dir.name, "device": "cpu", "dtype": "float32", "quantize": "none"}, 1.0)]


def test_engine_metrics_move_with_the_work_done(client):
    before = scrape(client)
    answers = [ask(client, adapter, max_new_tokens=5) for adapter in ("one", "one", "two", None)]
    classify(client, "one")
    completion = client.post("/v1/completions", json={"model": "two", "prompt": "Hi", "max_tokens": 4}).json()
    after = scrape(client)

    engine_requests = len(answers) + 2
    assert moved(before, after, "loraswap_queue_wait_seconds_count") == engine_requests
    assert moved(before, after, "loraswap_batch_size_sum") == engine_requests  # every request in exactly one batch
    assert 1 <= moved(before, after, "loraswap_batch_size_count") <= engine_requests
    tokens = {"one": answers[0]["tokens"] + answers[1]["tokens"],
              "two": answers[2]["tokens"] + completion["usage"]["completion_tokens"], "none": answers[3]["tokens"]}
    generations = {"one": 2, "two": 2, "none": 1}
    for adapter in tokens:
        assert moved(before, after, "loraswap_generated_tokens_total", adapter=adapter) == tokens[adapter], adapter
        assert moved(before, after, "loraswap_time_to_first_token_seconds_count", adapter=adapter) == \
            generations[adapter], adapter
        assert moved(before, after, "loraswap_time_to_first_token_seconds_sum", adapter=adapter) > 0, adapter


def test_adapter_load_time_and_resident_gauge(client, extra):
    before = scrape(client)
    reply = client.post("/adapters", json={"name": "three", "path": str(extra / "three")}, headers=ADMIN)
    assert reply.status_code == 201, reply.text
    refused = client.post("/adapters", json={"name": "four", "path": "/etc"}, headers=ADMIN)
    assert refused.status_code == 403
    after = scrape(client)
    assert moved(before, after, "loraswap_adapter_load_seconds_count") == 1  # refusals are not loads
    assert moved(before, after, "loraswap_adapter_load_seconds_sum") > 0

    def resident() -> int:
        return sum(adapter["state"] == "resident" for adapter in listed(client).values())

    for name in ("one", "two", "three"):
        ask(client, name, max_new_tokens=1)
        assert value(scrape(client), "loraswap_adapters_resident") == resident() >= 1
    assert resident() == 3
    assert client.delete("/adapters/three", headers=ADMIN).status_code == 200
    ask(client, "one", max_new_tokens=1)  # the engine frees the deleted adapter's slot at its next batch
    assert value(scrape(client), "loraswap_adapters_resident") == resident() == 2


def test_merges_and_unmerges_are_counted_and_timed(client):
    before = scrape(client)
    assert client.post("/adapters/one/merge", headers=ADMIN).status_code == 200
    assert client.post("/adapters/two/merge", headers=ADMIN).status_code == 200  # unmerges one first
    for _ in range(2):  # the second has nothing to unmerge
        assert client.post("/adapters/unmerge", headers=ADMIN).status_code == 200
    after = scrape(client)
    switches = {("merge", "one"): 1, ("unmerge", "one"): 1, ("merge", "two"): 1, ("unmerge", "two"): 1}
    for (action, adapter), count in switches.items():
        assert moved(before, after, "loraswap_merge_switch_seconds_count", action=action, adapter=adapter) == count
        assert moved(before, after, "loraswap_merge_switch_seconds_sum", action=action, adapter=adapter) > 0


def test_a_scrape_with_nothing_else_being_served_reports_zero_in_flight(client):
    """The scrape itself is not a request in flight."""
    assert value(scrape(client), "loraswap_requests_in_flight") == 0


def test_a_readiness_probe_is_not_in_flight_while_it_is_answered(client):
    """/ready reads the gauge from inside the request, through an overridden dependency: still 0."""
    seen = []

    async def observing(request: Request):
        seen.append(REGISTRY.get_sample_value("loraswap_requests_in_flight"))
        return await runtime(request)

    client.app.dependency_overrides[runtime] = observing
    try:
        assert client.get("/ready").status_code == 200
    finally:
        client.app.dependency_overrides.clear()
    assert seen == [0]


def test_requests_in_flight_and_queue_wait_while_the_engine_is_held(client):
    """Hold the engine thread (a control call that waits on a gate): requests stay in flight and queued."""
    engine = client.app.state.runtime.engine
    idle = value(scrape(client), "loraswap_requests_in_flight")
    before = scrape(client)
    gate, entered = threading.Event(), threading.Event()
    held = engine.call(lambda: (entered.set(), gate.wait(30)))
    assert entered.wait(10)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(ask, client, "two", max_new_tokens=2) for _ in range(4)]
        for _ in range(400):
            if value(scrape(client), "loraswap_requests_in_flight") == idle + 4 and engine.queue_depth == 4:
                break
            gate.wait(0.01)
        in_flight = value(scrape(client), "loraswap_requests_in_flight")
        threading.Timer(0.3, gate.set).start()
        assert all(future.result()["adapter"] == "two" for future in futures)
    held.result(10)
    assert in_flight == idle + 4
    after = scrape(client)
    assert value(after, "loraswap_requests_in_flight") == idle
    # the four waited at least 0.3 s in the queue: none in the buckets up to 0.25 s
    assert moved(before, after, "loraswap_queue_wait_seconds_count") == 4
    assert moved(before, after, "loraswap_queue_wait_seconds_bucket", le="0.25") == 0


def test_label_values_never_come_from_raw_input(client):
    raw = {"nope", "x" * 40, "gpt-4", "bad name", "/adapters/nope", "/adapters/nope/merge", "/no/such/route"}
    ask(client, "nope", status=404)
    classify(client, "x" * 40, status=404)
    assert client.post("/v1/completions", json={"model": "gpt-4", "prompt": "Hi"}).status_code == 404
    assert client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [
        {"role": "user", "content": "Hi"}]}).status_code == 404
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}, headers=ADMIN).status_code == 404
    assert client.delete("/adapters/nope", headers=ADMIN).status_code == 404
    assert client.post("/adapters/nope/merge", headers=ADMIN).status_code == 404
    assert client.get("/no/such/route").status_code == 404
    assert client.post("/answer", json={"context": "c", "question": "q", "adapter": "bad name"}).status_code == 422
    samples = scrape(client)
    adapters, endpoints = label_values(samples, "adapter"), label_values(samples, "endpoint")
    assert not (adapters | endpoints) & raw
    fixed = {NO_ADAPTER_LABEL, UNREGISTERED_LABEL}  # labels of no adapter's name
    assert all(NAME_PATTERN.fullmatch(adapter) for adapter in adapters - fixed), adapters
    assert {"one", "two", "none"} <= adapters
    assert endpoints <= ROUTES, endpoints  # route templates only; /metrics itself is not timed


def test_the_api_schema_documents_the_metrics_format(client):
    documented = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    served = client.get("/metrics").headers["content-type"]
    assert list(documented) == ["text/plain"] and served.startswith("text/plain")


def adapter_series(samples, name: str) -> set:
    """The series (sample name, labels) of every loraswap_ metric labelled with the adapter ``name``."""
    return {key for key in samples if key[0].startswith("loraswap_") and ("adapter", name) in key[1]}


def churn_round(client, extra, name: str) -> None:
    """Register ``name``, use it, merge it, then delete it (its series must go with it)."""
    assert client.post("/adapters", json={"name": name, "path": str(extra / "three")}, headers=ADMIN).status_code == 201
    ask(client, name, max_new_tokens=2)
    assert client.post(f"/adapters/{name}/merge", headers=ADMIN).status_code == 200
    samples = scrape(client)
    assert value(samples, f"{DURATION}_count", endpoint="/answer", adapter=name, status="200") == 1  # recorded anew
    assert value(samples, "loraswap_merge_switch_seconds_count", action="merge", adapter=name) == 1
    assert adapter_series(samples, name)
    assert client.delete(f"/adapters/{name}", headers=ADMIN).status_code == 200
    assert not adapter_series(scrape(client), name)


def test_an_adapters_series_go_with_it_and_churn_keeps_metrics_bounded(client, extra):
    churn_round(client, extra, "churn")  # the first round makes every other series it touches
    series = set(scrape(client))
    for _ in range(10):  # a series a round leaves behind shows in the first; 10 rounds, not 50: 18 s of the suite
        churn_round(client, extra, "churn")
    assert set(scrape(client)) == series


def test_a_request_in_flight_when_its_adapter_goes_is_counted_once_without_bringing_its_series_back(client, extra):
    """Hold the engine; queue a request for an adapter, delete the adapter, release the engine: the request, answered
    404, is counted once, under adapter UNREGISTERED_LABEL (a review: it was counted nowhere), and its late
    observations do not bring the adapter's series back."""
    engine = client.app.state.runtime.engine
    loaded = client.post("/adapters", json={"name": "late", "path": str(extra / "three")}, headers=ADMIN)
    assert loaded.status_code == 201
    ask(client, "late", max_new_tokens=1)
    before = scrape(client)
    gate, entered = threading.Event(), threading.Event()
    held = engine.call(lambda: (entered.set(), gate.wait(30)))
    assert entered.wait(10)
    with ThreadPoolExecutor(max_workers=1) as pool:
        late = pool.submit(client.post, "/answer", json={"context": "c", "question": "q", "adapter": "late"})
        wait_until(lambda: engine.queue_depth == 1, "the request queued")
        assert client.delete("/adapters/late", headers=ADMIN).status_code == 200
        gate.set()
        assert late.result(30).status_code == 404
    held.result(10)
    after = scrape(client)
    assert not adapter_series(after, "late")
    answers = {key: after[key] - before.get(key, 0) for key in after
               if key[0] == f"{DURATION}_count" and ("endpoint", "/answer") in key[1]}
    assert {dict(key[1])["adapter"]: (dict(key[1])["status"], moved)
            for key, moved in answers.items() if moved} == {UNREGISTERED_LABEL: ("404", 1)}


TOO_MANY_TOKENS = "\u3041" * (MOST_LABEL_TOKENS // 3 + 1)  # a label within its characters past its tokens


def test_a_request_is_counted_under_its_adapter_once_valid_and_its_adapter_known(tiny_llama_dir, llama_adapters,
                                                                                  tmp_path):
    """One rule for the adapter label of a refused request (a review: two 422s of max_tokens were labelled "-" and
    "none"; a 422 of a check past the schema carried the adapter, and would not beside a field fault): "-" until the
    request is valid (every 422 naming its fields, whichever check found the fault) and its adapter known (404), and
    for a body refused before it is read (413 over max_body_bytes); its adapter once valid and known, whatever answers
    it: a 413 for a prompt too long, a 429 for a full queue, a 200."""
    settings = settings_in(tmp_path, tiny_llama_dir, llama_adapters, max_queue=1, max_input_tokens=32,
                           max_body_bytes=4096)
    asked = [  # (route, body, status, label)
        ("/answer", {"adapter": "one", "decoding": {"max_new_tokens": 0}}, 422, NO_ADAPTER_LABEL),
        ("/answer", {"adapter": "one", "decoding": {"max_new_tokens": 100}}, 422, NO_ADAPTER_LABEL),  # past the cap
        ("/nli", {"adapter": "one", "labels": ["yes", TOO_MANY_TOKENS]}, 422, NO_ADAPTER_LABEL),  # past the schema
        ("/nli", {"adapter": "one", "labels": ["yes", TOO_MANY_TOKENS], "premise": ""}, 422, NO_ADAPTER_LABEL),
        ("/v1/chat/completions", {"model": "one", "messages": [{"role": "user", "content": "x"}], "n": 0}, 422,
         NO_ADAPTER_LABEL),
        ("/answer", {"adapter": "nope"}, 404, NO_ADAPTER_LABEL),
        ("/v1/completions", {"model": "one", "prompt": "x" * 5000}, 413, NO_ADAPTER_LABEL),  # the body
        ("/v1/completions", {"model": "one", "prompt": "a b c d e f g h " * 40}, 400, "one"),  # the prompt
        ("/nli", {"adapter": "one"}, 200, "one"),
    ]
    bodies = {"/answer": {"context": "Paris is in France.", "question": "Where is Paris?"},
              "/nli": {"premise": "A dog runs.", "hypothesis": "An animal moves."},
              "/v1/completions": {"max_tokens": 1}, "/v1/chat/completions": {"max_tokens": 1}}
    with ready_client(settings) as client:
        before = scrape(client)
        for route, body, status, _ in asked:
            assert client.post(route, json={**bodies[route], **body}).status_code == status, (route, body)
        engine = client.app.state.runtime.engine
        with ThreadPoolExecutor(max_workers=1) as pool:
            with paused(engine):  # one request queued: the queue is full
                queued = pool.submit(client.post, "/v1/completions", json={"model": "one", "prompt": "Hi",
                                                                           "max_tokens": 1})
                wait_until(lambda: sum(engine.requests_by_adapter()[1].values()) == 1, "the request queued")
                full = client.post("/v1/completions", json={"model": "two", "prompt": "Hi", "max_tokens": 1})
            assert (full.status_code, queued.result().status_code) == (429, 200), full.text
        after = scrape(client)
    counted = Counter((route, label, str(status)) for route, _, status, label in asked)
    counted.update([("/v1/completions", "two", "429"), ("/v1/completions", "one", "200")])
    for route, _, status in counted:
        for label in ("none", "one", "two", NO_ADAPTER_LABEL):
            labels = {"endpoint": route, "adapter": label, "status": status}
            assert moved(before, after, f"{DURATION}_count", **labels) == counted[route, label, status], labels

"""The engine: batched requests across adapters give exactly what each request gets alone.

Engines run on the tiny bases with three adapters of ranks 2, 4 and 8 (see lora_helpers). The
reference for a request is the same request submitted alone to an engine that never merges.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ClassVar

import pytest
from prometheus_client import REGISTRY

from loadtest.timing import Stamped
from service.engine import scheduler as engine_module
from service.engine.prefill import Prefill
from service.engine.requests import Generation, GenerationResult, Scoring, run_all
from service.engine.running_batch import RunningBatch
from service.engine.sampling import Decoding
from service.engine.scheduler import Engine
from service.errors import AdapterError, EngineFailed, EngineStopped, QueueFull, RequestAbandoned
from service.http.errors import status_of
from service.tasks.tasks import Tasks
from tests.engine.engine_helpers import (
    WAIT,
    WatchedSteps,
    alone,
    greedy,
    long_generation,
    paused,
    prompt,
    results,
    same_output,
)
from tests.lora_helpers import BASES


def assert_same_outputs(got: list[GenerationResult], expected: list[GenerationResult], works: list[Generation]):
    wrong = [(row, work.adapter) for row, (a, b, work) in enumerate(zip(got, expected, works)) if not same_output(a, b)]
    assert not wrong, f"rows (index, adapter) that differ from the request run alone: {wrong}"


# ---- (a) concurrency ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(BASES))
def test_concurrent_mixed_requests_each_equal_the_request_alone(engines, arch):
    engine = engines.shared(arch)
    rng = random.Random(1)
    works = [
        greedy(rng, rng.choice(["r2", "r8", None]), max_new_tokens=rng.randint(3, 12),
               stop_at_newline=rng.random() < 0.5)
        for _ in range(48)
    ]
    expected = [alone(engine, work) for work in works]
    same_prompt = [alone(engine, Generation(works[0].prompt_ids, name, Decoding(max_new_tokens=12), False)).token_ids
                   for name in ("r2", "r8", None)]
    assert len({tuple(ids) for ids in same_prompt}) == 3, "the adapters do not change the greedy output"

    def submit_slice(start: int) -> list[GenerationResult]:  # each thread submits six, then waits for them
        return results([engine.submit(work) for work in works[start:start + 6]])

    with ThreadPoolExecutor(8) as pool:
        concurrent = [result for part in pool.map(submit_slice, range(0, len(works), 6)) for result in part]
    assert_same_outputs(concurrent, expected, works)
    with paused(engine):  # and all queued at once: full batches of 16 mixing every adapter and None
        futures = [engine.submit(work) for work in works]
    assert_same_outputs(results(futures), expected, works)
    assert all(result.time_to_first_token >= 0 for result in expected)


# ---- (b) seeded sampling -------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_across_batch_compositions(engines):
    engine = engines.shared()
    rng = random.Random(2)
    decodings = [Decoding("temperature", temperature=1.5, seed=7, max_new_tokens=10),
                 Decoding("top_k", top_k=20, temperature=1.2, seed=8, max_new_tokens=8),
                 Decoding("nucleus", top_p=0.95, temperature=1.3, seed=9, max_new_tokens=12)]
    targets = [Generation(prompt(rng), name, decoding, False) for name, decoding in zip(["r2", None, "r8"], decodings)]
    expected = [alone(engine, work) for work in targets]
    as_greedy = [alone(engine, Generation(w.prompt_ids, w.adapter, Decoding(max_new_tokens=12), False))
                 for w in targets]
    assert all(s.token_ids != g.token_ids[: len(s.token_ids)] for s, g in zip(expected, as_greedy)), "not sampling"
    reseeded = Generation(targets[0].prompt_ids, "r2",
                          Decoding("temperature", temperature=1.5, seed=70, max_new_tokens=10), False)
    assert alone(engine, reseeded).token_ids != expected[0].token_ids, "the seed does not matter"
    for layout in range(3):
        fillers = [
            Generation(prompt(rng), rng.choice(["r2", "r4", "r8", None]),
                       Decoding(rng.choice(["greedy", "temperature", "top_k", "nucleus"]), seed=rng.randrange(10**6),
                                max_new_tokens=rng.randint(1, 12)), False)
            for _ in range(3 + 2 * layout)
        ]
        batch = fillers[:layout] + targets[::-1 if layout % 2 else 1] + fillers[layout:]
        with paused(engine):
            futures = {id(work): engine.submit(work) for work in batch}
        for work, result in zip(targets, expected):
            assert futures[id(work)].result(WAIT).token_ids == result.token_ids, f"layout {layout}, {work.decoding}"


# ---- (c) rows leaving the batch ------------------------------------------------------------------

def test_rows_that_finish_early_leave_the_other_rows_untouched(engines):
    engine = engines.shared()
    rng = random.Random(3)
    # near-uniform sampling over the vocabulary now and then hits the newline or the end-of-text token
    candidates = [Generation(prompt(rng), rng.choice(["r2", "r8", None]),
                             Decoding("temperature", temperature=5.0, seed=seed, max_new_tokens=12))
                  for seed in range(160)]
    stopping = [work for work, result in zip(candidates, run_all(engine, candidates)) if result.finish_reason == "stop"]
    lengths = [Generation(prompt(rng), name, Decoding(max_new_tokens=n), False)
               for name, n in [("r4", 1), (None, 3), ("r2", 6), ("r8", 16), (None, 16), ("r4", 24)]]
    works = stopping + lengths
    rng.shuffle(works)
    expected = [alone(engine, work) for work in works]
    stops = [len(result.token_ids) for result in expected if result.finish_reason == "stop"]
    assert len(stops) >= 2 and max(stops) >= 2, f"too few rows stop after their first step: {stops}"
    assert sorted(len(r.token_ids) for r in expected if r.finish_reason == "length") == [1, 3, 6, 16, 16, 24]
    with paused(engine):
        futures = [engine.submit(work) for work in works]
    assert_same_outputs(results(futures), expected, works)


# ---- (d) scoring ---------------------------------------------------------------------------------

def test_scoring_returns_probabilities_that_sum_to_one(engines):
    engine = engines.shared()
    rng = random.Random(4)
    works = [Scoring(prompt(rng), name, [rng.randrange(1, 1000) for _ in range(size)])
             for name, size in [("r2", 3), (None, 3), ("r8", 5), ("r4", 2), (None, 1)]]
    same_prompt = [Scoring(works[0].prompt_ids, name, works[0].candidates) for name in ("r4", "r8", None)]
    works += same_prompt
    expected = [alone(engine, work) for work in works]
    for work, probabilities in zip(works, expected):
        assert len(probabilities) == len(work.candidates)
        assert all(0.0 <= p <= 1.0 for p in probabilities)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    by_adapter = [expected[0], *expected[-3:]]
    assert len({tuple(round(p, 4) for p in probs) for probs in by_adapter}) == 4, "adapters do not change scores"
    generations = [greedy(rng, name) for name in ("r2", None, "r8")]
    expected_generations = [alone(engine, work) for work in generations]
    queued = works[:2] + generations[:1] + works[2:5] + generations[1:] + works[5:]
    with paused(engine):  # scorings and generations queued together, interleaved
        futures = [engine.submit(work) for work in queued]
    got = results(futures)
    scores = [result for result in got if isinstance(result, list)]
    assert len(scores) == len(works)
    for probabilities, reference in zip(scores, expected):
        assert probabilities == pytest.approx(reference, abs=1e-5)
    assert_same_outputs([r for r in got if not isinstance(r, list)], expected_generations, generations)


# ---- (e) merging and unmerging under traffic -----------------------------------------------------

def test_auto_merge_and_unmerge_serve_every_request_with_its_own_weights(engines):
    reference = engines.shared()
    engine = engines.fresh(auto_merge=True, merge_after=2, merge_cooldown=1)
    registry = engine.registry
    rng = random.Random(5)
    served: list[tuple[GenerationResult | list, Generation | Scoring]] = []

    def one_by_one(name: str, count: int) -> None:
        for _ in range(count):
            work = greedy(rng, name, max_new_tokens=12)
            served.append((alone(engine, work), work))

    def mixed(names: list[str | None]) -> None:
        works = [greedy(rng, name, max_new_tokens=12) for name in names]
        works.append(Scoring(prompt(rng), names[0], [5, 50, 500]))
        with paused(engine):
            futures = [engine.submit(work) for work in works]
        served.extend(zip(results(futures), works))

    one_by_one("r4", 3)
    assert registry.merged == "r4", "a run of single-adapter batches did not merge the adapter"
    one_by_one("r4", 1)
    assert registry.merged == "r4"  # that request was served by the merged base
    mixed(["r4", "r2", "r4", "r8"])
    assert registry.merged is None, "mixed traffic did not unmerge"
    one_by_one("r8", 4)
    assert registry.merged == "r8"
    one_by_one("r2", 1)  # one batch of another adapter alone
    assert registry.merged is None
    one_by_one("r8", 3)
    mixed([None, "r8", "r8"])  # the merged adapter's own rows beside bare-base rows
    assert registry.merged is None
    one_by_one(None, 3)  # the bare base alone is nothing to merge
    assert registry.merged is None
    for result, work in served:
        if isinstance(work, Scoring):
            assert result == pytest.approx(alone(reference, work), abs=1e-4)
        else:
            assert same_output(result, alone(reference, work)), f"{work.adapter} served with the wrong weights"
    assert reference.registry.merged is None


# ---- (f, g, h) lifecycle, back-pressure, adapters leaving ------------------------------------------

def test_stop_drains_the_queue_then_refuses_work(engines):
    reference = engines.shared()
    engine = engines.fresh()
    rng = random.Random(6)
    works = [greedy(rng, name) for name in ("r2", None, "r8", "r4") * 3] + [Scoring(prompt(rng), "r2", [1, 2])]
    holding, release = threading.Event(), threading.Event()
    engine.call(lambda: (holding.set(), release.wait(WAIT)))
    assert holding.wait(WAIT)
    futures = [engine.submit(work) for work in works]
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    deadline = time.monotonic() + WAIT
    while True:  # submissions are accepted until stop() takes effect, then refused
        try:
            extra = greedy(rng, "r2")
            futures.append(engine.submit(extra))
            works.append(extra)
        except EngineStopped:
            break
        assert time.monotonic() < deadline, "stop() never started refusing work"
        time.sleep(0.001)
    release.set()
    stopper.join(WAIT)
    assert not stopper.is_alive(), "stop() did not return after draining"
    assert all(future.done() for future in futures)
    for future, work in zip(futures, works):
        expected = alone(reference, work)
        if isinstance(work, Scoring):
            assert future.result() == pytest.approx(expected, abs=1e-5)
        else:
            assert same_output(future.result(), expected)
    with pytest.raises(EngineStopped):
        engine.submit(works[0])


def test_a_full_queue_refuses_more_work(engines):
    engine = engines.fresh(max_queue=4)
    rng = random.Random(7)
    with paused(engine):
        futures = [engine.submit(greedy(rng, name)) for name in ("r2", None, "r8", "r2")]
        with pytest.raises(QueueFull):
            engine.submit(greedy(rng, "r4"))
        with pytest.raises(QueueFull):
            engine.submit(Scoring(prompt(rng), None, [1, 2]))
    assert all(isinstance(result, GenerationResult) for result in results(futures))
    assert isinstance(alone(engine, greedy(rng, "r4")), GenerationResult)  # room again once drained


def test_an_adapter_unregistered_while_queued_fails_only_its_requests(engines):
    reference = engines.shared()
    engine = engines.fresh()
    _, adapters = engines.base("llama")
    engine.registry.register("victim", adapters["r4"])
    rng = random.Random(8)
    works = [greedy(rng, "victim"), greedy(rng, "r4"), Scoring(prompt(rng), "victim", [1, 2, 3]),
             greedy(rng, None), greedy(rng, "victim"), Scoring(prompt(rng), "r2", [4, 5]), greedy(rng, "r8")]
    alone(engine, works[0])  # make "victim" resident first, so unregistering it must also clear its slot
    with paused(engine):
        futures = [engine.submit(work) for work in works]
        engine.registry.unregister("victim")
    for future, work in zip(futures, works):
        if work.adapter == "victim":
            with pytest.raises(AdapterError) as failed:
                future.result(WAIT)
            assert status_of(type(failed.value)) == 404
        elif isinstance(work, Scoring):
            assert future.result(WAIT) == pytest.approx(alone(reference, work), abs=1e-5)
        else:
            assert same_output(future.result(WAIT), alone(reference, work))
    with pytest.raises(AdapterError):
        alone(engine, greedy(rng, "victim"))
    assert same_output(alone(engine, works[1]), alone(reference, works[1]))


def test_more_adapters_queued_than_device_slots_are_all_served(engines):
    reference = engines.shared()
    engine = engines.fresh(max_resident=2)
    rng = random.Random(9)
    works = [greedy(rng, name) for name in ("r2", "r4", "r8", None, "r2")]
    with paused(engine):
        futures = [engine.submit(work) for work in works]
    assert_same_outputs(results(futures), [alone(reference, work) for work in works], works)


def test_eos_ids_from_the_generation_config_stop_generation(engines):
    reference = engines.shared()
    work = Generation(prompt(random.Random(10)), None, Decoding(max_new_tokens=16), stop_at_newline=False)
    tokens = alone(reference, work).token_ids
    assert len(tokens) == 16
    cut = next(k for k in range(2, len(tokens)) if tokens[k] not in tokens[:k])  # a token not seen before
    engine = engines.fresh(before_engine=lambda model: setattr(model.generation_config, "eos_token_id", tokens[cut]))
    result = alone(engine, work)
    assert (result.token_ids, result.finish_reason) == (tokens[:cut], "stop")


# ---- continuous batching -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(BASES))
def test_requests_are_served_during_a_running_batch_and_get_what_they_get_alone(engines, arch):
    engine = engines.fresh(arch, max_new_tokens=400)
    rng = random.Random(5)
    long_work = Generation(prompt(rng, 20, 30), "r8", Decoding(max_new_tokens=400), False, ignore_eos=True)
    joiners = [Generation(prompt(rng), "r2", Decoding(max_new_tokens=3), False),
               Generation(prompt(rng, 30, 40), None, Decoding("temperature", temperature=1.4, seed=3, max_new_tokens=4),
                          False),
               Generation(prompt(rng), "r4", Decoding("top_k", top_k=10, seed=4, max_new_tokens=5), False)]
    scoring = Scoring(prompt(rng), "r4", [5, 6, 7])
    expected = [alone(engine, work) for work in [long_work, *joiners]]
    expected_scores = alone(engine, scoring)
    running = engine.submit(long_work)
    deadline = time.monotonic() + WAIT
    while engine.queue_depth and time.monotonic() < deadline:  # the long request has left the queue
        time.sleep(0.001)
    scored = engine.submit(scoring)
    joined = [engine.submit(work) for work in joiners]
    done = results(joined)
    assert scored.result(WAIT) == pytest.approx(expected_scores, abs=1e-6)
    assert not running.done(), "the running batch ended before the newcomers finished: they were not served"
    assert_same_outputs([running.result(WAIT), *done], expected, [long_work, *joiners])


class CountedPrefills(Prefill):
    """The engine's prompt passes, noting their chunks; a hook can act at a chosen chunk."""

    budgets: ClassVar[list[int]] = []  # the token budget of every chunk run, in order
    ended: ClassVar[list[float]] = []  # when each chunk ended (perf_counter)
    on_first_chunk = None  # if set, called once, on the engine thread, before the next pass's first chunk

    def advance(self, budget: int = 0) -> None:
        hook, CountedPrefills.on_first_chunk = CountedPrefills.on_first_chunk, None
        if hook is not None:
            hook()
        super().advance(budget)
        CountedPrefills.budgets.append(budget)
        CountedPrefills.ended.append(time.perf_counter())


@pytest.fixture
def counted_passes(monkeypatch):
    CountedPrefills.budgets, CountedPrefills.ended, CountedPrefills.on_first_chunk = [], [], None
    monkeypatch.setattr(engine_module, "Prefill", CountedPrefills)
    return CountedPrefills


def start_long_request(engine: Engine, rng: random.Random) -> tuple[Generation, Future]:
    """A 300-token generation, its prompt run (it is decoding) when this returns; needs ``counted_passes``."""
    work = Generation(prompt(rng, 20, 30), "r8", Decoding(max_new_tokens=300), False, ignore_eos=True)
    CountedPrefills.budgets.clear()
    future = engine.submit(work)
    deadline = time.monotonic() + WAIT
    while not CountedPrefills.budgets and time.monotonic() < deadline:
        time.sleep(0.001)
    return work, future


def test_long_prompts_join_a_chunk_per_pause_and_get_what_they_get_alone(engines, counted_passes):
    engine = engines.fresh(max_new_tokens=300, prefill_chunk=8)
    rng = random.Random(11)
    joiners = [Generation(prompt(rng, 60, 80), name, Decoding(max_new_tokens=4), False) for name in ("r2", None)]
    expected = [alone(engine, work) for work in joiners]
    long_work, running = start_long_request(engine, rng)
    futures = [engine.submit(work) for work in joiners]
    assert_same_outputs(results(futures), expected, joiners)
    assert not running.done(), "the running request ended before the joiners were served"
    budgets = counted_passes.budgets[1:]  # the joiners' chunks (one pass for both, or one each)
    assert len(budgets) >= 60 // 4 and set(budgets) == {8}, (
        f"the joiners' prompts did not run 8 tokens a pause: {budgets}")
    assert same_output(running.result(WAIT), alone(engine, long_work))


def test_an_adapter_deleted_while_its_request_joins_serves_that_request_with_its_weights(engines, counted_passes):
    """A request is bound to its adapter's weights when it is taken: deleting the adapter while the request's
    prompt runs leaves it those weights; their slot is freed once no row uses them."""
    engine = engines.fresh(max_new_tokens=300, prefill_chunk=8)
    _, adapters = engines.base("llama")
    engine.registry.register("victim", adapters["r4"])
    rng = random.Random(12)
    victim = Generation(prompt(rng, 60, 80), "victim", Decoding(max_new_tokens=4), False)
    long_work, running = start_long_request(engine, rng)
    counted_passes.on_first_chunk = lambda: engine.registry.unregister("victim")  # its slot was just filled
    served = engine.submit(victim).result(WAIT)
    assert "victim" not in engine.registry.names() and not running.done()
    assert same_output(served, alone(engines.shared(), dataclasses.replace(victim, adapter="r4")))
    assert same_output(running.result(WAIT), alone(engine, long_work))
    assert engine.registry.resident_count == 1  # only r8 holds a slot


def test_rows_keep_the_weights_they_were_admitted_with_when_their_name_is_registered_again(engines):
    """Eight generations for x run; x is unloaded and another adapter registered as x; one more request for x joins
    the running batch. The eight finish with the old x's weights, the joiner gets the new x's: nothing switches."""
    engine = engines.fresh(max_new_tokens=64)
    _, adapters = engines.base("llama")
    engine.registry.register("x", adapters["r4"])
    rng = random.Random(20)
    first = [long_generation(rng, "x", 64) for _ in range(8)]
    joiner = long_generation(rng, "x", 16)
    expected = [alone(engine, work) for work in first]  # with the first x's weights
    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=5)
    with paused(engine):
        futures = [engine.submit(work) for work in first]
    assert steps.holding.wait(WAIT)  # the eight are decoding
    engine.registry.unregister("x")
    engine.registry.register("x", adapters["r8"])
    joined = engine.submit(joiner)
    steps.release.set()
    assert_same_outputs(results(futures), expected, first)
    joined = joined.result(WAIT)
    assert max(steps.notes) == 9, f"the joiner did not join the running rows: rows per step {steps.notes}"
    assert same_output(joined, alone(engine, joiner))  # with the second x's weights
    assert not same_output(joined, alone(engine, dataclasses.replace(joiner, adapter="r4")))


def test_a_failure_mid_batch_fails_the_joined_requests_too_and_the_engine_goes_on(engines, counted_passes):
    engine = engines.fresh(max_new_tokens=300)
    rng = random.Random(13)
    _, running = start_long_request(engine, rng)
    counted_passes.on_first_chunk = lambda: (_ for _ in ()).throw(RuntimeError("injected"))
    joined = engine.submit(greedy(rng, "r2"))
    for future in (joined, running):
        with pytest.raises(RuntimeError, match="injected"):
            future.result(WAIT)
    work = greedy(rng, "r4")
    assert same_output(alone(engine, work), alone(engines.shared(), work))


def test_adapters_loaded_beside_a_running_batch_take_one_pause_each_and_it_does_nothing_else(engines, counted_passes):
    engine = engines.fresh(max_new_tokens=300, prefill_chunk=8)
    _, adapters = engines.base("llama")
    names = ["new2", "new4", "new8"]
    for name, source in zip(names, ("r2", "r4", "r8")):
        engine.registry.register(name, adapters[source])
    steps, fills = [], []  # (start, end) of each decoding step; (end, slots filled) of each activation
    engine.decoder = Stamped(engine.decoder, steps, engine.device)
    place = engine.registry.place

    def counted_place(weights_of_rows):
        slots, filled = place(weights_of_rows)
        fills.append((time.perf_counter(), filled))
        return slots, filled

    engine.registry.place = counted_place
    rng = random.Random(14)
    joiners = [Generation(prompt(rng, 60, 80), name, Decoding(max_new_tokens=4), False) for name in names]
    long_work, running = start_long_request(engine, rng)
    got = results([engine.submit(work) for work in joiners])
    assert not running.done(), "the running request ended before the joiners were served"
    pauses = [(end, start) for (_, end), (start, _) in itertools.pairwise(steps)]
    loads = [sum(n for at, n in fills if begin < at < end) for begin, end in pauses]
    chunks = [sum(begin < at < end for at in counted_passes.ended) for begin, end in pauses]
    assert sum(loads) == 3, f"the three adapters were not loaded between the running batch's steps: {loads}"
    assert max(loads) == 1, f"a pause loaded more than one adapter: {loads}"
    assert all(chunk == 0 for load, chunk in zip(loads, chunks) if load), "a pause that loaded also ran prompts"
    engine.registry.place = place
    assert same_output(running.result(WAIT), alone(engine, long_work))
    assert_same_outputs(got, [alone(engine, work) for work in joiners], joiners)


# ---- (f) abandoned requests ------------------------------------------------------------------------

def test_an_abandoned_running_request_leaves_its_batch_and_the_other_rows_are_untouched(engines):
    engine = engines.fresh(max_new_tokens=300)
    rng = random.Random(15)
    doomed, kept = long_generation(rng, "r8", 300), long_generation(rng, "r2", 20)
    expected = alone(engine, kept)
    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=3)
    tokens_before = generated_tokens("r8")
    with paused(engine):
        futures = [engine.submit(work) for work in (doomed, kept)]
    assert steps.holding.wait(WAIT)
    engine.abandon(futures[0])
    steps.release.set()
    assert same_output(futures[1].result(WAIT), expected)
    with pytest.raises(RequestAbandoned):
        futures[0].result(WAIT)
    assert steps.notes == [2] * 3 + [1] * 16, f"rows of each decoding step: {steps.notes}"
    # one token from its prompt, one from each of the three steps it ran
    assert generated_tokens("r8") - tokens_before == 4


def generated_tokens(adapter: str) -> float:
    return REGISTRY.get_sample_value("loraswap_generated_tokens_total", {"adapter": adapter}) or 0.0


def test_an_abandoned_queued_request_leaves_the_queue_and_a_finished_one_keeps_its_result(engines):
    engine = engines.fresh()
    rng = random.Random(16)
    finished_work = greedy(rng, "r4")
    finished = engine.submit(finished_work)
    expected = finished.result(WAIT)
    with paused(engine):
        queued = [engine.submit(greedy(rng, name)) for name in ("r2", None, "r8")]
        engine.abandon(queued[1])
        assert engine.queue_depth == 2 and queued[1].cancelled()
    assert all(isinstance(future.result(WAIT), GenerationResult) for future in (queued[0], queued[2]))
    engine.abandon(finished)
    assert finished.result() is expected


def test_a_cancelled_task_abandons_its_request(engines):
    """What the HTTP layer does when a client disconnects: cancel the task awaiting the engine."""
    engine = engines.fresh(max_new_tokens=300)
    tasks = Tasks(engine, engine.tokenizer, engine.settings, max_positions=512)
    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=3)
    rng = random.Random(17)

    async def cancel_while_decoding():
        awaiting = asyncio.ensure_future(tasks.outcome(long_generation(rng, "r8", 300)))
        assert await asyncio.to_thread(steps.holding.wait, WAIT)
        awaiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await awaiting
        steps.release.set()

    asyncio.run(cancel_while_decoding())
    later = greedy(rng, "r4", max_new_tokens=5)
    assert same_output(alone(engine, later), alone(engines.shared(), later))
    # three steps of the abandoned request (299 had it run on), then the four of the later one
    assert len(steps.notes) == 3 + 4, f"rows of each decoding step: {steps.notes}"


def test_withdrawing_the_only_queued_request_in_the_batch_window_leaves_the_engine_serving(engines):
    """A client that hangs up while its request waits out the batch window (alone in the queue) leaves the queue
    empty when the window ends: the engine takes no batch then, and serves the next request."""
    window = 0.5
    engine = engines.fresh(batch_window_ms=window * 1000)
    rng = random.Random(18)
    for _ in range(2):
        withdrawn = engine.submit(greedy(rng, "r2"))
        time.sleep(window / 5)  # the engine thread now waits in the window for more requests (none come)
        engine.abandon(withdrawn)
        assert withdrawn.cancelled()
        time.sleep(window)  # the window ends with the queue empty
    later = greedy(rng, "r4", max_new_tokens=5)
    assert same_output(alone(engine, later), alone(engines.shared(), later))
    assert engine.failure is None


class InjectedFault(BaseException):
    """A fault no handler of the engine loop catches (it is no Exception): the loop dies of it."""


def test_an_engine_thread_that_dies_fails_every_waiting_request_and_refuses_new_ones(engines):
    engine = engines.fresh()
    rng = random.Random(19)
    with paused(engine):  # queued behind the fault: they would wait for ever on a dead thread
        queued = [engine.submit(greedy(rng, name)) for name in ("r2", None, "r8")]
        fault = engine.call(lambda: (_ for _ in ()).throw(InjectedFault("injected")))
    with pytest.raises(InjectedFault):
        fault.result(WAIT)
    for future in queued:
        with pytest.raises(EngineFailed, match="InjectedFault: injected"):
            future.result(WAIT)
    assert engine.failure == "InjectedFault: injected"
    with pytest.raises(EngineFailed):
        engine.submit(greedy(rng, "r2"))
    with pytest.raises(EngineFailed):
        engine.call(lambda: None)


# ---- (g) a batch that never ends -------------------------------------------------------------------

FAIR = 30  # stream requests sent, at most, while a request or a call waits (the stream sends 300; 2-9 measured)


class SteadyStream:
    """Keeps ``width`` requests of ``feed()`` in flight, ``most`` in all: each finished one is replaced at once, from
    the engine thread, so the running batch never runs dry."""

    def __init__(self, engine: Engine, feed: Callable[[], Generation], width: int = 4, most: int = 300):
        self.engine, self.feed, self.most = engine, feed, most
        self.sent: list[tuple[Generation, Future]] = []
        self.lock = threading.Lock()
        for _ in range(width):
            self.another()
        time.sleep(0.1)

    def another(self, _=None) -> None:
        with self.lock:
            if len(self.sent) >= self.most:
                return
            work = self.feed()
            self.sent.append((work, self.engine.submit(work)))
            future = self.sent[-1][1]
        future.add_done_callback(self.another)

    def passed_while(self, start: Callable[[], Future]) -> tuple[int, object]:
        """How many requests of the stream were sent while what ``start()`` starts waited (``most`` or near it if
        it waited for the stream to end), and its result."""
        before = len(self.sent)
        result = start().result(WAIT)
        return len(self.sent) - before, result

    def served(self) -> list[tuple[Generation, GenerationResult]]:
        return [(work, future.result(WAIT)) for work, future in self.sent]


def test_a_request_for_other_weights_is_not_starved_by_a_stream_for_the_merged_adapter(engines):
    engine = engines.fresh()
    engine.call(lambda: engine.registry.merge("r2")).result(WAIT)
    rng = random.Random(18)
    work = greedy(rng, "r4", max_new_tokens=6)
    stream = SteadyStream(engine, lambda: greedy(rng, "r2", max_new_tokens=rng.randint(4, 12)))
    fed, result = stream.passed_while(lambda: engine.submit(work))
    assert fed < FAIR, f"the r4 request waited while {fed} requests for the merged r2 were sent"
    assert same_output(result, alone(engines.shared(), work)), "r4 was served with the wrong weights"
    stream.served()


def test_a_control_call_is_not_starved_by_a_stream_of_requests(engines):
    engine = engines.fresh()
    rng = random.Random(20)

    def mixed() -> Generation:
        return greedy(rng, rng.choice(["r2", "r8", None]), max_new_tokens=rng.randint(4, 12))

    stream = SteadyStream(engine, mixed)
    fed, _ = stream.passed_while(lambda: engine.call(lambda: engine.registry.merge("r4")))
    assert fed < FAIR, f"merging waited while {fed} requests were sent"
    stream.served()


class CountedBatches(RunningBatch):
    """The engine's running batch, counting the batches started."""

    started = 0

    def __init__(self, decoder):
        super().__init__(decoder)
        CountedBatches.started += 1


def test_a_steady_stream_for_one_adapter_is_merged_and_unmerged_while_its_batch_runs(engines, monkeypatch):
    reference = engines.shared()
    engine = engines.fresh(auto_merge=True, merge_after=3, merge_cooldown=2)
    monkeypatch.setattr(engine_module, "RunningBatch", CountedBatches)
    CountedBatches.started = 0
    engine.decoder = steps = WatchedSteps(engine.decoder, note=lambda _: engine.registry.merged)
    rng = random.Random(21)
    stream = SteadyStream(engine, lambda: greedy(rng, "r2", max_new_tokens=rng.randint(4, 12)), most=120)
    deadline = time.monotonic() + WAIT
    while "r2" not in steps.notes and len(stream.sent) < stream.most and time.monotonic() < deadline:
        time.sleep(0.001)
    assert "r2" in steps.notes, "a steady stream for r2 was never merged"
    other = greedy(rng, "r4", max_new_tokens=6)
    other_result = engine.submit(other).result(WAIT)
    served = [*stream.served(), (other, other_result)]
    assert CountedBatches.started == 1, f"the stream's batch ended: {CountedBatches.started} batches started"
    switches = [merged for merged, before in zip(steps.notes[1:], steps.notes) if merged != before]
    assert switches[:2] == ["r2", None], f"the merged adapter at each switch: {switches}"
    wrong = [work.adapter for work, result in served if not same_output(result, alone(reference, work))]
    assert not wrong, f"requests served with the wrong weights across a switch: {wrong}"


def test_a_request_for_an_adapter_without_a_free_slot_is_not_starved_by_a_stream_for_resident_ones(engines):
    engine = engines.fresh(max_resident=2)
    rng = random.Random(19)
    both = itertools.cycle(["r2", "r8"])
    work = greedy(rng, "r4", max_new_tokens=6)
    stream = SteadyStream(engine, lambda: greedy(rng, next(both), max_new_tokens=rng.randint(4, 12)), width=8)
    fed, result = stream.passed_while(lambda: engine.submit(work))
    assert fed < FAIR, f"the r4 request waited while {fed} requests for the two resident adapters were sent"
    assert same_output(result, alone(engines.shared(), work))
    stream.served()

"""The engine's batching: requests batched across adapters give exactly what each request gets alone.

Concurrent mixed requests, seeded sampling whatever the batch holds, rows that finish early, scoring beside
generation, auto merge and unmerge under traffic, and the queue: stop draining it, a full queue refusing work,
an adapter unregistered while its requests wait, more adapters queued than device slots, end-of-text ids from the
generation config. Engines run on the tiny bases with three adapters of ranks 2, 4 and 8 (see lora_helpers); the
reference for a request is the same request submitted alone to an engine that never merges.
"""
from __future__ import annotations

import dataclasses
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoConfig

from service.engine.requests import Generation, GenerationResult, Scoring, run_all
from service.engine.sampling import Decoding
from service.errors import AdapterError, EngineStopped, QueueFull, QueueTimeout
from service.http.errors import status_of
from service.model.device_room import allocations, kv_bytes_per_token
from service.settings import WAIT_MAX_S, Settings
from tests.engine.engine_helpers import (
    WAIT,
    WatchedSteps,
    alone,
    assert_same_outputs,
    greedy,
    long_generation,
    paused,
    prompt,
    results,
    same_output,
)
from tests.lora_helpers import BASES

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


def test_on_the_cpu_the_kv_cache_follows_the_traffic(engines):
    """Without CUDA graphs the KV cache holds the rows running (to a power of two), not the largest batch, and it is
    freed when a batch ends; the next batch is served as alone."""
    engine = engines.fresh(max_batch=32)
    rng = random.Random(8)
    engine.decoder = steps = WatchedSteps(engine.decoder, note=lambda tokens: engine.decoder.cache.shape, hold_at=3)
    first = engine.submit(long_generation(rng, "r2", 6))
    assert steps.holding.wait(WAIT)
    rows, _ = steps.decoder.cache.shape
    steps.release.set()
    first.result(WAIT)
    deadline = time.monotonic() + WAIT
    while steps.decoder.cache.keys and time.monotonic() < deadline:
        time.sleep(0.001)
    assert rows == 1, f"one running row took {rows} rows of KV cache"
    assert steps.decoder.cache.keys == [], "the KV cache outlived its batch"
    works = [long_generation(rng, name, 5) for name in ("r4", None, "r8")]
    with paused(engine):
        futures = [engine.submit(work) for work in works]
    assert_same_outputs(results(futures), [alone(engines.shared(), work) for work in works], works)


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


def test_a_draining_engine_refuses_for_the_queue_as_a_server_going_away(engines):
    """Once the engine drains (``Engine.drain``: the service shuts down), a request refused for the queue, full or its
    wait past ``max_queue_wait``, fails with EngineStopped saying the service is shutting down (a 503 without
    Retry-After), not QueueFull or QueueTimeout (a 429 'retry later', which sent the client back to the server going
    away); the requests queued before are served as alone."""
    engine = engines.fresh(max_queue=2, max_queue_wait=0.5)
    rng = random.Random(9)
    works = [greedy(rng, "r2"), greedy(rng, None)]
    with paused(engine):
        futures = [engine.submit(work) for work in works]
        engine.drain()
        with pytest.raises(EngineStopped, match=r"^the service is shutting down: the queue is full") as full:
            engine.submit(greedy(rng, "r4"))
    assert full.value.retry_after is None and status_of(type(full.value)) == 503
    assert_served_as_alone(engines.shared(), works, results(futures))
    with paused(engine):
        expiring = engine.submit(greedy(rng, "r8"))
        time.sleep(0.8)  # past the bound while the engine is held
    with pytest.raises(EngineStopped, match=r"down: the request waited 0.5 s .*max_queue_wait.* will not be served"):
        expiring.result(WAIT)


@pytest.mark.parametrize("bound", [0.2, 0])
def test_a_request_queued_past_max_queue_wait_is_refused_and_the_running_one_served(engines, bound):
    """With ``max_queue_wait`` (seconds), a request still queued once its time is out fails with QueueTimeout (429) at
    the next decoding step, generation and scoring alike; the running row finishes as alone, and a later request is
    served. With 0 (no bound) the same waiting requests are served."""
    reference = engines.shared()
    engine = engines.fresh(max_batch=1, max_queue_wait=bound)
    rng = random.Random(12)
    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=2)
    running = long_generation(rng, "r2", 6)
    first = engine.submit(running)
    assert steps.holding.wait(WAIT)
    waiting = [greedy(rng, "r8"), Scoring(prompt(rng), None, [1, 2])]
    queued = [engine.submit(work) for work in waiting]
    time.sleep(0.4)  # past the bound while the running row holds the only place in the batch
    steps.release.set()
    assert same_output(first.result(WAIT), alone(reference, running))
    for future, work in zip(queued, waiting):
        if bound:
            with pytest.raises(QueueTimeout, match="max_queue_wait"):
                future.result(WAIT)
        elif isinstance(work, Scoring):
            assert future.result(WAIT) == pytest.approx(alone(reference, work), abs=1e-5)
        else:
            assert same_output(future.result(WAIT), alone(reference, work))
    later = greedy(rng, None)
    assert same_output(alone(engine, later), alone(reference, later))
    assert status_of(QueueTimeout) == 429


@pytest.mark.parametrize("held_by", ["an admin call", "a decoding step"])
def test_a_request_is_refused_as_its_wait_runs_out_while_the_engine_thread_is_busy(engines, held_by):
    """The refusal (QueueTimeout) comes when ``max_queue_wait`` runs out, whatever holds the engine thread meanwhile,
    not once it is free again: it was checked only where the engine thread took requests, so a request behind a long
    prefill pass, an adapter load or an admin call heard of it after that had ended (16 s for the 3 s of
    ``--max-queue-wait 3`` behind a long context's pass on the CPU, a review). Here the thread is held 60 s."""
    engine = engines.fresh(max_batch=1, max_queue_wait=0.2)
    rng = random.Random(31)
    release = threading.Event()
    if held_by == "an admin call":
        holding = threading.Event()
        held = engine.call(lambda: (holding.set(), release.wait(60)))
    else:
        engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=2)
        steps.release, holding = release, steps.holding
        held = engine.submit(long_generation(rng, "r2", 4))
    try:
        assert holding.wait(WAIT)
        sent = time.monotonic()
        waiting = engine.submit(greedy(rng, "r8"))
        assert isinstance(waiting.exception(timeout=30), QueueTimeout)  # the old code: TimeoutError, after 30 s
        assert time.monotonic() - sent >= 0.2
    finally:
        release.set()
    held.result(WAIT)
    later = greedy(rng, None)
    assert same_output(alone(engine, later), alone(engines.shared(), later))


def test_a_request_waiting_out_an_idle_engines_batch_window_is_not_refused_for_its_wait(engines):
    """The batch window (an idle engine waiting for a batch to fill) is no wait for capacity: a lone request to an
    idle engine whose window (1 s) is longer than ``max_queue_wait`` (0.2 s) is served, as before the queue had a timer
    of its own (a review: ``--batch-window-ms 3000 --max-queue-wait 1``, 2 of 3 lone requests a 429 'past
    capacity'). Those the batch then has no room for wait on, and are refused past the bound as ever."""
    engine = engines.fresh(max_batch=2, batch_window_ms=1000, max_queue_wait=0.2)
    rng = random.Random(33)
    work = greedy(rng, "r4")
    assert same_output(engine.submit(work).result(WAIT), alone(engines.shared(), work))
    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=2)
    running = [long_generation(rng, "r2", 4), long_generation(rng, None, 4)]
    futures = engine.submit_together(running)
    assert steps.holding.wait(WAIT)
    left_out = engine.submit(greedy(rng, "r8"))
    try:
        assert isinstance(left_out.exception(timeout=30), QueueTimeout)
    finally:
        steps.release.set()
    assert_served_as_alone(engines.shared(), running, results(futures))


def test_a_request_left_out_of_the_batch_a_window_filled_has_its_wait_counted_from_the_windows_end(engines):
    """A generation queued 0.5 s into an idle engine's 2 s window, behind an NLI request (a batch takes one kind): not
    taken with it, it waits for capacity only from the window's end, and is served; the window (1.5 s, past the 1 s
    bound) was counted against it: a 429 'past capacity' as the window ended (a review, 3 runs of 3)."""
    engine = engines.fresh(batch_window_ms=2000, max_queue_wait=1)
    rng = random.Random(34)
    scoring, generation = Scoring(prompt(rng), "r2", [1, 2]), greedy(rng, "r4")
    first = engine.submit(scoring)
    time.sleep(0.5)
    second = engine.submit(generation)
    assert first.result(WAIT) == pytest.approx(alone(engines.shared(), scoring), abs=1e-5)
    assert same_output(second.result(WAIT), alone(engines.shared(), generation))


def test_a_drain_ends_the_batch_window(engines):
    """Once the service drains no request comes to fill a batch: the window (60 s here) ends at once and the request
    waiting in it is served (a review: a 20 s window held a drained server's exit 18 s past SIGTERM)."""
    engine = engines.fresh(batch_window_ms=60000)
    work = greedy(random.Random(35), "r8")
    queued = engine.submit(work)
    engine.drain()
    assert same_output(queued.result(timeout=30), alone(engines.shared(), work))


@pytest.mark.parametrize("setting", ["max_queue_wait", "batch_window_ms"])
def test_the_longest_wait_a_setting_takes_is_one_a_thread_can_wait(engines, monkeypatch, setting):
    """``WAIT_MAX_S`` (292 years, in the setting's unit) is the most ``max_queue_wait`` and ``batch_window_ms`` take:
    the queue's timer and the engine thread wait that long, and serve. 1e20 s was taken, and no thread can wait that
    long: the engine thread died of an OverflowError at the first request (``batch_window_ms``), or the queue's
    timer did (``max_queue_wait``), its traceback on stderr; now refused as the settings are read."""
    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    most = WAIT_MAX_S * (1000 if setting == "batch_window_ms" else 1)
    engine = engines.fresh(max_batch=2, **{setting: most})
    rng = random.Random(32)
    works = [greedy(rng, "r4"), greedy(rng, None)]
    first = engine.submit(works[0])
    time.sleep(0.2)  # the engine thread waits out the batch window for a second request, or the timer for the first
    futures = [first, engine.submit(works[1])]
    assert_served_as_alone(engines.shared(), works, results(futures))
    assert failures == [] and engine.failure is None
    with pytest.raises(ValidationError, match=f"{setting}\n.*must be at most {most:.0f}, the longest a thread can"):
        Settings(**{setting: most * 2})


@pytest.mark.parametrize("bound", [0.2, 0])
def test_the_queued_parts_of_a_request_begun_are_served_past_max_queue_wait(engines, bound):
    """The parts of one request (``submit_together``: a long context's windows, a completion's choices) that the batch
    has no room for wait for their turn: once one part is taken, the others are served however long they wait, where
    a request queued after them is refused past the bound (QueueTimeout) as ever."""
    reference = engines.shared()
    engine = engines.fresh(max_batch=1, max_queue_wait=bound)
    rng = random.Random(21)
    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=2)
    parts = [long_generation(rng, "r2", 6), greedy(rng, "r2"), greedy(rng, "r8")]
    futures = engine.submit_together(parts)
    assert steps.holding.wait(WAIT)
    outsider = greedy(rng, None)
    later = engine.submit(outsider)
    time.sleep(0.4)  # past the bound while the first part holds the only place in the batch
    steps.release.set()
    assert_same_outputs(results(futures), [alone(reference, work) for work in parts], parts)
    if bound:
        with pytest.raises(QueueTimeout, match="max_queue_wait"):
            later.result(WAIT)
    else:
        assert same_output(later.result(WAIT), alone(reference, outsider))


def spy_on_takes(engine) -> list:
    """The works of every request ``engine`` takes from its queue, in the order taken (its own ``_take``, spied on)."""
    taken, take = [], engine._take

    def spied(*args, **kwargs):
        batch = take(*args, **kwargs)
        taken.extend(pending.work for pending in batch)
        return batch

    engine._take = spied
    return taken


def assert_served_as_alone(reference, works: list, outputs: list) -> None:
    for work, got in zip(works, outputs):
        expected = alone(reference, work)
        assert same_output(got, expected) if isinstance(work, Generation) else got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("kind", [Generation, Scoring])
def test_requests_queued_together_are_taken_one_part_of_each_at_a_time(engines, kind):
    """Each request's first part is due at once, its later ones as its earlier ones' prompt tokens are taken
    (``Engine.submit_together``): a request queued behind another's many parts (a long context's windows) joins the
    first batch, where FCFS over parts had it wait for them all, and refused it past ``max_queue_wait``."""
    engine = engines.fresh(max_batch=3)
    rng = random.Random(24)

    def work(adapter: str | None) -> Generation | Scoring:
        return greedy(rng, adapter) if kind is Generation else Scoring(prompt(rng), adapter, [5, 50, 500])

    taken = spy_on_takes(engine)
    first, second, single = [work("r2") for _ in range(5)], [work(None) for _ in range(3)], work("r2")
    with paused(engine):
        futures = engine.submit_together(first) + engine.submit_together(second) + [engine.submit(single)]
    outputs = results(futures)
    assert taken[:3] == [first[0], second[0], single], "the first batch was not one part of each request"
    assert sorted(map(id, taken)) == sorted(map(id, [*first, *second, single])), "not every part was taken once"
    assert_served_as_alone(engines.shared(), [*first, *second, single], outputs)


def twenty_token_parts(rng: random.Random, adapter: str, count: int) -> list[Generation]:
    return [Generation(prompt(rng, 20, 20), adapter, Decoding(max_new_tokens=3), False, ignore_eos=True)
            for _ in range(count)]


@pytest.mark.parametrize("requests", [1, 2])
def test_a_request_queued_while_others_parts_run_goes_before_their_parts_due_later(engines, requests):
    """One or two requests of parts of 20 prompt tokens, two parts taken at first: the clock moves on by 40 tokens
    over the requests queued (40, or 20 each for two). A request queued while they run is due then, as are their
    next parts, which as later parts go after it; the rest come due 20 tokens apart."""
    engine = engines.fresh(max_batch=2)
    rng = random.Random(25)
    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=1)
    taken = spy_on_takes(engine)
    later = greedy(rng, None, max_new_tokens=3)
    if requests == 1:
        together = [twenty_token_parts(rng, "r2", 6)]
        order = [*together[0][:2], later, *together[0][2:]]
    else:
        together = [twenty_token_parts(rng, "r2", 3), twenty_token_parts(rng, None, 3)]
        order = [together[0][0], together[1][0], later, together[0][1], together[1][1], together[0][2],
                 together[1][2]]
    with paused(engine):
        futures = [future for parts in together for future in engine.submit_together(parts)]
    assert steps.holding.wait(WAIT)
    futures.append(engine.submit(later))
    steps.release.set()
    outputs = results(futures)
    assert taken == order
    assert_served_as_alone(engines.shared(), [*(part for parts in together for part in parts), later], outputs)


def test_the_parts_of_a_request_none_of_which_began_are_refused_together_past_max_queue_wait(engines):
    engine = engines.fresh(max_queue_wait=0.1)
    rng = random.Random(22)
    with paused(engine):
        futures = engine.submit_together([greedy(rng, "r2"), greedy(rng, "r4"), greedy(rng, None)])
        time.sleep(0.3)
    for future in futures:
        with pytest.raises(QueueTimeout, match="max_queue_wait"):
            future.result(WAIT)
    later = greedy(rng, None)
    assert same_output(alone(engine, later), alone(engines.shared(), later))


@pytest.mark.parametrize("change", ["deleted", "registered again with other weights"])
def test_the_queued_parts_of_a_request_begun_keep_its_weights_whatever_becomes_of_its_adapter(engines, change):
    """Once a part of a request (a window, a choice) runs, its queued parts run with the same weights: a deletion
    does not fail them halfway (a 404 after seconds of work), nor does a new registration of the name answer one
    request with two adapters."""
    reference = engines.shared()
    engine = engines.fresh(max_batch=1)
    _, adapters = engines.base("llama")
    engine.registry.register("victim", adapters["r4"])
    rng = random.Random(23)
    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=2)
    parts = [long_generation(rng, "victim", 6), greedy(rng, "victim"), greedy(rng, "victim")]
    futures = engine.submit_together(parts)
    assert steps.holding.wait(WAIT)
    engine.registry.unregister("victim")
    if change != "deleted":
        engine.registry.register("victim", adapters["r8"])
    steps.release.set()
    expected = [alone(reference, dataclasses.replace(work, adapter="r4")) for work in parts]
    assert_same_outputs(results(futures), expected, parts)
    later = greedy(rng, "victim")
    if change == "deleted":
        with pytest.raises(AdapterError):
            alone(engine, later)
    else:
        assert same_output(alone(engine, later), alone(reference, dataclasses.replace(later, adapter="r8")))


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


@pytest.mark.parametrize("change", ["loaded in place", "deleted and loaded again"])
def test_a_queued_request_runs_with_the_weights_its_name_held_when_it_was_queued(engines, change):
    """A request is bound to its adapter's weights when queued (``Engine.bound``: its caller may have built its
    prompt with their chat template): its name given other weights before it is taken leaves it the old ones (it ran
    with the new), and the next request gets the new."""
    reference = engines.shared()
    engine = engines.fresh()
    _, adapters = engines.base("llama")
    engine.registry.register("victim", adapters["r4"])
    rng = random.Random(31)
    works = [greedy(rng, "victim"), Scoring(prompt(rng), "victim", [1, 2, 3])]
    with paused(engine):
        futures = [engine.submit(work) for work in works]
        if change == "loaded in place":
            engine.registry.add(engine.registry.prepare("victim", adapters["r8"], replace=True)[0], replace=True)
        else:
            engine.registry.unregister("victim")
            engine.registry.register("victim", adapters["r8"])
    old = [dataclasses.replace(work, adapter="r4") for work in works]
    assert same_output(futures[0].result(WAIT), alone(reference, old[0]))
    assert futures[1].result(WAIT) == pytest.approx(alone(reference, old[1]), abs=1e-5)
    later = greedy(rng, "victim")
    assert same_output(alone(engine, later), alone(reference, dataclasses.replace(later, adapter="r8")))


def test_weights_bound_by_the_caller_must_be_those_of_the_name_asked_for(engines):
    engine = engines.shared()
    work = dataclasses.replace(greedy(random.Random(32), "r2"), weights=engine.registry.lookup("r4"))
    with pytest.raises(ValueError, match="bound to a request for 'r2'"):
        engine.submit(work)
    assert engine.queue_depth == 0


@pytest.mark.parametrize("bound", [0, 0.1])
def test_a_queued_request_whose_future_was_cancelled_directly_is_dropped(engines, bound):
    """``asyncio.wrap_future`` cancels the engine's future itself when the task awaiting it is cancelled (a client
    gone), before ``abandon`` takes it out of the queue. Such a request, found in the queue with its adapter
    unregistered meanwhile (or past ``max_queue_wait``), is dropped: the engine must not try to fail it again
    (InvalidStateError, which failed the batch it was taken with in the soak) and serves the rest."""
    reference = engines.shared()
    engine = engines.fresh(max_queue_wait=bound)
    _, adapters = engines.base("llama")
    engine.registry.register("victim", adapters["r4"])
    rng = random.Random(13)
    gone, kept = greedy(rng, "victim"), greedy(rng, "r2")
    with paused(engine):
        cancelled, served = engine.submit(gone), engine.submit(kept)
        assert cancelled.cancel()  # as asyncio's future chaining does, without the engine's lock
        engine.registry.unregister("victim")
        time.sleep(0.2)  # past the bound, if any, while still queued
    if bound:
        with pytest.raises(QueueTimeout):
            served.result(WAIT)
    else:
        assert same_output(served.result(WAIT), alone(reference, kept))
    assert engine.failure is None and cancelled.cancelled()
    assert same_output(alone(engine, kept), alone(reference, kept))


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


def test_a_full_batch_of_the_longest_requests_fits_the_kv_cache_the_start_counts(engines):
    """``device_room.allocations`` counts a full batch's KV cache for the memory check at the start: every row of a
    full batch with the longest prompt, its generated tokens and a step's draft tokens (a repeated prompt: drafts
    are found in it) must fit the rows and columns counted."""
    limits = {"max_batch": 4, "max_input_tokens": 236, "max_new_tokens": 20}
    engine = engines.fresh(**limits)
    engine.decoder = steps = WatchedSteps(engine.decoder, note=lambda tokens: engine.decoder.cache.shape)
    works = [Generation([5 + row, 6, 7, 8] * 59, None, Decoding(max_new_tokens=20), False, ignore_eos=True)
             for row in range(4)]
    with paused(engine):
        futures = [engine.submit(work) for work in works]
    assert [len(result.token_ids) for result in results(futures)] == [20] * 4
    settings = Settings(**limits)
    size, _ = allocations(settings, AutoConfig.from_pretrained(engines.base("llama")[0]), torch.float32,
                          torch.device("cpu"))["max_batch"]
    rows, columns = max(steps.notes)
    assert (rows, columns) == (4, 512), steps.notes  # past 256 columns: the drafts of the last steps
    assert rows * columns * kv_bytes_per_token(engine.model.config, torch.float32) <= size

"""Requests that join a running batch: they are served between its decoding steps and get what they get alone.

Requests and scorings served while a long generation decodes; long prompts run a prefill chunk per pause; an
adapter deleted, or its name registered again, while its rows run keeps them on the weights they were admitted
with; a failure in a joining prompt fails the joined rows and the engine goes on; adapters loaded beside a running
batch take one pause each and that pause does nothing else. The reference for a request is the same request
submitted alone.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import time
from concurrent.futures import Future
from typing import ClassVar

import pytest

from loadtest.timing import Stamped
from service.engine import scheduler as engine_module
from service.engine.prefill import Prefill
from service.engine.requests import Generation, Scoring
from service.engine.sampling import Decoding
from service.engine.scheduler import Engine
from service.settings import CPU_BATCH_WINDOW_MS, CPU_PREFILL_TOKENS
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
    passes: ClassVar[list[list[int]]] = []  # the prompt lengths of every pass, in order
    ended: ClassVar[list[float]] = []  # when each chunk ended (perf_counter)
    on_first_chunk = None  # if set, called once, on the engine thread, before the next pass's first chunk

    def advance(self, budget: int = 0) -> None:
        hook, CountedPrefills.on_first_chunk = CountedPrefills.on_first_chunk, None
        if hook is not None:
            hook()
        if not self.done:
            CountedPrefills.passes.append([len(prompt) for prompt in self.prompts])
        super().advance(budget)
        CountedPrefills.budgets.append(budget)
        CountedPrefills.ended.append(time.perf_counter())


@pytest.fixture
def counted_passes(monkeypatch):
    CountedPrefills.budgets, CountedPrefills.ended, CountedPrefills.on_first_chunk = [], [], None
    CountedPrefills.passes = []
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
    # the prefix cache off: it would serve the joining prompts from their reference runs, in fewer chunks
    engine = engines.fresh(max_new_tokens=300, prefill_chunk=8, prefix_cache_bytes=0)
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


def test_unset_prefill_budget_and_batch_window_are_the_cpus(engines):
    unset = engines.fresh(max_prefill_tokens=None, batch_window_ms=None)
    assert (unset.prefill_tokens, unset.batch_window_ms) == (CPU_PREFILL_TOKENS, CPU_BATCH_WINDOW_MS) == (2048, 0)
    given = engines.fresh(max_prefill_tokens=100, batch_window_ms=7)
    assert (given.prefill_tokens, given.batch_window_ms) == (100, 7)


@pytest.mark.parametrize("kind", ["generations", "scorings"])
def test_a_burst_is_taken_in_prefill_passes_of_at_most_max_prefill_tokens(engines, counted_passes, kind):
    """A burst larger than one pass's token budget runs in several passes, oldest first, each within the budget (its
    rows x its longest prompt, as the pass left-pads its prompts to the longest; a prompt longer than the budget goes
    alone); every request gets what it gets alone."""
    engine = engines.fresh(max_new_tokens=8, max_prefill_tokens=40, prefix_cache_bytes=0)
    rng = random.Random(15)
    prompts = [prompt(rng, 10, 14) for _ in range(7)] + [prompt(rng, 50, 50)] + [prompt(rng, 10, 14)]
    prompts += [prompt(rng, 20, 20)] + [prompt(rng, 3, 4) for _ in range(4)]  # padded to 20 with the first short one
    names = itertools.cycle(["r2", None, "r8"])
    works = ([Generation(ids, next(names), Decoding(max_new_tokens=6), False) for ids in prompts]
             if kind == "generations" else [Scoring(ids, next(names), [5, 6, 7]) for ids in prompts])
    expected = [alone(engine, work) for work in works]
    counted_passes.passes.clear()
    with paused(engine):
        futures = [engine.submit(work) for work in works]
    got = results(futures)
    passes = counted_passes.passes
    assert [length for lengths in passes for length in lengths] == [len(ids) for ids in prompts], passes
    assert all(len(lengths) * max(lengths) <= 40 or len(lengths) == 1 for lengths in passes), passes
    assert len(passes) >= 4 and [50] in passes, passes
    if kind == "generations":
        assert_same_outputs(got, expected, works)
    else:
        assert got == [pytest.approx(scores, abs=1e-6) for scores in expected]


def test_an_adapter_deleted_while_its_request_joins_serves_that_request_with_its_weights(engines, counted_passes):
    """A request is bound to its adapter's weights when it is queued: deleting the adapter while the request's
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


def test_dropping_an_adapters_prefix_blocks_does_not_hold_up_the_requests_waiting_to_join(engines):
    """A review: every in-place load and delete purged the old weights' prefix cache blocks through an admin call,
    which keeps queued requests out of the running batch until its rows are done (one request of 64 tokens held a
    1-token request 3 s). The purge now waits for no batch: a request queued after it joins the running rows."""
    engine = engines.fresh(max_new_tokens=64)
    rng = random.Random(41)
    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=3)
    running = engine.submit(long_generation(rng, "r2", 64))
    assert steps.holding.wait(WAIT)
    engine.purge_prefixes(engine.registry.lookup("r8"))
    joiner = greedy(rng, "r4", max_new_tokens=2)
    joined = engine.submit(joiner)
    steps.release.set()
    assert same_output(joined.result(WAIT), alone(engines.shared(), joiner))
    assert not running.done() and max(steps.notes) == 2, f"rows per step: {steps.notes}"
    running.result(WAIT)

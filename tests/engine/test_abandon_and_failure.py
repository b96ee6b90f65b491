"""Requests that end without their result, and an engine that dies.

A request abandoned while it runs leaves its batch and the other rows are untouched (its tokens counted); one
abandoned while queued leaves the queue, a finished one keeps its result; a cancelled task awaiting the engine
abandons its request (what the HTTP layer does when a client disconnects); withdrawing the only request of the
batch window leaves the engine serving; an engine thread that dies fails every waiting request and refuses new ones.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import CancelledError, InvalidStateError

import pytest
from prometheus_client import REGISTRY

from service.engine.requests import GenerationResult, RequestFuture
from service.engine.scheduler import STOP_WAIT_S
from service.errors import EngineFailed, RequestAbandoned, UnknownAdapter
from service.tasks.tasks import Tasks
from tests.engine.engine_helpers import (
    WAIT,
    WatchedSteps,
    alone,
    assert_same_outputs,
    greedy,
    long_generation,
    paused,
    results,
    same_output,
)


def test_an_abandoned_running_request_leaves_its_batch_and_the_other_rows_are_untouched(engines):
    engine = engines.fresh(max_new_tokens=300, draft_tokens=0)  # a token a step: the steps are counted
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


def test_a_request_whose_part_failed_abandons_its_other_parts(engines):
    """``Tasks.outcomes`` (a long context's windows, a label set's scoring requests) raises the first part's failure
    (here one set as the engine sets a part's failure, on its future once queued); the other parts would be thrown
    away, so the engine drops them rather than generate their 300 tokens."""
    engine = engines.fresh(max_new_tokens=300)
    tasks = Tasks(engine, engine.tokenizer, engine.settings, max_positions=512)
    submitted = []

    def submit_together(works, on_tokens=None):
        submitted.extend(engine_submit(works, on_tokens))
        submitted[1].set_exception(UnknownAdapter("failed as the engine fails a part"))
        return submitted

    engine_submit, engine.submit_together = engine.submit_together, submit_together
    engine.decoder = steps = WatchedSteps(engine.decoder)
    rng = random.Random(20)
    with pytest.raises(UnknownAdapter):
        asyncio.run(tasks.outcomes([long_generation(rng, "r8", 300), greedy(rng, "r2")]))
    with pytest.raises((RequestAbandoned, CancelledError)):
        submitted[0].result(WAIT)
    assert len(steps.notes) < 299, f"decoding steps of the part left running: {len(steps.notes)}"


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


@pytest.mark.parametrize("settle", ["set_result", "set_exception"])
def test_a_request_future_cancelled_by_its_caller_drops_the_outcome_but_a_finished_one_refuses_another(settle):
    """The engine settles a queued request's future without knowing that asyncio cancelled it meanwhile (no lock is
    shared): the outcome is dropped, not raised (InvalidStateError failed the engine's batch before); settling a
    future twice is still an error."""
    cancelled, finished = RequestFuture(), RequestFuture()
    assert cancelled.cancel()
    getattr(cancelled, settle)(RequestAbandoned("late"))
    assert cancelled.cancelled()
    finished.set_result(None)
    with pytest.raises(InvalidStateError):
        getattr(finished, settle)(RequestAbandoned("twice"))


def test_a_fault_while_taking_requests_to_join_a_batch_fails_that_batch_and_loses_no_queued_request(engines):
    """A fault in the middle of taking queued requests (here the registry's check of the second one's name) fails the
    running batch, as any fault of a batch does, but every queued request stays queued and is served after it: in the
    soak, one taken before the fault was left in no queue and never answered."""
    engine = engines.fresh(max_new_tokens=300)
    rng = random.Random(20)
    running_work, queued_works = long_generation(rng, "r2", 300), [greedy(rng, "r8"), greedy(rng, "r4")]
    expected = [alone(engines.shared(), work) for work in queued_works]
    registered, faults = engine.registry.registered, ["r4"]

    def faulty_check(name):
        if name in faults:
            faults.remove(name)
            raise RuntimeError("injected registry fault")
        return registered(name)

    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=3)
    running = engine.submit(running_work)
    assert steps.holding.wait(WAIT)
    queued = [engine.submit(work) for work in queued_works]
    engine.registry.registered = faulty_check
    steps.release.set()
    with pytest.raises(RuntimeError, match="injected"):
        running.result(WAIT)
    assert_same_outputs(results(queued), expected, queued_works)
    assert not faults and engine.failure is None and engine.queue_depth == 0


def test_a_stop_waits_a_bounded_time_for_an_engine_thread_held_by_a_lock_left_held(engines, caplog):
    """A request's future whose lock is left held (as a KeyboardInterrupt raised in its caller's wait could leave it)
    holds the engine thread when it takes the request, while it holds its own lock: the stop waited for ever, on that
    lock or on the thread's end (a review: eval hung in the engine's stop). It now gives up after its bound
    (``STOP_WAIT_S``), with a line, the thread left to run."""
    engine = engines.fresh()
    with paused(engine):
        held = engine.submit(greedy(random.Random(23), "r2"))
        held._condition.acquire()
    stopped: list[bool] = []
    stopping = threading.Thread(target=lambda: stopped.append(engine.stop()), daemon=True)
    try:
        stopping.start()
        stopping.join(WAIT)
        assert stopped == [False], "the stop did not return"
        assert f"the engine thread did not end within {STOP_WAIT_S:g} s of the stop" in caplog.text
    finally:
        held._condition.release()
    assert engine.stop() and held.result(WAIT).finish_reason  # let go, it finishes what was queued and ends

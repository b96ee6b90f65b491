"""Fairness under a steady stream: a running batch that never runs dry starves nothing and still merges.

A stream of requests (each finished one replaced at once) for a merged adapter, for mixed adapters, or for the
adapters holding every device slot: a request for other weights and a control call are served within a bounded
number of stream requests, with the right weights; a steady stream for one adapter is merged and unmerged while its
one batch runs.
"""
from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from service.engine import scheduler as engine_module
from service.engine.requests import Generation, GenerationResult
from service.engine.running_batch import RunningBatch
from service.engine.sampling import Decoding
from service.engine.scheduler import Engine
from tests.engine.engine_helpers import (
    WAIT,
    WatchedSteps,
    alone,
    assert_same_outputs,
    greedy,
    prompt,
    results,
    same_output,
)

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

    def passed_while_parts(self, parts: list[Generation]) -> tuple[int, list[GenerationResult]]:
        """How many requests of the stream were sent while ``parts``, queued together (``Engine.submit_together``),
        waited for their last one to be served, and their results."""
        futures = []
        fed, _ = self.passed_while(lambda: (futures.extend(self.engine.submit_together(parts)), futures[-1])[1])
        return fed, results(futures)

    def served(self) -> list[tuple[Generation, GenerationResult]]:
        """Ends the stream (no request sent after this) and gives each request sent, with its result once served."""
        with self.lock:
            self.most = len(self.sent)
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

    def __init__(self, *args):
        super().__init__(*args)
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


def test_the_parts_of_a_request_are_not_starved_by_a_stream_of_requests_queued_after_them(engines):
    """Requests queued after a request's parts may go before its parts due later (``Engine.submit_together``), but
    those come due as the engine serves the requests queued, the request getting an equal share beside the stream's
    (8 in flight): a stream of short requests, each queued after them, does not hold them back for ever (it would for
    all 300; 60 were sent meanwhile in one run)."""
    engine = engines.fresh(max_batch=4)
    rng = random.Random(22)
    parts = [greedy(rng, "r8", max_new_tokens=4) for _ in range(12)]
    stream = SteadyStream(engine, lambda: greedy(rng, "r2", max_new_tokens=rng.randint(4, 12)), width=8)
    fed, got = stream.passed_while_parts(parts)
    assert fed < stream.most / 2, f"the last of 12 parts waited while {fed} requests queued after them were sent"
    assert_same_outputs(got, [alone(engines.shared(), work) for work in parts], parts)
    stream.served()


def test_the_parts_of_a_request_are_not_held_back_by_a_stream_of_short_prompts_with_long_outputs(engines):
    """The clock charges a generation its budget of new tokens as well as its prompt (``_Pending.cost``): a stream of
    2-token prompts that may each generate 24 tokens (a chat's shape) takes an equal share of the engine beside 4
    parts of 60-token prompts (44 stream requests were sent before the last part in one run), where a clock of prompt
    tokens alone held the parts until the stream ended (288 of its 300)."""
    engine = engines.fresh(max_batch=4)
    rng = random.Random(23)
    parts = [Generation(prompt(rng, 60, 60), "r8", Decoding(max_new_tokens=4), False) for _ in range(4)]
    stream = SteadyStream(engine, lambda: Generation(prompt(rng, 2, 2), "r2", Decoding(max_new_tokens=24), False,
                                                     ignore_eos=True), width=8)
    fed, got = stream.passed_while_parts(parts)
    assert fed < 100, f"the last of 4 parts waited while {fed} short-prompt requests queued after them were sent"
    assert_same_outputs(got, [alone(engines.shared(), work) for work in parts], parts)
    stream.served()

"""Memory between batches: back-to-back batches keep the KV cache (handed back after each batch, it was faulted in
again by the next), which the engine gives back once it has had no work for ``REST_AFTER_S``, or at once after a
batch that held non-finite logits (their keys and values are never kept for a later batch)."""
from __future__ import annotations

import random
import time

from service.engine import scheduler
from tests.engine.engine_helpers import WAIT, alone, greedy
from tests.server_helpers import wait_until


def released(engine) -> bool:
    return engine.decoder.cache.shape == (0, 0)


def test_the_kv_cache_outlives_a_batch_until_the_engine_rests(engines, monkeypatch):
    monkeypatch.setattr(scheduler, "REST_AFTER_S", 1.5)
    engine, rng = engines.fresh(), random.Random(0)
    first = alone(engine, greedy(rng, "r2"))
    time.sleep(0.3)  # the batch has ended; the rest is 1.5 s away
    assert not released(engine)  # kept for a batch that may come at once
    again = alone(engine, greedy(random.Random(0), "r2"))  # a batch into the kept storage: the same output
    assert (again.token_ids, again.text) == (first.token_ids, first.text)
    wait_until(lambda: released(engine), "the KV cache given back after the rest", WAIT)  # no work


def test_a_batch_with_non_finite_logits_gives_its_kv_cache_back_at_once(engines, monkeypatch):
    """The batch is marked as ``Engine._dropped_non_finite`` marks it (rows of NaN logits are made and refused in
    tests/http/test_non_finite.py); its KV cache goes at once, not after the rest."""
    monkeypatch.setattr(scheduler, "REST_AFTER_S", 3600.0)
    engine = engines.fresh()
    engine.call(lambda: setattr(engine, "_non_finite", True)).result(WAIT)
    alone(engine, greedy(random.Random(1), "r2"))
    # the engine thread clears the mark just after it gives the cache back: both are waited for, not read in between
    wait_until(lambda: released(engine) and not engine._non_finite, "the KV cache given back at once, unmarked", 5.0)

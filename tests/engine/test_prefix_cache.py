"""Prefix caching: prompts that begin like earlier ones (questions on one context) reuse the cached keys and values of
their longest cached prefix (whole blocks, then part of one), and get what they get without the cache.

The reference for every request is the same request alone on an engine with the cache off. Greedy outputs must be
token for token the same; NLI probabilities agree to 1e-5: a cached prefix's keys and values were computed in another
pass, whose matrix products have other shapes (rows, columns), so fp32 sums come in another order (a few units of
rounding on the tiny bases, far below what an adapter changes). Every test also checks that the cache did its part
(hits counted, tokens not run, blocks evicted), so a cache that never hits, or hits across weights, fails it.
"""
from __future__ import annotations

import dataclasses
import gc
import random
import time
from typing import ClassVar

import pytest
import torch
from prometheus_client import REGISTRY, generate_latest

from service.engine import scheduler as engine_module
from service.engine.kv_cache import column_bucket
from service.engine.prefill import Prefill
from service.engine.prefix_cache import PrefixCache
from service.engine.requests import Generation, Scoring
from service.engine.sampling import Decoding
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
)
from tests.lora_helpers import BASES

BLOCK = 8  # prefix_block_tokens of the engines here
CONTEXT = 5 * BLOCK  # tokens of a context: questions (3-7 more tokens) share exactly its 5 whole blocks
NAMES = ("r2", "r4", "r8", None)


def cached_engine(engines, arch: str = "llama", **overrides):
    return engines.fresh(arch, prefix_block_tokens=BLOCK, **overrides)


def reference_engine(engines, arch: str = "llama", **overrides):
    return engines.fresh(arch, prefix_cache_bytes=0, **overrides)


def question(rng: random.Random, context: list[int], adapter: str | None) -> Generation:
    """A greedy generation whose prompt is ``context`` and 3-7 tokens more."""
    return Generation(context + prompt(rng, 3, BLOCK - 1), adapter, Decoding(max_new_tokens=8), False)


def counted() -> tuple[float, float]:
    """(query tokens, hit tokens) the prefix caches of this process counted so far."""
    return (REGISTRY.get_sample_value("loraswap_prefix_cache_query_tokens_total"),
            REGISTRY.get_sample_value("loraswap_prefix_cache_hit_tokens_total"))


def counted_since(before: tuple[float, float]) -> tuple[float, float]:
    now = counted()
    return now[0] - before[0], now[1] - before[1]


class CountedPrefills(Prefill):
    """The engine's prefill passes, noting the prompt tokens each runs (padding and cached prefixes left out)."""

    computed: ClassVar[list[int]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        CountedPrefills.computed.append(int(self.mask[:, self.past:].sum()))


@pytest.fixture
def counted_passes(monkeypatch):
    CountedPrefills.computed = []
    monkeypatch.setattr(engine_module, "Prefill", CountedPrefills)
    return CountedPrefills


# ---- the cache on its own -------------------------------------------------------------------------

def numbered_kv(start: int, end: int) -> torch.Tensor:
    """Keys and values [1 layer, 2, 1 head, end - start, 1] holding each token's position: a block's source shows."""
    return torch.arange(start, end, dtype=torch.float32).view(1, 1, 1, -1, 1).repeat(1, 2, 1, 1, 1)


BLOCK_BYTES = numbered_kv(0, 4).nbytes


def test_a_prompt_reuses_its_longest_cached_prefix_whole_blocks_then_part_of_one_short_of_its_last_token():
    cache = PrefixCache(block_tokens=4, max_bytes=100 * BLOCK_BYTES)
    stored = list(range(100, 120))  # 5 blocks
    cache.store((1, False), stored, numbered_kv)
    assert cache.nbytes == 5 * BLOCK_BYTES
    assert torch.equal(cache.lookup((1, False), [*stored[:10], 7, 7]), numbered_kv(0, 10))  # 2 blocks, 2 tokens more
    assert torch.equal(cache.lookup((1, False), [*stored[:8], 7, 7]), numbered_kv(0, 8))  # the third shares none
    assert torch.equal(cache.lookup((1, False), stored), numbered_kv(0, 19))  # the last token runs
    assert torch.equal(cache.lookup((1, False), [*stored, 5]), numbered_kv(0, 20))
    assert torch.equal(cache.lookup((1, False), stored[:4]), numbered_kv(0, 3))  # part of the first block
    assert torch.equal(cache.lookup((1, False), [100, 7]), numbered_kv(0, 1))
    assert cache.lookup((1, False), stored[:1]) is None  # its one token runs
    assert cache.lookup((2, False), [*stored, 5]) is None  # other weights
    assert cache.lookup((1, True), [*stored, 5]) is None  # the same weights merged into the base
    assert cache.lookup((1, False), [0, *stored]) is None  # the same tokens elsewhere
    assert cache.nbytes == 5 * BLOCK_BYTES  # looking up keeps nothing


def test_the_block_after_the_whole_run_comes_from_the_cached_sibling_that_shares_the_most_tokens():
    cache = PrefixCache(block_tokens=4, max_bytes=100 * BLOCK_BYTES)
    context = list(range(100, 104))
    branches = ([1, 9, 9, 9], [1, 2, 3, 9], [1, 2, 9, 9], [1, 2, 3, 8])  # the second and last share 3 with [1, 2, 3]
    for mark, branch in enumerate(branches):
        cache.store((1, False), [*context, *branch], lambda start, end, mark=mark: numbered_kv(start, end) + 100 * mark)
    assert cache.nbytes == 5 * BLOCK_BYTES  # the context once, four children
    got = cache.lookup((1, False), [*context, 1, 2, 3, 4, 0])
    assert torch.equal(got[:, :, :, 4:], numbered_kv(4, 7) + 100)  # the oldest of the two sharing 3: the second
    assert torch.equal(got[:, :, :, :4], numbered_kv(0, 4))  # the context from the first prompt that stored it
    assert cache.lookup((1, False), [*context, 2, 0]).shape[3] == 4  # no child begins with 2
    assert cache.lookup((1, False), [*context[:2], 5, 0]).shape[3] == 2  # part of the context's block


def test_a_prompts_last_short_block_is_kept_so_the_prompt_asked_again_reuses_all_but_its_last_token():
    cache = PrefixCache(block_tokens=4, max_bytes=100 * BLOCK_BYTES)
    prompt_ = list(range(100, 110))  # 2 whole blocks and 2 tokens
    cache.store((1, False), prompt_, numbered_kv)
    assert cache.nbytes == 2 * BLOCK_BYTES + numbered_kv(8, 10).nbytes
    assert torch.equal(cache.lookup((1, False), prompt_), numbered_kv(0, 9))
    assert torch.equal(cache.lookup((1, False), [*prompt_, 7]), numbered_kv(0, 10))
    assert cache.lookup((1, False), [*prompt_[:8], 108, 5, 5]).shape[3] == 9
    cache.store((1, False), [*prompt_, 110, 111], numbered_kv)  # the whole block beside the short one
    cache.store((1, False), [*prompt_[:9]], numbered_kv)  # a short block the whole one begins with: not kept
    assert cache.nbytes == 3 * BLOCK_BYTES + numbered_kv(8, 10).nbytes
    assert torch.equal(cache.lookup((1, False), [*prompt_, 110, 111, 0]), numbered_kv(0, 12))


def test_a_part_taken_from_a_block_touches_it_and_blocks_evicted_or_purged_are_never_taken():
    cache = PrefixCache(block_tokens=4, max_bytes=4 * BLOCK_BYTES)
    context = list(range(100, 104))
    for branch in ([1, 2, 3, 4], [5, 6, 7, 8]):
        cache.store((1, False), [*context, *branch], numbered_kv)
    assert cache.lookup((1, False), [*context, 1, 2, 0]).shape[3] == 6  # touches the context and [1, 2, 3, 4]
    cache.store((1, False), list(range(200, 208)), numbered_kv)  # two new blocks: one evicted, the least recently ...
    assert cache.lookup((1, False), [*context, 5, 6, 0]).shape[3] == 4  # ... used: [5, 6, 7, 8], not [1, 2, 3, 4]
    assert cache.lookup((1, False), [*context, 1, 2, 0]).shape[3] == 6
    cache.purge(1)
    assert cache.nbytes == 0 and cache.lookup((1, False), [*context, 1, 2, 0]) is None


def test_eviction_takes_the_least_recently_used_chain_tails_first_and_keeps_the_bound():
    cache = PrefixCache(block_tokens=4, max_bytes=7 * BLOCK_BYTES)
    first, second, third = list(range(12)), list(range(100, 112)), list(range(200, 212))
    for tokens in (first, second):
        cache.store((1, False), tokens, numbered_kv)
    assert cache.lookup((1, False), [*first, 0]).shape[3] == 12  # touched: the second is the least recently used
    cache.store((1, False), third, numbered_kv)  # needs 3 blocks, 1 free: the second's last two go
    assert cache.nbytes == 7 * BLOCK_BYTES
    assert cache.lookup((1, False), [*second, 0]).shape[3] == 4  # its first block stays: tails go first
    assert cache.lookup((1, False), [*first, 0]).shape[3] == 12
    assert cache.lookup((1, False), [*third, 0]).shape[3] == 12


def test_a_prompt_longer_than_the_bound_keeps_its_first_blocks():
    cache = PrefixCache(block_tokens=4, max_bytes=3 * BLOCK_BYTES + 1)
    cache.store((1, False), list(range(40)), numbered_kv)
    assert cache.nbytes == 3 * BLOCK_BYTES
    assert torch.equal(cache.lookup((1, False), list(range(41))), numbered_kv(0, 12))


def test_shared_prefixes_are_the_longest_uncached_ones_several_prompts_begin_with():
    cache = PrefixCache(block_tokens=4, max_bytes=100 * BLOCK_BYTES)
    context, other = list(range(10)), list(range(500, 520))
    prompts = [[*context, 1, 2], [*context, 3], other, [*context, 4, 5, 6, 7, 8], [*context[:8], 9]]
    keys = [(1, False)] * 4 + [(2, False)]
    assert cache.shared(keys, prompts) == [(0, 8)]  # two whole blocks; the last prompt has other weights
    assert cache.shared([(1, False)] * 2, [other, other]) == [(0, 16)]  # identical prompts: all but the last block
    cache.store((1, False), context, numbered_kv)
    assert cache.shared(keys, prompts) == []  # cached already
    three = [[*list(range(12)), 1], [*list(range(12)), 2], [*list(range(8)), 3]]
    assert PrefixCache(4, 100 * BLOCK_BYTES).shared([(1, False)] * 3, three) == [(0, 12)]  # 8 is a prefix of 12


def test_purging_a_weights_serial_drops_its_chains_merged_or_not_and_nothing_else():
    cache = PrefixCache(block_tokens=4, max_bytes=100 * BLOCK_BYTES)
    context = list(range(100, 116))  # 4 blocks
    for weights in ((6, False), (0, False), (5, False), (5, True)):  # block 5 (the base's second) has a child
        cache.store(weights, context, numbered_kv)
    cache.store((5, False), [*context[:8], 1, 2, 3, 4], numbered_kv)  # a branch of a chain to purge
    assert cache.nbytes == 17 * BLOCK_BYTES
    cache.purge(5)
    assert cache.nbytes == 8 * BLOCK_BYTES == REGISTRY.get_sample_value("loraswap_prefix_cache_bytes")
    assert cache.lookup((5, False), [*context, 0]) is None and cache.lookup((5, True), [*context, 0]) is None
    assert cache.lookup((5, False), [*context[:8], 1, 2, 3, 4, 0]) is None
    assert all(torch.equal(cache.lookup(weights, [*context, 0]), numbered_kv(0, 16))
               for weights in ((6, False), (0, False)))


def test_a_cache_of_no_bytes_is_off():
    cache = PrefixCache(block_tokens=4, max_bytes=0)
    before = counted()
    cache.store((1, False), list(range(12)), numbered_kv)
    assert cache.lookup((1, False), list(range(13))) is None and cache.nbytes == 0
    assert cache.shared([(1, False)] * 2, [list(range(12))] * 2) == []
    assert counted_since(before) == (0, 0)


# ---- the engine with the cache ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(BASES))
def test_questions_on_shared_contexts_with_mixed_adapters_get_what_they_get_without_the_cache(engines, arch):
    engine, reference = cached_engine(engines, arch), reference_engine(engines, arch)
    rng = random.Random(1)
    contexts = [prompt(rng, CONTEXT, CONTEXT) for _ in range(2)]
    rounds = [[question(rng, context, name) for context in contexts for name in NAMES for _ in range(2)]
              for _ in range(2)]
    expected = [[alone(reference, work) for work in works] for works in rounds]
    ids = {tuple(alone(reference, dataclasses.replace(rounds[0][0], adapter=name)).token_ids) for name in NAMES}
    assert len(ids) == 4, "the adapters do not change these outputs: the test could not tell them apart"
    before = counted()
    for works, wanted in zip(rounds, expected):
        with paused(engine):  # one batch of 16: the first computes each (context, adapter) once, the second hits
            futures = [engine.submit(work) for work in works]
        assert_same_outputs(results(futures), wanted, works)
    queried, hits = counted_since(before)
    # the first round runs each (context, adapter) once, in a pass of its own that its rows then hit; then all hit
    assert hits == 32 * CONTEXT, f"the rows did not take their contexts from the cache: {hits} tokens hit"
    assert queried == sum(len(work.prompt_ids) for works in rounds for work in works) + 8 * CONTEXT


@pytest.mark.parametrize("arch", sorted(BASES))
def test_rows_of_one_admission_that_share_a_context_run_it_once(engines, arch, counted_passes):
    engine, reference = cached_engine(engines, arch), reference_engine(engines, arch)
    rng = random.Random(2)
    context = prompt(rng, CONTEXT, CONTEXT)
    works = [question(rng, context, name) for name in ("r4", "r4", None, "r4", None)]
    works.append(dataclasses.replace(works[0]))  # the same prompt twice (n choices)
    expected = [alone(reference, work) for work in works]
    counted_passes.computed.clear()
    with paused(engine):
        futures = [engine.submit(work) for work in works]
    assert_same_outputs(results(futures), expected, works)
    rest = sum(len(work.prompt_ids) - CONTEXT for work in works)
    assert sum(counted_passes.computed) == 2 * CONTEXT + rest, (
        f"the context did not run once per adapter: passes ran {counted_passes.computed} tokens")


@pytest.mark.parametrize("arch", sorted(BASES))
def test_questions_joining_a_running_batch_a_chunk_per_pause_reuse_the_cache(engines, arch, counted_passes):
    engine = cached_engine(engines, arch, prefill_chunk=8, max_new_tokens=300)
    reference = reference_engine(engines, arch, max_new_tokens=300)
    rng = random.Random(3)
    context = prompt(rng, CONTEXT, CONTEXT)
    first = [question(rng, context, name) for name in ("r8", None, "r8")]
    later = [question(rng, context, name) for name in ("r8", None, "r2")]
    long_work = long_generation(rng, "r4", 300)
    expected = [alone(reference, work) for work in [long_work, *first, *later]]
    running = engine.submit(long_work)
    deadline = time.monotonic() + WAIT
    while engine.queue_depth and time.monotonic() < deadline:  # the long request has left the queue
        time.sleep(0.001)
    got = results([engine.submit(work) for work in first])
    counted_passes.computed.clear()
    got += results([engine.submit(work) for work in later])
    assert not running.done(), "the running request ended before the questions were served"
    assert_same_outputs([running.result(WAIT), *got], expected, [long_work, *first, *later])
    rest = sum(len(work.prompt_ids) - CONTEXT for work in later[:2])
    assert sum(counted_passes.computed) == rest + len(later[2].prompt_ids), (
        f"the later questions ran {counted_passes.computed} tokens: not their cached contexts only")


@pytest.mark.parametrize("arch", sorted(BASES))
def test_an_adapter_registered_again_under_its_name_never_reuses_the_old_weights_keys(engines, arch):
    engine, reference = cached_engine(engines, arch), reference_engine(engines, arch)
    _, adapters = engines.base(arch)
    engine.registry.register("x", adapters["r8"])
    rng = random.Random(4)
    context = prompt(rng, CONTEXT, CONTEXT)
    old, new = question(rng, context, "x"), question(rng, context, "x")
    as_r8, as_r2 = (alone(reference, dataclasses.replace(new, adapter=name)) for name in ("r8", "r2"))
    assert as_r8.token_ids != as_r2.token_ids, "the two adapters agree here: the test could not tell them apart"
    alone(engine, old)
    engine.registry.unregister("x")
    gc.collect()  # the old weights are gone: a key by id() could now meet the new weights
    engine.registry.register("x", adapters["r2"])
    before = counted()
    assert alone(engine, new).token_ids == as_r2.token_ids
    assert counted_since(before) == (len(new.prompt_ids), 0), "the new weights hit keys the old ones computed"
    again = question(rng, context, "x")
    assert alone(engine, again).token_ids == alone(reference, dataclasses.replace(again, adapter="r2")).token_ids
    assert counted_since(before)[1] == CONTEXT  # the new weights' own keys are reused


def test_the_batch_kv_cache_holds_the_longest_prompt_not_the_prefill_layout_with_its_hole(engines):
    """A prompt that hits a long cached context beside a long one that hits nothing: the prefill's columns (the cached
    prefix, then the rest) outnumber the longest prompt's tokens; the running batch's KV cache takes only those."""
    engine, reference = cached_engine(engines), reference_engine(engines)
    rng = random.Random(11)
    context = prompt(rng, 25 * BLOCK, 25 * BLOCK)
    works = [question(rng, context, "r2"), question(rng, context, "r2"), greedy(rng, "r2")]
    works[2].prompt_ids = prompt(rng, 150, 150)
    expected = [alone(reference, work) for work in works]
    alone(engine, works[0])
    engine.decoder = steps = WatchedSteps(engine.decoder, note=lambda _: steps.decoder.cache.shape[1])
    with paused(engine):
        futures = [engine.submit(work) for work in works[1:]]
    assert_same_outputs(results(futures), expected[1:], works[1:])  # their prefill spans 200 + 150 columns
    # the columns the cache holds at each decoding step, read on the engine thread (it is freed once the batch ends)
    assert max(steps.notes) == column_bucket(max(len(work.prompt_ids) for work in works)) == 256, steps.notes


def test_eviction_under_a_small_bound_drops_the_least_recently_used_context(engines):
    engine, reference = cached_engine(engines), reference_engine(engines)
    rng = random.Random(5)
    contexts = {name: prompt(rng, CONTEXT, CONTEXT) for name in "abc"}
    hits = []
    for at, name in enumerate("abacab"):
        work = question(rng, contexts[name], "r4")
        before = counted()
        assert alone(engine, work).token_ids == alone(reference, work).token_ids
        hits.append(counted_since(before)[1])
        if at == 0:  # a context's blocks are what one request keeps: make room for two contexts, not three
            engine.prefix_cache.max_bytes = 2 * engine.prefix_cache.nbytes + engine.prefix_cache.nbytes // 10
        assert engine.prefix_cache.nbytes <= engine.prefix_cache.max_bytes
    assert hits == [0, 0, CONTEXT, 0, CONTEXT, 0], f"tokens hit per request: {hits}"  # c evicted b, b evicted c


def test_caching_off_looks_up_nothing_keeps_nothing_and_runs_every_token(engines, counted_passes):
    engine, cached = reference_engine(engines), cached_engine(engines)
    rng = random.Random(6)
    context = prompt(rng, CONTEXT, CONTEXT)
    works = [question(rng, context, name) for name in ("r2", "r2", None)]
    expected = [alone(cached, work) for work in works]
    counted_passes.computed.clear()
    before = counted()
    assert_same_outputs([alone(engine, work) for work in works], expected, works)
    assert counted_since(before) == (0, 0) and engine.prefix_cache.nbytes == 0
    assert counted_passes.computed == [len(work.prompt_ids) for work in works]


@pytest.mark.parametrize("arch", sorted(BASES))
def test_a_question_reuses_its_context_up_to_its_last_token_in_common_and_the_hit_counter_counts_it(
        engines, arch, counted_passes):
    engine, reference = cached_engine(engines, arch), reference_engine(engines, arch)
    context = prompt(random.Random(7), CONTEXT + 3, CONTEXT + 3)  # 3 tokens past the whole blocks
    tails_hits = (([1, 2, 3, 4, 5], 0), ([6, 7, 8], CONTEXT + 3),  # the first stored the block after the whole ones
                  ([1, 2, 9, 9], CONTEXT + 5), ([1, 2, 3, 4, 5, 6], CONTEXT + 8), ([1, 2, 3, 4, 5], CONTEXT + 7))
    for tail, hit in tails_hits:
        work = Generation(context + tail, "r2", Decoding(max_new_tokens=8), False)
        expected = alone(reference, work)
        before = counted()
        counted_passes.computed.clear()
        assert alone(engine, work).token_ids == expected.token_ids
        assert counted_since(before) == (len(work.prompt_ids), hit)
        assert counted_passes.computed == [len(work.prompt_ids) - hit]  # what was not hit was run
    exposed = generate_latest(REGISTRY).decode()
    for name in ("loraswap_prefix_cache_query_tokens_total", "loraswap_prefix_cache_hit_tokens_total"):
        assert name in exposed
    assert REGISTRY.get_sample_value("loraswap_prefix_cache_bytes") == engine.prefix_cache.nbytes > 0


def test_scorings_on_a_shared_premise_match_the_uncached_probabilities(engines):
    engine, reference = cached_engine(engines), reference_engine(engines)
    rng = random.Random(8)
    premise = prompt(rng, CONTEXT, CONTEXT)
    works = [Scoring(premise + prompt(rng, 3, 7), name, [5, 50, 500]) for name in ("r2", "r2", None, "r8")] * 2
    expected = [alone(reference, work) for work in works]
    before = counted()
    with paused(engine):
        futures = [engine.submit(work) for work in works[:4]]
    got = results(futures) + [alone(engine, work) for work in works[4:]]
    for probabilities, wanted in zip(got, expected):
        assert probabilities == pytest.approx(wanted, abs=1e-5)
    again = sum(len(work.prompt_ids) - 1 for work in works[4:])  # asked again: all but their last tokens
    assert counted_since(before)[1] == 2 * CONTEXT + again  # r2's two rows from a pass of their premise, then all four


def test_keys_computed_with_an_adapter_merged_are_kept_apart_from_those_computed_through_its_slot(engines):
    engine, reference = cached_engine(engines), reference_engine(engines)
    rng = random.Random(9)
    context = prompt(rng, CONTEXT, CONTEXT)
    works = [question(rng, context, "r4") for _ in range(4)]
    hits = []

    def serve(work: Generation) -> None:
        before = counted()
        assert alone(engine, work).token_ids == alone(reference, work).token_ids
        hits.append(counted_since(before)[1])

    serve(works[0])
    engine.call(lambda: engine.registry.merge("r4")).result(WAIT)
    serve(works[1])
    serve(works[2])
    engine.call(engine.registry.unmerge).result(WAIT)
    serve(works[3])
    assert hits == [0, 0, CONTEXT, CONTEXT], f"tokens hit per request: {hits}"


def test_an_nf4_base_gets_what_it_gets_without_the_cache(engines):
    try:
        engine, reference = cached_engine(engines, quantize="nf4"), engines.fresh(quantize="nf4", prefix_cache_bytes=0)
    except Exception as exc:  # bitsandbytes without CPU 4-bit support raises various errors
        pytest.skip(f"bitsandbytes cannot run an NF4 base on the CPU here: {type(exc).__name__}: {exc}")
    rng = random.Random(10)
    context = prompt(rng, CONTEXT, CONTEXT)
    works = [question(rng, context, name) for name in ("r8", "r8", None)]
    expected = [alone(reference, work) for work in works]
    before = counted()
    assert_same_outputs([alone(engine, work) for work in works], expected, works)
    assert counted_since(before)[1] == CONTEXT

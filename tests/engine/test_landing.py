"""A prefill pass that runs whole keeps no cache of its own: its keys and values go straight into the rows its prompts
join in the running batch's KV cache (``Prefill(into=...)``, ``kv_cache.OnePassCache``), or nowhere for a scoring pass.
What lands must be exactly what a pass that keeps its cache copies in: the same rows, columns and bits, the same
logits and next steps, and the same blocks for the prefix cache, with or without cached prefixes.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from service.engine.kv_cache import OnePassCache
from service.engine.prefill import Prefill
from service.engine.prefix_cache import PrefixCache, weights_key
from service.engine.row_mapping import map_rows
from service.engine.running_batch import RunningBatch
from service.engine.sampling import Decoding, Sampler
from service.engine.scheduler import Engine
from service.model.base_model import cache_keyword
from service.settings import Settings
from tests.lora_helpers import engine_model, random_ids

FIRST = [random_ids(1, 7, 1)[0].tolist()]  # the row running when the others join
JOINERS = [random_ids(1, 5, 2)[0].tolist(), random_ids(1, 11, 3)[0].tolist(), random_ids(1, 2, 4)[0].tolist()]
NAMES = [["r4"], ["r2", None, "r8"]]
BLOCK = 2  # prefix cache block, in tokens


@pytest.fixture(scope="module")
def engine(base_dir, ranked) -> Engine:
    model, registry = engine_model(base_dir, ranked)
    settings = Settings(base_model=str(base_dir), device="cpu", dtype="float32")
    return Engine(model, AutoTokenizer.from_pretrained(base_dir), registry, settings)


def run_batch(engine: Engine, passes: list[list[list[int]]], landing: bool,
              prefix_cache: PrefixCache | None = None) -> dict:
    """Run ``passes`` (each: prompts joining the rows before them, with the adapters of ``NAMES``) as the engine does,
    landing whole passes or copying kept caches in, then one decoding step; returns what the rows' KV cache holds,
    the logits before and after the step, and whether each pass kept a cache of its own."""
    registry, running, names, kept = engine.registry, RunningBatch(engine.decoder), [], []
    for prompts, joining in zip(passes, NAMES):
        adapters = [registry.lookup(name) for name in names + joining]
        map_rows(registry, adapters, pointed=slice(len(names), None))
        weights = [weights_key(adapter, None) for adapter in adapters[len(names):]]
        prefill = Prefill(engine.model, prompts, engine.pad_id, engine.device, prefix_cache, weights,
                          into=running if landing else None)
        prefill.advance()
        kept.append(prefill.cache is not None)
        map_rows(registry, adapters)
        sampler = Sampler([Decoding()] * len(prompts), engine.device)
        running.add([None] * len(prompts), prefill.logits, prefill.cache, prefill.mask, sampler, [9] * len(prompts))
        names += joining
    cache, width = engine.decoder.cache, max(running.positions)
    held = [tensor[: len(running), :, :width].clone() for tensor in (*cache.keys, *cache.values)]
    logits = running.logits.clone()
    running.forward([5] * len(running))
    after = running.logits.clone()
    engine.decoder.idle()
    return {"kv": held, "logits": logits, "step": after, "kept": kept, "positions": list(running.positions)}


def assert_same(landed: dict, copied: dict) -> None:
    assert landed["positions"] == copied["positions"]
    assert len(landed["kv"]) == len(copied["kv"])
    for ours, theirs in zip(landed["kv"], copied["kv"]):
        assert torch.equal(ours, theirs)
    assert torch.equal(landed["logits"], copied["logits"]) and torch.equal(landed["step"], copied["step"])


@torch.inference_mode()
def test_a_whole_pass_lands_in_the_running_rows_exactly_what_a_kept_cache_copies_in(engine):
    copied = run_batch(engine, [FIRST, JOINERS], landing=False)
    landed = run_batch(engine, [FIRST, JOINERS], landing=True)
    assert copied["kept"] == [True, True] and landed["kept"] == [False, False]
    assert_same(landed, copied)


@torch.inference_mode()
def test_landed_passes_feed_and_reuse_the_prefix_cache_as_kept_ones_do(engine):
    """The second batch's prompts begin as the first's: its pass is seeded with their cached blocks."""
    caches = {landing: PrefixCache(BLOCK, 2**30) for landing in (False, True)}
    again = [FIRST, [[*prompt, 7, 8, 9] for prompt in JOINERS]]
    runs = {landing: [run_batch(engine, passes, landing, caches[landing]) for passes in ([FIRST, JOINERS], again)]
            for landing in (False, True)}
    for first, second in zip(runs[True], runs[False]):
        assert_same(first, second)
    assert caches[True].nbytes == caches[False].nbytes > 0
    for prompts, names in zip(again, NAMES):
        for prompt, name in zip(prompts, names):
            key = weights_key(engine.registry.lookup(name), None)
            ours, theirs = caches[True].lookup(key, prompt), caches[False].lookup(key, prompt)
            assert ours is not None and theirs is not None and torch.equal(ours, theirs)


@torch.inference_mode()
def test_a_scoring_pass_keeps_no_keys_and_values_unless_the_prefix_cache_takes_blocks(engine):
    registry = engine.registry
    map_rows(registry, [registry.lookup(name) for name in NAMES[1]])
    weights = [weights_key(registry.lookup(name), None) for name in NAMES[1]]
    passes = {}
    for keep_kv, prefix_cache in ((True, None), (False, None), (False, PrefixCache(BLOCK, 2**30))):
        prefill = Prefill(engine.model, JOINERS, engine.pad_id, engine.device, prefix_cache, weights, keep_kv=keep_kv)
        prefill.advance()
        passes[keep_kv, prefix_cache is not None] = prefill
    assert passes[True, False].cache is not None and passes[False, False].cache is None
    assert passes[False, True].cache is not None, "the prefix cache's blocks are read from the pass's cache"
    assert all(prefill.landed is None for prefill in passes.values())
    for prefill in passes.values():
        assert torch.equal(prefill.logits, passes[True, False].logits)


@torch.inference_mode()
def test_a_one_pass_cache_holds_no_layer_once_the_attention_read_it(engine):
    map_rows(engine.registry, [None] * len(JOINERS))
    prefill = Prefill(engine.model, JOINERS, engine.pad_id, engine.device)
    cache = OnePassCache(None, prefill.mask)
    engine.model(input_ids=prefill.ids, attention_mask=prefill.mask, position_ids=prefill.positions,
                 **{cache_keyword(engine.model): cache}, use_cache=True)
    assert cache.layers and all(layer.keys.numel() == layer.values.numel() == 0 for layer in cache.layers)

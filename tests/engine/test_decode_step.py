"""Decoding over the static KV cache: every row, at its own position, with its own adapter, gets the
logits of its whole sequence run alone through stock peft, across joins, departures and cache growth.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoTokenizer

from service.engine.kv_cache import COLUMN_STEP, RowKVCache
from service.engine.prefill import Prefill
from service.engine.row_mapping import map_rows
from service.engine.running_batch import RunningBatch
from service.engine.sampling import Decoding, Sampler
from service.engine.scheduler import Engine
from service.model.base_model import cache_keyword
from service.settings import Settings
from tests.lora_helpers import engine_model, peft_logits, random_ids

TOLERANCE = 1e-4


class Rows:
    """Sequences fed through a RunningBatch, and their reference logits from peft, one row at a time."""

    def __init__(self, base_dir, adapters, dense: bool, device: str = "cpu"):
        self.base_dir, self.adapters = base_dir, adapters
        model, self.registry = engine_model(base_dir, adapters, device=device)
        self.registry.layers.mapping.dense_decode = dense
        settings = Settings(base_model=str(base_dir), device=device, dtype="float32", cuda_graphs=device == "cuda")
        self.engine = Engine(model, AutoTokenizer.from_pretrained(base_dir), self.registry, settings)
        self.running = RunningBatch(self.engine.decoder)
        self.sequences: list[list[int]] = []
        self.names: list[str | None] = []

    def join(self, prompts: list[list[int]], names: list[str | None], chunk: int = 0) -> None:
        """Run the prompts ``chunk`` tokens at a time (0: whole) and add them after the running rows."""
        adapters = [self.registry.lookup(name) for name in self.names + names]
        map_rows(self.registry, adapters, pointed=slice(len(self.names), len(adapters)))  # as the engine does
        prompt = Prefill(self.engine.model, prompts, self.engine.pad_id, self.engine.device)
        while not prompt.finished:
            prompt.advance(chunk)
        map_rows(self.registry, adapters)
        sampler = Sampler([Decoding()] * len(prompts), self.engine.device)
        self.running.add([None] * len(prompts), prompt.logits, prompt.cache, prompt.mask, sampler, [99] * len(prompts))
        self.sequences += [list(p) for p in prompts]
        self.names += names

    def step(self, tokens: list[int]) -> None:
        self.running.forward(tokens)
        for sequence, token in zip(self.sequences, tokens):
            sequence.append(token)

    def leave(self, kept: list[int]) -> None:
        self.running.keep(kept)
        self.sequences = [self.sequences[row] for row in kept]
        self.names = [self.names[row] for row in kept]
        map_rows(self.registry, [self.registry.lookup(name) for name in self.names])

    def assert_match(self) -> None:
        for row, (sequence, name) in enumerate(zip(self.sequences, self.names)):
            expected = peft_logits(self.base_dir, self.adapters.get(name), torch.tensor([sequence]))[0, -1]
            error = (self.running.logits[row].cpu() - expected).abs().max().item()
            assert error < TOLERANCE, f"row {row} ({name}, {len(sequence)} tokens): max error {error:.2e}"


CASES = [("cpu", "gathered"), ("cpu", "dense"),
         pytest.param("cuda", "dense", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize(("device", "form"), CASES)
@torch.inference_mode()
def test_rows_at_their_own_positions_equal_each_sequence_alone(base_dir, ranked, device, form):
    """On the GPU the steps are replayed CUDA graphs (checked), so this also holds the graphs to peft."""
    rows = Rows(base_dir, ranked, dense=form == "dense", device=device)
    prompts = [ids.tolist() for ids in (random_ids(1, 3, 1)[0], random_ids(1, 9, 2)[0], random_ids(1, 5, 3)[0])]
    rows.join(prompts, ["r2", None, "r8"], chunk=4)  # a column per pass: the first ones pad two rows entirely
    rows.assert_match()
    rows.step([11, 12, 13])
    rows.step([21, 22, 23])
    rows.assert_match()
    rows.leave([0, 2])  # the middle row finished: the last one moves up a cache row
    rows.step([31, 33])
    rows.assert_match()
    cache: RowKVCache = rows.engine.decoder.cache
    storage = cache.storage
    rows.join([random_ids(1, COLUMN_STEP + 20, 4)[0].tolist()], ["r4"])  # longer than the cache is wide
    assert cache.storage > storage and cache.shape[1] >= COLUMN_STEP + 20, "the cache did not grow"
    rows.assert_match()
    rows.step([41, 43, 44])
    rows.assert_match()
    decoder = rows.engine.decoder
    assert decoder.cuda_graphs == (device == "cuda") and bool(decoder.graphs) == (device == "cuda")


@torch.inference_mode()
def test_the_cache_goes_by_the_keyword_the_model_takes(base_dir, ranked):
    """transformers 5.24 warns on every forward given ``past_key_values`` (removed in 5.40): a prompt pass and decoding
    steps warn of nothing, and still match peft (the cache was used, not dropped as an unknown keyword)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = Rows(base_dir, ranked, dense=False)
        rows.join([random_ids(1, 6, 5)[0].tolist(), random_ids(1, 4, 6)[0].tolist()], ["r2", None], chunk=4)
        rows.step([11, 12])
        rows.assert_match()
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_a_model_without_the_cache_keyword_gets_past_key_values():
    """As transformers 5.17's models (the GPU machine's), whose forward would swallow ``cache=`` and run uncached."""
    class Older(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
            return input_ids

    class Newer(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None, **kwargs):
            return input_ids

    assert (cache_keyword(Older()), cache_keyword(Newer())) == ("past_key_values", "cache")



def test_a_growing_kv_cache_never_holds_the_old_and_the_new_whole_together(monkeypatch):
    """The memory check at the start counts one full KV cache (``device_room``): growing, the cache held every
    layer's old storage until every layer's new one was made, the old and the new whole together. Now at most one
    layer's old storage outlives its copy."""
    import weakref

    from service.engine import kv_cache

    live: dict[int, int] = {}

    def tracked(tensor: torch.Tensor) -> torch.Tensor:
        live[id(tensor)] = tensor.nbytes
        weakref.finalize(tensor, live.pop, id(tensor))
        return tensor

    peaks = []  # at each allocation: the bytes held, the new storage's included
    made = kv_cache.zeros_like

    def noted(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        peaks.append(sum(live.values()) + torch.Size(shape).numel() * like.element_size())
        return tracked(made(like, shape))

    monkeypatch.setattr(kv_cache, "zeros_like", noted)
    cache = RowKVCache()
    cache.reserve(4, COLUMN_STEP, used=(0, 0))
    layers, heads, head_dim = 6, 2, 8
    for layer in range(layers):
        keys = torch.randn(4, heads, COLUMN_STEP, head_dim)
        cache.write_layer(layer, 0, keys, keys.clone(), torch.arange(COLUMN_STEP).expand(4, -1))
    old = sum(live.values())
    peaks.clear()
    cache.reserve(8, 2 * COLUMN_STEP, used=(4, COLUMN_STEP))
    new = sum(live.values())
    assert new == 4 * old and len(peaks) == 2 * layers
    assert max(peaks) <= new + old / (2 * layers), (max(peaks), old, new)

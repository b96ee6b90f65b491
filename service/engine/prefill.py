"""Prefill: prompts run through the model together, past their cached prefixes, whole or a chunk of columns at a time.

Requests that join a running batch have their prompts run between two of its decoding steps; run whole,
long prompts would hold the running rows for many steps' worth of work. A ``Prefill`` can instead
advance by a budget of prompt tokens per pause, keeping the columns run so far in a ``DynamicCache``.

With a ``PrefixCache``, each prompt starts from the keys and values cached for its longest cached prefix (computed
earlier with the same weights) and only its other tokens run; once through, its blocks (the last one may be short)
are kept for later prompts. The cache's columns then hold every row's cached prefix, right-aligned to ``past``
columns, followed by the left-padded rest of the prompts: a row whose prefix and rest are both shorter than the longest
has a hole of padding between the two, which its attention mask skips (``mask`` marks the columns that hold its
tokens).

A pass that runs whole keeps no cache: each layer's keys and values go straight into the rows its prompts join in the
running batch's KV cache (``into``), or nowhere when nothing reads them later (scoring, with prefix caching off), so
that a pass never holds all its keys and values beside the running batch's (``kv_cache.OnePassCache``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from service.engine.kv_cache import OnePassCache, RowKVCache, prompt_columns
from service.engine.prefix_cache import PrefixCache, WeightsKey
from service.model.base_model import cache_keyword

if TYPE_CHECKING:
    from service.engine.running_batch import RunningBatch


class Prefill:
    """Prompts [rows]: ``ids`` [rows, width], the tokens past each row's cached prefix, left-padded; ``mask`` [rows,
    past + width] the cache columns that hold each row's tokens; ``logits`` [rows, vocab] once finished.

    ``prefix_cache`` (with ``weights``, one per prompt: what computes its keys and values) supplies the cached
    prefixes and keeps the prompts' blocks once they have run; None runs every token and keeps nothing. The rows'
    keys and values: with ``into``, the running batch the rows join, a pass that runs whole writes them into its KV
    cache itself (``landed``: that cache and the rows' first row); without, or run a chunk at a time, they are in
    ``cache`` once finished, unless ``keep_kv`` is False (scoring: only the logits are read) and the pass runs whole,
    when they are dropped layer by layer (but for the prefix cache's blocks)."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int, device: torch.device,
                 prefix_cache: PrefixCache | None = None, weights: list[WeightsKey] | None = None,
                 into: RunningBatch | None = None, keep_kv: bool = True):
        self.model, self.prompts, self.prefix_cache, self.weights = model, prompts, prefix_cache, weights
        self.into, self.keep_kv = into, keep_kv
        prefixes = ([prefix_cache.lookup(key, prompt) for key, prompt in zip(weights, prompts)]
                    if prefix_cache is not None else [None] * len(prompts))
        cached = [0 if prefix is None else prefix.shape[3] for prefix in prefixes]
        self.past = max(cached)  # columns of cached prefixes
        width = max(len(prompt) - skip for prompt, skip in zip(prompts, cached))
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.past + width), dtype=torch.long)
        for row, (prompt, skip) in enumerate(zip(prompts, cached)):
            rest = len(prompt) - skip
            ids[row, width - rest:] = torch.tensor(prompt[skip:])
            mask[row, self.past - skip: self.past] = 1
            mask[row, self.past + width - rest:] = 1
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, self.past:]  # [rows, width]
        self._seed = seeded(prefixes, self.past) if self.past else None
        self.cache: DynamicCache | None = None  # the pass's own, from its first chunk (None after a whole pass)
        self.landed: tuple[RowKVCache, int] | None = None
        self.done = 0  # columns of ``ids`` run so far
        self.logits: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    @property
    def finished(self) -> bool:
        return self.done == self.width

    def advance(self, budget: int = 0) -> None:
        """Run the next columns: as many as ``budget`` tokens over all rows allow (at least one), or all (0)."""
        columns = max(1, budget // len(self.ids)) if budget else self.width
        start, end = self.done, min(self.width, self.done + columns)
        cache = self.cache if start else self._first_cache(whole=end == self.width)
        out = self.model(input_ids=self.ids[:, start:end], attention_mask=self.mask[:, : self.past + end],
                         position_ids=self.positions[:, start:end], **{cache_keyword(self.model): cache},
                         use_cache=True, logits_to_keep=1)
        self.done = end
        if self.finished:
            self.logits = out.logits[:, -1].float()
            self._keep_blocks()

    def _first_cache(self, whole: bool) -> DynamicCache:
        """The cache the pass runs with, seeded with the cached prefixes: a ``OnePassCache`` for a whole pass whose
        keys and values go into the running batch, or that nobody reads later; else its own, kept (``cache``)."""
        seed, self._seed = self._seed, None  # the cache holds copies
        blocks = self.prefix_cache is not None and self.prefix_cache.enabled  # _keep_blocks reads the pass's cache
        if whole and (self.into is not None or not (self.keep_kv or blocks)):
            self.landed = self.into.room(self.mask.sum(-1).tolist()) if self.into is not None else None
            into, start = self.landed or (None, 0)
            return OnePassCache(seed, self.mask, into, start)
        self.cache = DynamicCache(ddp_cache_data=seed) if seed else DynamicCache()
        return self.cache

    def _keep_blocks(self) -> None:
        """Hand the prefix cache every prompt's blocks (it copies those it lacks)."""
        if self.prefix_cache is None:
            return
        columns = prompt_columns(self.mask) if self.landed is None else None  # each row's tokens' columns first
        for row, (key, prompt) in enumerate(zip(self.weights, self.prompts)):
            self.prefix_cache.store(key, prompt, lambda start, end, row=row: self._kv(row, start, end, columns))

    def _kv(self, row: int, start: int, end: int, columns: torch.Tensor | None) -> torch.Tensor:
        """A copy of the keys and values of row ``row``'s tokens ``start .. end - 1``, [layers, 2, kv heads, end -
        start, head dim]: from the pass's own cache, at the columns ``columns`` [rows, past + width] gives them, or
        once landed from the row's in the running batch's KV cache (its tokens from column 0 on, in order)."""
        if self.landed is None:
            picked = columns[row, start:end]
            layers = [(layer.keys[row], layer.values[row]) for layer in self.cache.layers]
        else:
            (cache, first), picked = self.landed, slice(start, end)
            layers = [(keys[first + row], values[first + row]) for keys, values in zip(cache.keys, cache.values)]
        return torch.stack([torch.stack((keys[:, picked], values[:, picked])) for keys, values in layers])


def seeded(prefixes: list[torch.Tensor | None], past: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) [rows, kv heads, past, head dim]: each row's cached prefix ([layers, 2, kv heads,
    tokens, head dim], or None) right-aligned, zeros in front of it (the attention mask hides them)."""
    like = next(prefix for prefix in prefixes if prefix is not None)
    layers, _, heads, _, dim = like.shape
    kv = like.new_zeros(layers, 2, len(prefixes), heads, past, dim)
    for row, prefix in enumerate(prefixes):
        if prefix is not None:
            kv[:, :, row, :, past - prefix.shape[3]:] = prefix
    return [(layer[0], layer[1]) for layer in kv]

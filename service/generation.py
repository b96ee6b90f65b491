"""A batch of generations in flight: its rows, their KV cache and their per-row decoding state.

Rows leave when they finish (their cache rows are dropped) and new requests can join between two
decoding steps: they are prefilled on their own, then their cache is left-padded to the running
width and concatenated, so every row keeps its own positions and its own attention mask.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from service.decoding import RowSampler


def left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad ``tensor`` on the left of ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pad)


class RunningBatch:
    """Rows being generated together. ``pendings`` are the engine's requests, one per row."""

    def __init__(self, pendings: list, logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor,
                 sampler: RowSampler, limits: list[int]):
        self.pendings = pendings
        self.logits = logits  # [B, V] next-token logits
        self.cache = cache
        self.mask = mask  # [B, W] 1 for real tokens, 0 for left padding
        self.lengths = mask.sum(-1)  # [B] real tokens so far = position of the next token
        self.sampler = sampler
        self.limits = limits
        self.tokens: list[list[int]] = [[] for _ in pendings]
        self.first_token_at = [0.0] * len(pendings)

    def __len__(self) -> int:
        return len(self.pendings)

    def sample(self, is_stop: Callable[[object, int], bool]) -> tuple[list[int], list[tuple[int, str]]]:
        """Pick every row's next token; returns (the tokens, [(row, finish reason)] for rows now done)."""
        chosen = self.sampler(self.logits, [len(t) for t in self.tokens]).tolist()
        now, finished = time.perf_counter(), []
        for row, token in enumerate(chosen):
            if not self.tokens[row]:
                self.first_token_at[row] = now
            self.tokens[row].append(token)
            if is_stop(self.pendings[row].work, token):
                finished.append((row, "stop"))
            elif len(self.tokens[row]) >= self.limits[row]:
                finished.append((row, "length"))
        return chosen, finished

    def keep(self, rows: list[int]) -> torch.Tensor:
        """Keep only ``rows`` (in this order), dropping the others' cache and state; returns their index tensor."""
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.lengths = self.mask[index], self.lengths[index]
        self.sampler.select_rows(index)
        for name in ("pendings", "limits", "tokens", "first_token_at"):
            values = getattr(self, name)
            setattr(self, name, [values[row] for row in rows])
        return index

    def extend(self, other: RunningBatch) -> None:
        """Append ``other``'s rows: caches and masks left-padded to a common width, then concatenated."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, width, -2), left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([left_pad(mine.values, width, -2), left_pad(theirs.values, width, -2)])
        self.mask = torch.cat([left_pad(self.mask, width, 1), left_pad(other.mask, width, 1)])
        self.logits = torch.cat([self.logits, other.logits])
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.sampler.extend(other.sampler)
        for name in ("pendings", "limits", "tokens", "first_token_at"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def forward(self, model, next_tokens: list[int]) -> None:
        """One decoding step: feed each row's last token, keep the next-token logits."""
        ids = torch.tensor(next_tokens, device=self.mask.device)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=-1)
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=self.lengths[:, None],
                    past_key_values=self.cache, use_cache=True)
        self.logits = out.logits[:, -1].float()
        self.lengths = self.lengths + 1

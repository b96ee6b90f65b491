"""A preallocated KV cache in which every row of the running batch writes at its own position.

Row i of the batch is row i of the cache; its tokens fill columns 0 .. positions[i] - 1 (no padding in
front), so a request that joins is copied into free rows without touching the others, and a decoding
step writes one column per row. Storage grows in buckets (rows to a power of two, columns to a multiple
of ``COLUMN_STEP``) and is never reallocated otherwise: ``storage`` counts reallocations, so CUDA graphs
captured over it know when they went stale.
"""
from __future__ import annotations

import torch
from transformers import Cache, DynamicCache

COLUMN_STEP = 256


def row_bucket(rows: int) -> int:
    """Rows rounded up to a power of two."""
    return 1 << (rows - 1).bit_length()


def column_bucket(columns: int) -> int:
    """Columns rounded up to a multiple of ``COLUMN_STEP``."""
    return -(-columns // COLUMN_STEP) * COLUMN_STEP


def prompt_columns(mask: torch.Tensor) -> torch.Tensor:
    """[rows, width]: for each row of ``mask`` [rows, width] (1 where a column holds one of the row's tokens), the
    columns of its tokens in order, then its other columns."""
    return torch.argsort(1 - mask, dim=1, stable=True)


class RowKVCache(Cache):
    """Keys and values [rows, kv heads, columns, head dim] per layer, written at per-row positions."""

    def __init__(self, min_rows: int = 1):
        super().__init__(layers=[])
        self.min_rows = min_rows  # rows allocated at the least (the largest batch), so joins do not reallocate
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.storage = 0
        self.positions: torch.Tensor | None = None  # [batch] the column each row writes in this step
        self.width = 0  # columns the attention reads in this step

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) allocated."""
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def reserve(self, rows: int, columns: int, used: tuple[int, int], like: DynamicCache | None = None) -> None:
        """Make room for ``rows`` x ``columns``, keeping the ``used`` (rows, columns) corner; a first
        allocation takes its heads, head size and dtype from ``like`` (a prefill's cache)."""
        have_rows, have_columns = self.shape
        if rows <= have_rows and columns <= have_columns:
            return
        rows, columns = max(row_bucket(rows), have_rows, self.min_rows), max(column_bucket(columns), have_columns)
        templates = list(zip(self.keys, self.values)) or [(layer.keys, layer.values) for layer in like.layers]
        grown_keys, grown_values = [], []
        for old_keys, old_values in templates:
            heads, dim = old_keys.shape[1], old_keys.shape[3]
            keys = old_keys.new_zeros(rows, heads, columns, dim)
            values = old_values.new_zeros(rows, heads, columns, dim)
            if self.keys:
                keys[: used[0], :, : used[1]] = old_keys[: used[0], :, : used[1]]
                values[: used[0], :, : used[1]] = old_values[: used[0], :, : used[1]]
            grown_keys.append(keys)
            grown_values.append(values)
        self.keys, self.values = grown_keys, grown_values
        self.storage += 1

    def release(self) -> None:
        """Free the storage; the next ``reserve`` allocates afresh, from a prefill's cache."""
        self.keys, self.values = [], []
        self.storage += 1

    def write_prompts(self, start: int, prefill: DynamicCache, mask: torch.Tensor) -> None:
        """Copy a prefill's rows into rows ``start ..``, each row's tokens (the columns its ``mask`` [rows, width]
        marks: left padding, or a cached prefix and the rest of the prompt with a hole between them) moved to begin at
        column 0, in order: the first ``longest`` columns, the longest prompt's length (columns past a shorter prompt
        get filler, never read)."""
        longest = int(mask.sum(-1).max())
        columns = prompt_columns(mask)[:, :longest]  # [rows, longest]
        for keys, values, layer in zip(self.keys, self.values, prefill.layers):
            heads, dim = layer.keys.shape[1], layer.keys.shape[3]
            index = columns[:, None, :, None].expand(-1, heads, -1, dim)
            keys[start: start + len(mask), :, :longest] = layer.keys.gather(2, index)
            values[start: start + len(mask), :, :longest] = layer.values.gather(2, index)

    def keep(self, index: torch.Tensor, columns: int) -> None:
        """Move rows ``index`` (their first ``columns`` columns) to the front, in this order."""
        for tensor in (*self.keys, *self.values):
            tensor[: len(index), :, :columns] = tensor[index, :, :columns]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """A decoding step's keys/values [batch, heads, 1, dim] go to each row's position; returns the
        rows' first ``width`` columns."""
        rows = key_states.shape[0]
        index = torch.arange(rows, device=key_states.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[index, :, self.positions] = key_states[:, :, 0]
        values[index, :, self.positions] = value_states[:, :, 0]
        return keys[:rows, :, : self.width], values[:rows, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

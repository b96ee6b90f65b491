"""A preallocated KV cache in which every row of the running batch writes at its own position.

Row i of the batch is row i of the cache; its tokens fill columns 0 .. positions[i] - 1 (no padding in
front), so a request that joins is copied into free rows without touching the others, and a decoding
step writes a column per token it feeds a row. Storage grows in buckets (rows to a power of two, columns to a multiple
of ``COLUMN_STEP``) and is never reallocated otherwise: ``storage`` counts reallocations, so CUDA graphs
captured over it know when they went stale. On the CPU it lives in maps of its own (``file_pages.mapped_zeros``):
the rows and columns of a bucket never written take no memory, and a batch's cache leaves memory when it is freed.

A prefill pass that runs whole needs no cache of its own to keep: ``OnePassCache`` hands each layer's keys and values
to the attention and writes them straight into the rows the prompts join, so they are never held twice.
"""
from __future__ import annotations

import torch
from transformers import Cache, DynamicCache

from service.model.file_pages import mapped_zeros

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


def zeros_like(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zeros of ``shape`` with ``like``'s dtype and device: on the CPU in a map of their own (``mapped_zeros``)."""
    return mapped_zeros(shape, like.dtype) if like.device.type == "cpu" else like.new_zeros(shape)


class RowKVCache(Cache):
    """Keys and values [rows, kv heads, columns, head dim] per layer, written at per-row positions. ``reserve`` sets
    the rows and columns; a layer's storage is allocated when its first keys are written (``write_layer``), with their
    heads, head size and dtype."""

    def __init__(self, min_rows: int = 1):
        super().__init__(layers=[])
        self.min_rows = min_rows  # rows allocated at the least (the largest batch), so joins do not reallocate
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.storage = 0
        self.positions: torch.Tensor | None = None  # [batch, q] the columns each row writes in this step
        self.width = 0  # columns the attention reads in this step
        self._shape = (0, 0)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) reserved."""
        return self._shape

    def reserve(self, rows: int, columns: int, used: tuple[int, int]) -> None:
        """Make room for ``rows`` x ``columns``, keeping the ``used`` (rows, columns) corner of each allocated layer.
        A layer's old storage is freed once its corner is copied, before the next layer grows: the old and the new
        cache are never held whole together (the memory check at the start counts one: ``device_room``)."""
        have_rows, have_columns = self.shape
        if rows <= have_rows and columns <= have_columns:
            return
        rows, columns = max(row_bucket(rows), have_rows, self.min_rows), max(column_bucket(columns), have_columns)
        for layers in (self.keys, self.values):
            for layer, old in enumerate(layers):
                layers[layer] = self._grown(old, rows, columns, used)
        self._shape = (rows, columns)
        self.storage += 1

    @staticmethod
    def _grown(old: torch.Tensor, rows: int, columns: int, used: tuple[int, int]) -> torch.Tensor:
        grown = zeros_like(old, (rows, old.shape[1], columns, old.shape[3]))
        grown[: used[0], :, : used[1]] = old[: used[0], :, : used[1]]
        return grown

    def release(self) -> None:
        """Free the storage; the next ``reserve`` and writes allocate afresh."""
        self.keys, self.values = [], []
        self._shape = (0, 0)
        self.storage += 1

    def write_layer(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor,
                    columns: torch.Tensor) -> None:
        """Write layer ``layer``'s keys and values of a prefill's rows ([k, kv heads, width, head dim]) into rows
        ``start ..``: columns ``columns`` [k, n] of each (its tokens in order, see ``prompt_columns``) to its first
        ``n``. A layer's storage is allocated (``reserve``'s shape) at its first write: layers are written in order."""
        if layer == len(self.keys):
            rows, width = self.shape
            self.keys.append(zeros_like(keys, (rows, keys.shape[1], width, keys.shape[3])))
            self.values.append(zeros_like(values, (rows, values.shape[1], width, values.shape[3])))
        index = columns[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        end, n = start + len(columns), columns.shape[1]
        self.keys[layer][start:end, :, :n] = keys.gather(2, index)
        self.values[layer][start:end, :, :n] = values.gather(2, index)

    def write_prompts(self, start: int, prefill: DynamicCache, mask: torch.Tensor) -> None:
        """Copy a prefill's rows into rows ``start ..``, each row's tokens (the columns its ``mask`` [rows, width]
        marks: left padding, or a cached prefix and the rest of the prompt with a hole between them) moved to begin at
        column 0, in order: the first ``longest`` columns, the longest prompt's length (columns past a shorter prompt
        get filler, never read)."""
        columns = landing_columns(mask)
        for layer, kv in enumerate(prefill.layers):
            self.write_layer(layer, start, kv.keys, kv.values, columns)

    def keep(self, index: torch.Tensor, columns: int) -> None:
        """Move rows ``index`` (their first ``columns`` columns) to the front, in this order."""
        for tensor in (*self.keys, *self.values):
            tensor[: len(index), :, :columns] = tensor[index, :, :columns]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """A decoding step's keys/values [batch, heads, q, dim] go to each row's positions (``positions`` [batch, q]);
        returns the rows' first ``width`` columns."""
        rows = key_states.shape[0]
        index = torch.arange(rows, device=key_states.device)[:, None]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[index, :, self.positions] = key_states.transpose(1, 2)  # [batch, q, heads, dim]
        values[index, :, self.positions] = value_states.transpose(1, 2)
        return keys[:rows, :, : self.width], values[:rows, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width


def landing_columns(mask: torch.Tensor) -> torch.Tensor:
    """[rows, longest]: each row's columns of a prefill's ``mask`` [rows, width] that ``RowKVCache.write_layer`` moves
    to the row's first columns: its tokens in order, then filler up to the longest prompt's length."""
    return prompt_columns(mask)[:, : int(mask.sum(-1).max())]


class OnePassCache(DynamicCache):
    """The cache of a prefill pass that runs whole: each layer's keys and values (after the cached prefix it was seeded
    with, [rows, kv heads, past, head dim] per layer in ``seed``) go to the attention exactly as a ``DynamicCache``
    hands them, are written into rows ``start ..`` of ``into`` (a ``RowKVCache`` with room for them; none: nowhere)
    moved as ``landing_columns(mask)`` says, and are then dropped: the pass never holds every layer's at once."""

    def __init__(self, seed: list[tuple[torch.Tensor, torch.Tensor]] | None, mask: torch.Tensor,
                 into: RowKVCache | None = None, start: int = 0):
        super().__init__(ddp_cache_data=seed)
        self.into, self.start = into, start
        self.columns = landing_columns(mask) if into is not None else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.into is not None:
            self.into.write_layer(layer_idx, self.start, keys, values, self.columns)
        layer = self.layers[layer_idx]
        layer.keys, layer.values = keys.new_empty(0), values.new_empty(0)  # as DynamicLayer holds none
        return keys, values

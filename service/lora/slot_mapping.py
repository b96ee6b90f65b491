"""The row-to-slot mapping: which device slot's adapter each row of the batch uses, read by every LoRA layer.

The engine, which owns the running batch, is its one writer: it points the mapping at the rows of each pass (a
chunk of the joining requests' prompts, or a decoding step of the running rows) with ``assign``. The layers read
the slots, the largest rank in play, the rows grouped by slot (``groups``, made once per mapping) and, for the
dense form on the GPU, a one-hot row-to-slot mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from service.engine.kv_cache import row_bucket


@dataclass(frozen=True)
class RowGroup:
    """Segments of ``width`` rows, each segment the rows of one slot: one pair of batched products applies them."""

    slots: tuple[int, ...]  # each segment's slot [U]
    select: slice | torch.Tensor  # picks those slots from a bank: a slice where they are consecutive
    width: int  # rows per segment
    rows: torch.Tensor | None  # [U * width] batch rows, segment after segment; None: the whole batch, in order


class SlotMapping:
    """Rows to bank slots for the pass about to run. Slot ``num_slots`` is the zero slot (no adapter)."""

    def __init__(self, num_slots: int, dtype: torch.dtype = torch.float32, dense_decode: bool = False):
        self.num_slots = num_slots  # device slots per bank
        self.dtype = dtype  # of the banks, and of the one-hot mask
        self.dense_decode = dense_decode  # one-token steps use the dense form (service.lora.layers)
        self.slots: torch.Tensor | None = None  # [batch] long; None: no row uses an adapter
        self.rank = 0  # largest rank among the rows' adapters; 0 means no LoRA this pass
        self.version = 0  # counts assignments: what layers keep for one mapping is keyed by it
        self.one_hot: torch.Tensor | None = None  # [rows >= batch, num_slots + 1]; rows past the batch are zero
        self.storage = 0  # counts reallocations of ``one_hot`` (captured CUDA graphs read its address)
        self._groups: tuple[RowGroup, ...] | None = None

    def assign(self, slots: torch.Tensor | None, rank: int, rows_at_least: int = 1) -> None:
        """Point the rows at ``slots`` [batch] (None, or ``rank`` 0: no LoRA at all). The one-hot mask, when the
        dense form is on, is allocated for at least ``rows_at_least`` rows, so that requests joining a batch do not
        reallocate it."""
        self.slots, self.rank = (slots, rank) if rank else (None, 0)
        self.version += 1
        self._groups = None
        if self.dense_decode and self.slots is not None:
            self._fill_one_hot(self.slots, rows_at_least)

    @property
    def groups(self) -> tuple[RowGroup, ...]:
        """The rows that use an adapter, by slot and segment width (see ``row_groups``), made once per mapping."""
        if self._groups is None:
            self._groups = row_groups(self.slots, self.num_slots)
        return self._groups

    def _fill_one_hot(self, slots: torch.Tensor, rows_at_least: int) -> None:
        """Write the row-to-slot mask in place; it grows (a new address) to a power of two of rows, the
        decoding step's row buckets, only when a batch outgrows it."""
        if self.one_hot is None or len(slots) > self.one_hot.shape[0]:
            rows = max(row_bucket(len(slots)), row_bucket(rows_at_least))
            self.one_hot = torch.zeros(rows, self.num_slots + 1, device=slots.device, dtype=self.dtype)
            self.storage += 1
        self.one_hot.zero_()
        self.one_hot[: len(slots)].scatter_(1, slots[:, None], 1.0)


def row_groups(slots: torch.Tensor, zero_slot: int) -> tuple[RowGroup, ...]:
    """Cut the rows of ``slots`` [batch] that use an adapter into segments of one slot each (rows in their order),
    grouped by width. Segments go in order of first appearance where that makes the whole batch one group in place
    (no index ops), else in slot order (consecutive slots make a view of the bank, not a copy: index ops are
    needed either way). Rows of the zero slot are left out."""
    segments: dict[int, list[int]] = {}
    for row, slot in enumerate(slots.tolist()):
        if slot != zero_slot:
            segments.setdefault(slot, []).append(row)
    in_order = grouped(segments, len(slots), slots.device)
    return in_order if in_place(in_order) else grouped(dict(sorted(segments.items())), len(slots), slots.device)


def in_place(groups: tuple[RowGroup, ...]) -> bool:
    """Whether ``groups`` are the whole batch, its rows already in segment order."""
    return len(groups) == 1 and groups[0].rows is None


def grouped(segments: dict[int, list[int]], batch: int, device: torch.device) -> tuple[RowGroup, ...]:
    """``segments`` (slot -> its rows), in their order, grouped by width, in a batch of ``batch`` rows."""
    by_width: dict[int, dict[int, list[int]]] = {}
    for slot, rows in segments.items():
        by_width.setdefault(len(rows), {})[slot] = rows
    return tuple(row_group(members, width, batch, device) for width, members in by_width.items())


def row_group(segments: dict[int, list[int]], width: int, batch: int, device: torch.device) -> RowGroup:
    """The group of ``segments`` (slot -> its ``width`` rows) in a batch of ``batch`` rows."""
    slots = tuple(segments)
    consecutive = slots == tuple(range(slots[0], slots[0] + len(slots)))
    select = slice(slots[0], slots[0] + len(slots)) if consecutive else torch.tensor(slots, device=device)
    order = [row for rows in segments.values() for row in rows]
    rows = None if order == list(range(batch)) else torch.tensor(order, device=device)
    return RowGroup(slots, select, width, rows)

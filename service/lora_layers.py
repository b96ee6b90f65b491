"""Batched multi-adapter LoRA: each row of a batch gets its own adapter's delta, in a few batched products.

Every LoRA-able module of the base is wrapped once in a ``BatchedLoraLayer``. Its bank holds, for each
device slot, A [R, in] and B [out, R] (peft's layout, scale folded into B, ranks zero-padded to R); the
last slot is all zeros and stands for "no adapter". A ``RowAdapters`` object, built once per step and
shared by every layer, says which slot each row uses and the largest rank in play.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass
class RowAdapters:
    """The per-step mapping from batch rows to bank slots, shared by all layers."""

    slots: torch.Tensor | None = None  # [batch] long; the zero slot for rows without an adapter
    rank: int = 0  # largest rank among the rows' adapters; 0 means no LoRA this step
    version: int = 0  # bumped whenever slots change, so layers re-gather their per-row weights

    def assign(self, slots: torch.Tensor | None, rank: int) -> None:
        self.slots, self.rank = slots, rank
        self.version += 1


def module_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a 4-bit Linear or a GPT-2 Conv1D."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    return layer.in_features, layer.out_features


def is_lora_target(name: str, layer: nn.Module) -> bool:
    """Linear-like modules of the transformer body (the output head is left alone)."""
    return isinstance(layer, (nn.Linear, Conv1D)) and not name.endswith("lm_head")


def lora_delta_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Plain per-row loop, the definition the fast path is held to. x [B,T,in], a [S,R,in], b [S,out,R]."""
    return torch.stack([x[row] @ a[slot].t() @ b[slot].t() for row, slot in enumerate(slots.tolist())])


class BatchedLoraLayer(nn.Module):
    """A frozen base layer plus a bank of LoRA slots selected per row."""

    def __init__(self, base: nn.Module, rows: RowAdapters, num_slots: int):
        super().__init__()
        self.base = base
        self.rows = rows
        self.num_slots = num_slots  # adapter slots; index num_slots is the zero slot
        self.in_features, self.out_features = module_shape(base)
        self.a: torch.Tensor | None = None  # [slots + 1, R, in]
        self.b: torch.Tensor | None = None  # [slots + 1, out, R]
        self._selected: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (version, A^T [B,in,r], B^T [B,r,out])

    @property
    def capacity(self) -> int:
        return 0 if self.a is None else self.a.shape[1]

    def _grow(self, rank: int, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate the bank, or widen it to ``rank``, keeping what it holds."""
        a = torch.zeros(self.num_slots + 1, rank, self.in_features, device=device, dtype=dtype)
        b = torch.zeros(self.num_slots + 1, self.out_features, rank, device=device, dtype=dtype)
        if self.a is not None:
            a[:, : self.capacity] = self.a
            b[..., : self.capacity] = self.b
        self.a, self.b = a, b

    def _per_row(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's A^T [B, in, r] and B^T [B, r, out], gathered once per batch, not once per step, and laid
        out for ``bmm`` so that a step costs two products and nothing else."""
        if self._selected is None or self._selected[0] != self.rows.version:
            slots = self.rows.slots
            a_t = self.a[slots, :rank].transpose(1, 2).contiguous()
            b_t = self.b[slots, :, :rank].transpose(1, 2).contiguous()
            self._selected = (self.rows.version, a_t, b_t)
        return self._selected[1], self._selected[2]

    def write_slot(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None, device, dtype) -> None:
        """Put one adapter's (A [r, in], B [out, r]) into ``slot``, or clear it when ``pair`` is None."""
        if pair is None:
            if self.a is not None:
                self.a[slot].zero_()
                self.b[slot].zero_()
            return
        lora_a, lora_b = pair
        rank = lora_a.shape[0]
        if rank > self.capacity:
            self._grow(rank, device, dtype)
        self.a[slot, :rank].copy_(lora_a)
        self.b[slot, :, :rank].copy_(lora_b)
        if rank < self.capacity:
            self.a[slot, rank:].zero_()
            self.b[slot, :, rank:].zero_()

    def release(self) -> None:
        """Free the bank (no adapter uses this module any more)."""
        self.a = self.b = self._selected = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rank = min(self.rows.rank, self.capacity)
        if rank == 0:
            return out
        a_t, b_t = self._per_row(rank)  # [B, in, r], [B, r, out]
        if x.dim() != 3 or x.dtype != a_t.dtype or out.dtype != b_t.dtype:  # the fast path is 3-D, one dtype
            batch = x.shape[0]
            hidden = torch.bmm(x.reshape(batch, -1, self.in_features).to(a_t.dtype), a_t)
            return torch.baddbmm(out.reshape(batch, -1, self.out_features).to(b_t.dtype), hidden, b_t).to(
                out.dtype).reshape(out.shape)
        return torch.baddbmm(out, torch.bmm(x, a_t), b_t)  # [B, T, out] += (x A^T) B^T, per row


def wrap_lora_targets(model: nn.Module, rows: RowAdapters, num_slots: int) -> dict[str, BatchedLoraLayer]:
    """Replace every LoRA-able module of ``model`` by a batched LoRA layer; returns them by module name."""
    targets = [(name, module) for name, module in model.named_modules() if is_lora_target(name, module)]
    wrapped = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        layer = BatchedLoraLayer(module, rows, num_slots)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        wrapped[name] = layer
    return wrapped

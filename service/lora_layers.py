"""Batched multi-adapter LoRA: each row of a batch gets its own adapter's delta, in a few batched products.

Every LoRA-able module of the base is wrapped once in a ``BatchedLoraLayer``. Its bank holds, for each
device slot, A [R, in] and B^T [R, out] (scale folded into B, ranks zero-padded to R); the last slot is
all zeros and stands for "no adapter". A ``RowAdapters`` object, shared by every layer,
says which slot each row uses and the largest rank in play.

Two ways to apply the deltas, chosen by what the hardware is short of:
- gathered (prompts, and every step on the CPU): each row's own A and B^T are gathered once per
  batch and applied with two batched products; the least arithmetic, but one weight copy per row.
  x A^T is computed as (A x^T)^T: with r rows of A against T prompt columns, the batched product is
  1.5-3x faster on the CPU than x against r columns of A^T (docs/results/gathered_layout/).
- dense (one-token decoding steps when ``RowAdapters.dense_decode``, i.e. on the GPU): every slot's A
  and B are applied to every row and a one-hot row-to-slot mask keeps each row's own share. It reads
  each slot's weights once, however many rows use them, does slots-times more arithmetic (idle on a
  GPU at this size), and its tensors never change shape or address, so the step can be a CUDA graph.
  Modules that read the same input (a Llama block's q/k/v, its gate/up) form an ``InputGroup`` whose
  A banks are one tensor: one product and one mask serve them all, so the kernels a dense step adds
  per block drop from three per module to two per group plus one per module.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from service.kv_cache import row_bucket


@dataclass
class RowAdapters:
    """The per-step mapping from batch rows to bank slots, shared by all layers."""

    num_slots: int  # device slots per bank; slot ``num_slots`` is the zero slot
    dtype: torch.dtype = torch.float32  # of the banks
    slots: torch.Tensor | None = None  # [batch] long; the zero slot for rows without an adapter
    rank: int = 0  # largest rank among the rows' adapters; 0 means no LoRA this step
    version: int = 0  # names the mapping in use; layers keep their per-row weights by it
    recent: dict = field(default_factory=dict)  # version -> (slots, rank): the last mappings, banks unchanged since
    issued: int = 0  # versions handed out so far (a version is never reused for another mapping)
    dense_decode: bool = False  # one-token steps use the dense form (see the module docstring)
    one_hot: torch.Tensor | None = None  # [rows >= batch, num_slots + 1]; rows past the batch are zero
    min_rows: int = 1  # rows of ``one_hot`` at the least (the largest batch), so joins do not reallocate it
    storage: int = 0  # bumped whenever a bank or ``one_hot`` is reallocated (captured graphs go stale)

    def assign(self, slots: torch.Tensor | None, rank: int) -> None:
        """Point the rows at ``slots``. A mapping among the last three keeps its version (between two decoding
        steps the engine maps running and joining rows to make their adapters resident, then the joiners to run
        their prompts, then the running rows again): nothing is gathered again."""
        self.slots, self.rank = slots, rank
        again = [version for version, mapping in self.recent.items() if same_mapping(mapping, (slots, rank))]
        if again:
            self.version = again[0]
        else:
            self.issued += 1
            self.version = self.issued
        older = [(version, mapping) for version, mapping in self.recent.items() if version != self.version]
        self.recent = {**dict(older[-2:]), self.version: (slots, rank)}  # running + joining rows, joiners, running
        if self.dense_decode and slots is not None:
            self._fill_one_hot(slots)

    def slot_written(self, slot: int | None) -> None:
        """Slot ``slot`` was filled or cleared (None: a bank was reallocated): mappings that read it, and only
        those, gather their per-row weights again."""
        def unaffected(mapping) -> bool:
            slots = mapping[0]
            return slot is not None and (slots is None or not bool((slots == slot).any()))
        self.recent = {version: mapping for version, mapping in self.recent.items() if unaffected(mapping)}
        self.assign(self.slots, self.rank)

    def _fill_one_hot(self, slots: torch.Tensor) -> None:
        """Write the row-to-slot mask in place; it grows (a new address) to a power of two of rows, the
        decoding step's row buckets, only when a batch outgrows it."""
        if self.one_hot is None or len(slots) > self.one_hot.shape[0]:
            rows = max(row_bucket(len(slots)), self.min_rows)
            self.one_hot = torch.zeros(rows, self.num_slots + 1, device=slots.device, dtype=self.dtype)
            self.storage += 1
        self.one_hot.zero_()
        self.one_hot[: len(slots)].scatter_(1, slots[:, None], 1.0)


def same_mapping(one: tuple[torch.Tensor | None, int], other: tuple[torch.Tensor | None, int]) -> bool:
    """Whether two (slots, rank) mappings send every row to the same slot."""
    (slots, rank), (other_slots, other_rank) = one, other
    if slots is None or other_slots is None:
        return slots is other_slots and rank == other_rank
    return rank == other_rank and slots.shape == other_slots.shape and torch.equal(slots, other_slots)


def module_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a 4-bit Linear or a GPT-2 Conv1D."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    return layer.in_features, layer.out_features


def is_lora_target(name: str, layer: nn.Module) -> bool:
    """Linear-like modules of the transformer body (the output head is left alone)."""
    return isinstance(layer, (nn.Linear, Conv1D)) and not name.endswith("lm_head")


def lora_delta_reference(x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Plain per-row loop, the definition the fast paths are held to. x [B,T,in], a [S,R,in], b_t [S,R,out]."""
    return torch.stack([x[row] @ a[slot].t() @ b_t[slot] for row, slot in enumerate(slots.tolist())])


def widened(bank: torch.Tensor | None, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zero bank of ``shape`` (ranks at dim -2) holding what ``bank`` held, if anything, in its first ranks."""
    wide = torch.zeros(shape, device=device, dtype=dtype)
    if bank is not None:
        wide[..., : bank.shape[-2], :] = bank
    return wide


class InputGroup:
    """LoRA layers that read the same input tensor. Their A banks are one tensor [members, slots + 1, R, in]
    (each member's ``a`` is a view of it), so the dense form computes every member's masked x A^T in one
    product, once per input, and hands each member its share. A layer alone is a group of one."""

    def __init__(self, layers: list[BatchedLoraLayer]):
        self.layers = layers
        self.a: torch.Tensor | None = None
        self._input: torch.Tensor | None = None  # the input whose products are held, until every member took its own
        self._hidden: torch.Tensor | None = None  # [B, members, (slots + 1) * R]
        self._unclaimed = 0
        for member, layer in enumerate(layers):
            layer.group, layer.member = self, member

    def reserve(self, rank: int, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate every member's banks, or widen them to ``rank``, keeping what they hold."""
        first = self.layers[0]
        if rank <= first.capacity:
            return
        slots = first.num_slots + 1
        self.a = widened(self.a, (len(self.layers), slots, rank, first.in_features), device, dtype)
        for layer in self.layers:
            layer.a = self.a[layer.member]
            layer.b_t = widened(layer.b_t, (slots, rank, layer.out_features), device, dtype)
        first.rows.storage += 1

    def release(self) -> None:
        self.a = self._input = self._hidden = None
        for layer in self.layers:
            layer.a = layer.b_t = None
            layer._selected = {}
        self.layers[0].rows.storage += 1

    def hidden(self, layer: BatchedLoraLayer, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s x A^T over every slot, masked to each row's own slot: [B, (slots + 1) * R]."""
        if x is not self._input:
            batch, members, slots, rank = x.shape[0], *self.a.shape[:3]
            hidden = torch.mm(x.view(batch, -1), self.a.view(members * slots * rank, -1).t())
            hidden.view(batch, members, slots, rank).mul_(layer.rows.one_hot[:batch, None, :, None])
            self._input, self._hidden, self._unclaimed = x, hidden.view(batch, members, slots * rank), members
        share = self._hidden[:, layer.member]
        self._unclaimed -= 1
        if not self._unclaimed:  # do not keep the step's tensors alive past it
            self._input = self._hidden = None
        return share


class BatchedLoraLayer(nn.Module):
    """A frozen base layer plus a bank of LoRA slots selected per row."""

    def __init__(self, base: nn.Module, rows: RowAdapters):
        super().__init__()
        self.base = base
        self.rows = rows
        self.num_slots = rows.num_slots  # adapter slots; index num_slots is the zero slot
        self.in_features, self.out_features = module_shape(base)
        self.a: torch.Tensor | None = None  # [slots + 1, R, in], a view of the group's bank
        self.b_t: torch.Tensor | None = None  # [slots + 1, R, out]
        # mapping version -> each row's (A [B, r, in], B^T [B, r, out])
        self._selected: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.group, self.member = None, 0  # set by the group
        InputGroup([self])

    @property
    def capacity(self) -> int:
        return 0 if self.a is None else self.a.shape[1]

    def reserve(self, rank: int, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate the bank, or widen it to ``rank``, keeping what it holds (with the rest of its group)."""
        self.group.reserve(rank, device, dtype)

    def slot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank's (A [R, in], B^T [R, out]) of one slot, contiguous views to write an adapter into."""
        return self.a[slot], self.b_t[slot]

    def _per_row(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's A [B, r, in] and B^T [B, r, out], gathered once per mapping, not once per step, so that a
        step costs two products and nothing else."""
        version = self.rows.version
        if version not in self._selected:
            slots = self.rows.slots
            self._selected = {kept: pair for kept, pair in self._selected.items() if kept in self.rows.recent}
            self._selected[version] = (self.a[:, :rank][slots], self.b_t[:, :rank][slots])
        return self._selected[version]

    def release(self) -> None:
        """Free the bank, with the rest of its group's (no adapter uses them any more)."""
        self.group.release()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rank = min(self.rows.rank, self.capacity)
        if rank == 0:
            return out
        if self.rows.dense_decode and x.dim() == 3 and x.shape[1] == 1 and x.dtype == self.a.dtype == out.dtype:
            return self._dense(x, out)
        a, b_t = self._per_row(rank)  # [B, r, in], [B, r, out]
        if x.dim() != 3 or x.dtype != a.dtype or out.dtype != b_t.dtype:  # the fast path is 3-D, one dtype
            batch = x.shape[0]
            hidden = torch.bmm(a, x.reshape(batch, -1, self.in_features).to(a.dtype).transpose(1, 2)).transpose(1, 2)
            return torch.baddbmm(out.reshape(batch, -1, self.out_features).to(b_t.dtype), hidden, b_t).to(
                out.dtype).reshape(out.shape)
        return torch.baddbmm(out, torch.bmm(a, x.transpose(1, 2)).transpose(1, 2), b_t)  # [B, T, out] += (x A^T) B^T

    def _dense(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """One-token rows [B, 1, in]: every slot's x A^T, masked to the row's own slot, times all slots' B."""
        hidden = self.group.hidden(self, x)  # [B, (slots + 1) * R]
        return out.view(x.shape[0], -1).addmm_(hidden, self.b_t.view(hidden.shape[1], -1)).view(out.shape)


def wrap_lora_targets(model: nn.Module, rows: RowAdapters) -> dict[str, BatchedLoraLayer]:
    """Replace every LoRA-able module of ``model`` by a batched LoRA layer; returns them by module name."""
    targets = [(name, module) for name, module in model.named_modules() if is_lora_target(name, module)]
    wrapped = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        layer = BatchedLoraLayer(module, rows)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        wrapped[name] = layer
    for names in shared_inputs(model, wrapped):
        InputGroup([wrapped[name] for name in names])
    return wrapped


@torch.no_grad()
def shared_inputs(model: nn.Module, layers: dict[str, nn.Module]) -> list[list[str]]:
    """Names of the ``layers`` that read one input tensor (q/k/v, gate/up), found by one one-token forward."""
    readers: list[tuple[torch.Tensor, list[str]]] = []  # the tensors are held, so no two share an id

    def note(name: str, x: torch.Tensor) -> None:
        same = next((names for seen, names in readers if seen is x), None)
        if same is None:
            readers.append((x, [name]))
        else:
            same.append(name)

    hooks = [layer.register_forward_pre_hook(lambda _, args, name=name: note(name, args[0]))
             for name, layer in layers.items()]
    try:
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return [names for _, names in readers if len(names) > 1]

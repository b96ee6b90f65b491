"""Batched multi-adapter LoRA: each row of a batch gets its own adapter's delta, in a few batched products.

Every LoRA-able module of the base is wrapped once in a ``BatchedLoraLayer``. Its bank holds, for each
device slot, A [R, in] and B^T [R, out] (scale folded into B, ranks zero-padded to R); the last slot is
all zeros and stands for "no adapter". A ``RowAdapters`` object, shared by every layer,
says which slot each row uses and the largest rank in play.

Two ways to apply the deltas, chosen by what the hardware is short of:
- grouped (prompts, and every step on the CPU): once per mapping, the rows that use an adapter are cut into
  segments, the rows of one slot each; segments of one width form a ``RowGroup``, applied with two batched
  products against one A and B^T per segment. Those are views of the bank where the group's slots are
  consecutive (always for one adapter), else one copy per slot: what a step gathers grows with the distinct
  adapters in the batch, never with its rows (the layers keep those of the last two mappings). A batch whose rows
  already come in segments (one adapter, or a different one per row) is used in place; otherwise the segments go
  in slot order (so that consecutive slots are views), the rows are copied into segment order and their outputs
  copied back, unless they are prompts of at least r tokens: those copy each row's weights instead (fewer bytes),
  for one module at a time.
  x A^T is computed as (A x^T)^T: with r rows of A against T prompt columns, the batched product is
  1.5-3x faster on the CPU than x against r columns of A^T (commit c67e485; script and log in git at
  13dc456:docs/results/gathered_layout/).
- dense (one-token decoding steps when ``RowAdapters.dense_decode``, i.e. on the GPU): every slot's A
  and B are applied to every row and a one-hot row-to-slot mask keeps each row's own share. It reads
  each slot's weights once, however many rows use them, does slots-times more arithmetic (idle on a
  GPU at this size), and its tensors never change shape or address, so the step can be a CUDA graph.
  Modules that read the same input (a Llama block's q/k/v, its gate/up) form an ``InputGroup`` whose
  A banks are one tensor: one product and one mask serve them all, so the kernels a dense step adds
  per block drop from three per module to two per group plus one per module.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from service.engine.kv_cache import row_bucket


@dataclass
class RowAdapters:
    """The per-step mapping from batch rows to bank slots, shared by all layers."""

    num_slots: int  # device slots per bank; slot ``num_slots`` is the zero slot
    dtype: torch.dtype = torch.float32  # of the banks
    slots: torch.Tensor | None = None  # [batch] long; the zero slot for rows without an adapter
    rank: int = 0  # largest rank among the rows' adapters; 0 means no LoRA this step
    dense_decode: bool = False  # one-token steps use the dense form (see the module docstring)
    one_hot: torch.Tensor | None = None  # [rows >= batch, num_slots + 1]; rows past the batch are zero
    min_rows: int = 1  # rows of ``one_hot`` at the least (the largest batch), so joins do not reallocate it
    storage: int = 0  # bumped whenever a bank or ``one_hot`` is reallocated (captured graphs go stale)
    writes: dict[int, int] = field(default_factory=dict)  # slot -> times it was filled or cleared
    _groups: tuple[RowGroup, ...] | None = field(default=None, init=False, repr=False)  # see ``groups``
    _reads: tuple | None = field(default=None, init=False, repr=False)  # see ``reads``

    def assign(self, slots: torch.Tensor | None, rank: int) -> None:
        """Point the rows at ``slots`` (their groups are made when a layer first needs them)."""
        self.slots, self.rank = slots, rank
        self._groups = self._reads = None
        if self.dense_decode and slots is not None:
            self._fill_one_hot(slots)

    @property
    def groups(self) -> tuple[RowGroup, ...]:
        """The rows that use an adapter, by slot and segment width (see ``row_groups``), made once per mapping."""
        if self._groups is None:
            self._groups = row_groups(self.slots, self.num_slots)
        return self._groups

    @property
    def reads(self) -> tuple:
        """What the groups' weights are made of: each group's slots and how often each was written. Weights a
        layer gathered for equal ``reads`` (and bank storage) are still good."""
        if self._reads is None:
            self._reads = tuple((group.slots, tuple(self.writes.get(slot, 0) for slot in group.slots))
                                for group in self.groups)
        return self._reads

    def slot_written(self, slot: int | None) -> None:
        """Slot ``slot`` was filled or cleared (None: a bank was reallocated, which ``storage`` says): weights
        gathered from it are gathered again, and only those."""
        if slot is not None:
            self.writes[slot] = self.writes.get(slot, 0) + 1
            self._reads = None

    def _fill_one_hot(self, slots: torch.Tensor) -> None:
        """Write the row-to-slot mask in place; it grows (a new address) to a power of two of rows, the
        decoding step's row buckets, only when a batch outgrows it."""
        if self.one_hot is None or len(slots) > self.one_hot.shape[0]:
            rows = max(row_bucket(len(slots)), self.min_rows)
            self.one_hot = torch.zeros(rows, self.num_slots + 1, device=slots.device, dtype=self.dtype)
            self.storage += 1
        self.one_hot.zero_()
        self.one_hot[: len(slots)].scatter_(1, slots[:, None], 1.0)


@dataclass(frozen=True)
class RowGroup:
    """Segments of ``width`` rows, each segment the rows of one slot: one pair of batched products applies them."""

    slots: tuple[int, ...]  # each segment's slot [U]
    select: slice | torch.Tensor  # picks those slots from a bank: a slice where they are consecutive
    width: int  # rows per segment
    rows: torch.Tensor | None  # [U * width] batch rows, segment after segment; None: the whole batch, in order


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
            layer._kept.clear()
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
        self._kept: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()  # see _group_weights
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

    def _group_weights(self, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each row group's A [U, r, in] and B^T [U, r, out]: views of the bank, or one copy of each slot's. Those
        of the last two mappings are kept (between two decoding steps the engine runs a chunk of the joiners'
        prompts, then a step of the running rows) while the slots they read stay unwritten."""
        key = (self.rows.reads, rank, self.rows.storage)
        if key not in self._kept:
            self._kept[key] = [(self.a[:, :rank][group.select], self.b_t[:, :rank][group.select])
                               for group in self.rows.groups]
            while len(self._kept) > 2:
                self._kept.popitem(last=False)
        self._kept.move_to_end(key)
        return self._kept[key]

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
        if x.dim() == 3 and x.dtype == out.dtype == self.a.dtype:
            return self._grouped(x, out, rank)
        batch, dtype = x.shape[0], self.a.dtype  # the grouped form is 3-D, one dtype
        wide = self._grouped(x.reshape(batch, -1, self.in_features).to(dtype),
                             out.reshape(batch, -1, self.out_features).to(dtype), rank)
        return wide.to(out.dtype).reshape(out.shape)

    def _grouped(self, x: torch.Tensor, out: torch.Tensor, rank: int) -> torch.Tensor:
        """out [B, T, out] += x A^T B^T for each row's own adapter, in place, group by group; x [B, T, in]."""
        if x.shape[1] >= rank and not in_place(self.rows.groups):
            return self._per_row(x, out, rank)
        for group, (a, b_t) in zip(self.rows.groups, self._group_weights(rank)):  # a [U, r, in], b_t [U, r, out]
            span = group.width * x.shape[1]  # a segment's rows times tokens
            if group.rows is None:  # the batch is in segment order: x and out are the segments' views
                rows_x, rows_out = x, out
            else:  # copied into segment order, out's rows copied back (index_add_ took up to 25x as long off the main thread)
                rows_x, rows_out = x.index_select(0, group.rows), out.index_select(0, group.rows)
            hidden = torch.bmm(a, rows_x.reshape(len(a), span, -1).transpose(1, 2)).transpose(1, 2)  # [U, span, r]
            rows_out.view(len(a), span, -1).baddbmm_(hidden, b_t)
            if group.rows is not None:
                out.index_copy_(0, group.rows, rows_out)
        return out

    def _per_row(self, x: torch.Tensor, out: torch.Tensor, rank: int) -> torch.Tensor:
        """The same for prompts of at least ``rank`` tokens whose rows are not in segment order: each row's own A
        [B, r, in] and B^T [B, r, out], gathered for this module alone and dropped at once, copy fewer bytes than
        the rows' activations would, into segment order and back."""
        slots = self.rows.slots
        hidden = torch.bmm(self.a[:, :rank][slots], x.transpose(1, 2)).transpose(1, 2)  # [B, T, r]
        return out.baddbmm_(hidden, self.b_t[:, :rank][slots])

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

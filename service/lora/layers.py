"""Batched multi-adapter LoRA: each row of a batch gets its own adapter's delta, in a few batched products.

Every LoRA-able module of the base is wrapped once in a ``BatchedLoraLayer``. Its bank holds, for each
device slot, A [R, in] and B^T [R, out] (scale folded into B, ranks zero-padded to R); the last slot is
all zeros and stands for "no adapter". Banks hold the slots in use, not all of them: they grow to a power of two of
slots (and to the largest rank) as adapters are filled in, so one resident rank-64 adapter costs two slots' memory
however many slots the registry has (``Banks.slots``). The ``SlotMapping`` (service.lora.slot_mapping), shared by
every layer and written by the engine only, says which slot each row uses and the largest rank in play.
``LoraLayers``, all of a model's layers together, owns what is written into them: adapters filled into and cleared
from slots (their ``Banks`` state), and merges into the base weights and their undoing.

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
- dense (one-token decoding steps when ``SlotMapping.dense_decode``, i.e. on the GPU): every slot's A
  and B are applied to every row and a one-hot row-to-slot mask keeps each row's own share. It reads
  each slot's weights once, however many rows use them, does slots-times more arithmetic (idle on a
  GPU at this size), and its tensors never change shape or address, so the step can be a CUDA graph.
  Modules that read the same input (a Llama block's q/k/v, its gate/up) form an ``InputGroup`` whose
  A banks are one tensor: one product and one mask serve them all, so the kernels a dense step adds
  per block drop from three per module to two per group plus one per module.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from service.engine.kv_cache import row_bucket
from service.lora.adapter_files import AdapterWeights
from service.lora.slot_mapping import SlotMapping, in_place
from service.model.file_pages import mapped_copy, mapped_zeros, private_file_maps, release
from service.model.fused_linears import fuse


class Banks:
    """What the layers' banks hold, as the layers' caches need to know it: ``storage`` counts reallocations (views
    and captured CUDA graphs of older banks are stale), ``writes`` how often each slot was filled or cleared.
    Written by ``LoraLayers`` only."""

    def __init__(self):
        self.storage = 0
        self.slots = 0  # adapter slots in every bank (a power of two, at most the mapping's num_slots), zero slot apart
        self.writes: dict[int, int] = {}  # slot -> times it was filled or cleared
        self.version = 0  # counts writes into any slot
        self._reads: tuple[tuple[int, int], tuple] = ((-1, -1), ())  # ((mapping, write) versions, reads) of the last

    def reads(self, mapping: SlotMapping) -> tuple:
        """What ``mapping``'s row groups read: each group's slots and how often each was written. Weights a layer
        gathered for equal reads (and storage) are still good. Made once per mapping and write."""
        key = (mapping.version, self.version)
        if self._reads[0] != key:
            self._reads = (key, tuple((group.slots, tuple(self.writes.get(slot, 0) for slot in group.slots))
                                      for group in mapping.groups))
        return self._reads[1]

    def written(self, slot: int) -> None:
        """Slot ``slot`` was filled or cleared: weights gathered from it are gathered again, and only those."""
        self.writes[slot] = self.writes.get(slot, 0) + 1
        self.version += 1


def module_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a 4-bit Linear or a GPT-2 Conv1D."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    return layer.in_features, layer.out_features


def lora_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The modules the engine applies LoRA to, by name: every Linear, 4-bit Linear or GPT-2 Conv1D of the transformer
    body, not the output head (``get_output_embeddings``: a Llama's or GPT-2's lm_head, SmolLM2's tied to
    embed_tokens). The one rule of what an adapter may target: the registry, ``train`` and ``merge`` read it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and module is not head}


def lora_delta_reference(x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Plain per-row loop, the definition the fast paths are held to. x [B,T,in], a [S,R,in], b_t [S,R,out]."""
    return torch.stack([x[row] @ a[slot].t() @ b_t[slot] for row, slot in enumerate(slots.tolist())])


def widened(bank: torch.Tensor | None, shape: tuple[int, ...], slot_axis: int, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    """A zero bank of ``shape`` holding what ``bank`` held in its adapter slots, if anything, in its first slots and
    ranks (not its zero slot, the last along ``slot_axis``: the new bank's unused and zero slots are zeros already).
    On the CPU it lives in a map of its own (``file_pages.mapped_zeros``): slots never written (the zero slot, those
    not filled yet) take no memory, and a bank replaced by a wider one leaves memory."""
    wide = mapped_zeros(shape, dtype) if device.type == "cpu" else torch.zeros(shape, device=device, dtype=dtype)
    if bank is not None:
        held = bank.narrow(slot_axis, 0, bank.shape[slot_axis] - 1)
        wide[tuple(slice(0, size) for size in held.shape)] = held
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

    def reserve(self, rank: int, slots: int, device: torch.device, dtype: torch.dtype) -> bool:
        """Allocate every member's banks, or widen them to ``rank`` and ``slots`` adapter slots (plus the zero slot),
        keeping what they hold; whether it did."""
        first = self.layers[0]
        rank = max(rank, first.capacity)
        slots += 1
        if rank == first.capacity and (self.a is None or slots == self.a.shape[1]):
            return False
        self.a = widened(self.a, (len(self.layers), slots, rank, first.in_features), 1, device, dtype)
        for layer in self.layers:
            b_t = widened(layer.b_t, (slots, rank, layer.out_features), 0, device, dtype)
            layer.use_bank(self.a[layer.member], b_t)
        return True

    def release(self) -> None:
        """Free every member's banks."""
        self.a = self._input = self._hidden = None
        for layer in self.layers:
            layer.use_bank(None, None)

    def hidden(self, layer: BatchedLoraLayer, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s x A^T over every slot, masked to each row's own slot: [B, (slots + 1) * R]."""
        if x is not self._input:
            batch, members, slots, rank = x.shape[0], *self.a.shape[:3]
            hidden = torch.mm(x.view(batch, -1), self.a.view(members * slots * rank, -1).t())
            # the mask's columns past the bank's are slots not in it; a bare row's one is its last column
            hidden.view(batch, members, slots, rank).mul_(layer.mapping.one_hot[:batch, None, :slots, None])
            self._input, self._hidden, self._unclaimed = x, hidden.view(batch, members, slots * rank), members
        share = self._hidden[:, layer.member]
        self._unclaimed -= 1
        if not self._unclaimed:  # do not keep the step's tensors alive past it
            self._input = self._hidden = None
        return share


class BatchedLoraLayer(nn.Module):
    """A frozen base layer plus a bank of LoRA slots selected per row (``mapping``); ``banks`` says what was
    written into them."""

    def __init__(self, base: nn.Module, mapping: SlotMapping, banks: Banks):
        super().__init__()
        self.base = base
        self.mapping, self.banks = mapping, banks
        self.in_features, self.out_features = module_shape(base)
        self.a: torch.Tensor | None = None  # [Banks.slots + 1, R, in], a view of the group's bank
        self.b_t: torch.Tensor | None = None  # [Banks.slots + 1, R, out]
        self._kept: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()  # see _group_weights
        self.group, self.member = None, 0  # set by the group
        InputGroup([self])

    @property
    def capacity(self) -> int:
        return 0 if self.a is None else self.a.shape[1]

    def use_bank(self, a: torch.Tensor | None, b_t: torch.Tensor | None) -> None:
        """Hold these banks (A [slots + 1, R, in], B^T [slots + 1, R, out]; None: no bank), forgetting what was
        gathered from the old ones."""
        self.a, self.b_t = a, b_t
        self._kept.clear()

    def slot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank's (A [R, in], B^T [R, out]) of one slot, contiguous views to write an adapter into."""
        return self.a[slot], self.b_t[slot]

    def _group_weights(self, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each row group's A [U, r, in] and B^T [U, r, out]: views of the bank, or one copy of each slot's. Those
        of the last two mappings are kept (between two decoding steps the engine runs a chunk of the joiners'
        prompts, then a step of the running rows) while the slots they read stay unwritten."""
        key = (self.banks.reads(self.mapping), rank, self.banks.storage)
        if key not in self._kept:
            self._kept[key] = [(self.a[:, :rank][group.select], self.b_t[:, :rank][group.select])
                               for group in self.mapping.groups]
            while len(self._kept) > 2:
                self._kept.popitem(last=False)
        self._kept.move_to_end(key)
        return self._kept[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rank = min(self.mapping.rank, self.capacity)
        if rank == 0:
            return out
        if self.mapping.dense_decode and x.dim() == 3 and x.shape[1] == 1 and x.dtype == self.a.dtype == out.dtype:
            return self._dense(x, out)
        if x.dim() == 3 and x.dtype == out.dtype == self.a.dtype:
            return self._grouped(x, out, rank)
        batch, dtype = x.shape[0], self.a.dtype  # the grouped form is 3-D, one dtype
        wide = self._grouped(x.reshape(batch, -1, self.in_features).to(dtype),
                             out.reshape(batch, -1, self.out_features).to(dtype), rank)
        return wide.to(out.dtype).reshape(out.shape)

    def _grouped(self, x: torch.Tensor, out: torch.Tensor, rank: int) -> torch.Tensor:
        """out [B, T, out] += x A^T B^T for each row's own adapter, in place, group by group; x [B, T, in]."""
        if x.shape[1] >= rank and not in_place(self.mapping.groups):
            return self._per_row(x, out, rank)
        for group, (a, b_t) in zip(self.mapping.groups, self._group_weights(rank)):  # a [U, r, in], b_t [U, r, out]
            span = group.width * x.shape[1]  # a segment's rows times tokens
            if group.rows is None:  # the batch is in segment order: x and out are the segments' views
                rows_x, rows_out = x, out
            else:  # copied into segment order, out's rows copied back
                # (index_add_ took up to 25x as long off the main thread)
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
        slots = self.mapping.slots.clamp(max=len(self.a) - 1)  # bare rows: the bank's zero slot
        hidden = torch.bmm(self.a[:, :rank][slots], x.transpose(1, 2)).transpose(1, 2)  # [B, T, r]
        return out.baddbmm_(hidden, self.b_t[:, :rank][slots])

    def _dense(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """One-token rows [B, 1, in]: every slot's x A^T, masked to the row's own slot, times all slots' B."""
        hidden = self.group.hidden(self, x)  # [B, (slots + 1) * R]
        return out.view(x.shape[0], -1).addmm_(hidden, self.b_t.view(hidden.shape[1], -1)).view(out.shape)


def wrap_lora_targets(model: nn.Module, mapping: SlotMapping, banks: Banks) -> dict[str, BatchedLoraLayer]:
    """Replace every LoRA-able module of ``model`` by a batched LoRA layer; returns them by module name. The base
    layers that read one input are grouped for their LoRA products (``InputGroup``) and, on the CPU through oneDNN,
    fused for their own (``fused_linears.fuse``)."""
    wrapped = {}
    for name, module in lora_targets(model).items():
        parent_name, _, child = name.rpartition(".")
        layer = BatchedLoraLayer(module, mapping, banks)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        wrapped[name] = layer
    for names in shared_inputs(model, wrapped):
        InputGroup([wrapped[name] for name in names])
        fuse([wrapped[name].base for name in names])
    return wrapped


class LoraLayers:
    """Every LoRA-able module of a model, wrapped (``modules``, by name): the one writer of their slots (``fill``,
    ``clear``, ``release``) and of their base weights (``merge``, ``unmerge``). ``mapping`` is read by the layers
    and written by the engine."""

    def __init__(self, model: nn.Module, num_slots: int):
        first = next(model.parameters())
        self.device = first.device
        self.dtype = first.dtype if first.is_floating_point() else torch.float32  # of the banks
        self.mapping = SlotMapping(num_slots, self.dtype, dense_decode=self.device.type == "cuda")
        self.banks = Banks()
        # every module's name as peft sees the base (before wrapping adds '.base' children), but the root's, which peft
        # never targets: what an adapter config selects among (adapter_files.check_targets)
        self.base_modules = tuple(name for name, _ in model.named_modules() if name)
        self.modules = wrap_lora_targets(model, self.mapping, self.banks)
        self.shapes = {name: (layer.in_features, layer.out_features) for name, layer in self.modules.items()}
        self.quantized = any(not layer.base.weight.is_floating_point() for layer in self.modules.values())  # 4-bit
        self._originals: dict[str, torch.Tensor] = {}  # module -> its base weight as loaded (see merge)
        self._slot_lists: dict[tuple, list[torch.Tensor]] = {}  # see _flat_views
        self._slot_lists_storage = -1  # the banks' storage those views were made of

    @property
    def widest_rank(self) -> int:
        """The rank the widest bank holds now (0: none allocated)."""
        return max(layer.capacity for layer in self.modules.values())

    def fill(self, slot: int, adapter: AdapterWeights) -> None:
        """Write ``adapter`` into ``slot`` of its modules' banks (allocated or widened to its rank as needed) in one
        transfer and a few batched copies, clearing what an earlier adapter left in the slot."""
        on_device = adapter.packed.to(self.device, self.dtype, non_blocking=True)  # one transfer
        self._reserve(slot, adapter)
        modules = tuple(adapter.layout)
        stale = self._flat_views(slot, adapter.rank, modules, stale=True)  # what an earlier adapter left there
        if stale:
            torch._foreach_zero_(stale)
        torch._foreach_copy_(self._flat_views(slot, adapter.rank, modules), adapter.segments(on_device))
        self.banks.written(slot)

    def _reserve(self, slot: int, adapter: AdapterWeights) -> None:
        """Grow the banks to hold ``slot`` (every allocated bank, to a power of two of slots) and ``adapter``'s rank
        (those of its modules)."""
        slots = max(self.banks.slots, min(row_bucket(slot + 1), self.mapping.num_slots))
        targeted = {self.modules[module].group for module in adapter.layout}
        groups = {layer.group: None for layer in self.modules.values()}  # each once, in order
        grown = [group.reserve(adapter.rank if group in targeted else 0, slots, self.device, self.dtype)
                 for group in groups if group in targeted or group.a is not None]
        self.banks.slots = slots
        self.banks.storage += any(grown)

    def clear(self, slot: int) -> None:
        """Zero ``slot`` in every bank."""
        torch._foreach_zero_(self._flat_views(slot, 0, (), stale=True))
        self.banks.written(slot)

    def release(self) -> None:
        """Free every bank (no adapter is resident any more)."""
        for layer in self.modules.values():
            layer.group.release()
        self.banks.storage += 1
        self.banks.slots = 0
        self._slot_lists = {}  # their views would keep the freed banks alive

    def _flat_views(self, slot: int, rank: int, modules: tuple[str, ...], stale: bool = False) -> list[torch.Tensor]:
        """Flat views of one slot's A and B^T: where an adapter of ``rank`` on ``modules`` (in its packed order)
        writes, or with ``stale``, the rest of the slot's allocated banks. Kept until a bank is reallocated:
        making a few hundred views costs more than the copies."""
        if self._slot_lists_storage != self.banks.storage:
            self._slot_lists, self._slot_lists_storage = {}, self.banks.storage
        key = (slot, rank, modules, stale)
        if key not in self._slot_lists:
            if stale:
                kept = dict.fromkeys(modules, rank)
                views = [view[kept.get(name, 0):] for name, layer in self.modules.items() if layer.a is not None
                         for view in layer.slot(slot)]
            else:
                views = [view[:rank] for name in modules for view in self.modules[name].slot(slot)]
            self._slot_lists[key] = [view.view(-1) for view in views if view.numel()]  # none: nothing to clear
        return self._slot_lists[key]

    def merge(self, adapter: AdapterWeights) -> None:
        """Add ``adapter``'s products to the base weights of its modules (on a full-precision base); ``unmerge``
        restores them exactly as loaded. On the CPU each module gets a merged copy (in a map of its own, which leaves
        memory when the unmerge frees it: ``file_pages.mapped_copy``) and its weight as loaded is kept:
        pages of the model file, mapped copy-on-write, which leave memory while merged (``file_pages.release``) and
        come back from the file at the unmerge, so a merge costs no memory beyond one module's copy at a time (and
        the copy is aligned, where an unaligned model file leaves the loaded weights unaligned, which made in-place
        products 3x slower). A module whose weight is rows of a fused weight (``fused_linears``) is merged in place,
        its weight as loaded kept as those file pages (or, not loaded from a file, as a copy). On a GPU a copy is
        kept at the first merge and the weight merged in place: it keeps its address, which captured graphs read."""
        maps = private_file_maps() if self.device.type == "cpu" else []  # read once: the model file's maps stay
        for module, (lora_a, lora_b_t) in adapter.views(adapter.packed.to(self.device, self.dtype)).items():
            base = self.modules[module].base
            if not self._in_place(module):
                original = self._originals.setdefault(module, base.weight.data)
                base.weight.data = mapped_copy(original)
            elif module not in self._originals:  # what is kept stays exact: only unmerge writes it back
                fused = getattr(base, "fused", None)
                kept = None if fused is None else fused.originals.get(base)  # pages of the model file
                self._originals[module] = base.weight.data.clone() if kept is None else kept
            if isinstance(base, Conv1D):
                base.weight.data.addmm_(lora_a.t(), lora_b_t)  # [in, out] += A^T [in, r] @ B^T [r, out]
            else:
                base.weight.data.addmm_(lora_b_t.t(), lora_a)  # [out, in] += B [out, r] @ A [r, in]
            if self.device.type == "cpu":
                release(self._originals[module], maps)

    def unmerge(self, adapter: AdapterWeights) -> None:
        """Restore the base weights that merging ``adapter`` changed exactly as they were loaded."""
        in_place = [module for module in adapter.layout if self._in_place(module)]
        for module in adapter.layout:  # the weights as loaded again, their merged copies freed
            if not self._in_place(module):
                self.modules[module].base.weight.data = self._originals[module]
        if in_place:
            torch._foreach_copy_([self.modules[module].base.weight.data for module in in_place],
                                 [self._originals[module] for module in in_place])
        if self.device.type == "cpu":  # the file pages just read leave memory again
            maps = private_file_maps()
            for module in in_place:
                release(self._originals[module], maps)

    def _in_place(self, module: str) -> bool:
        """Whether merging writes ``module``'s base weight in place: on a GPU, and on the CPU for rows of a fused
        weight; else a merged copy takes its place."""
        return self.device.type != "cpu" or getattr(self.modules[module].base, "fused", None) is not None


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

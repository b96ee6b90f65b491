"""The adapter registry: the one owner of adapter state (registered, resident in a slot, merged)."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from service import metrics
from service.lora.adapter_files import AdapterWeights, check_name, check_path, load_adapter
from service.errors import AdapterConflict, AdapterMerged, NoFreeSlot, UnknownAdapter
from service.lora.layers import BatchedLoraLayer, RowAdapters, wrap_lora_targets


class AdapterRegistry:
    """Registered adapters live on the host; at most ``max_resident`` sit in device slots (LRU).

    Residency is by identity, the ``AdapterWeights`` a name was registered with, not by name: rows admitted for a
    name keep those weights (``lookup`` when admitted, ``activate_weights`` at every step) even if the name is
    unregistered and registered again with other weights meanwhile; the old weights keep their slot while rows use
    them. ``register``/``unregister``/``lookup``/``describe`` may be called from any thread. ``activate``,
    ``activate_weights``, ``merge`` and ``unmerge`` touch device weights and are called by the engine thread between
    steps only.
    """

    def __init__(self, model: nn.Module, roots: list[Path], max_resident: int, max_rank: int):
        first = next(model.parameters())
        self.device = first.device
        self.dtype = first.dtype if first.is_floating_point() else torch.float32
        self.rows = RowAdapters(max_resident, self.dtype, dense_decode=self.device.type == "cuda")
        self.layers: dict[str, BatchedLoraLayer] = wrap_lora_targets(model, self.rows)
        self.shapes = {name: (layer.in_features, layer.out_features) for name, layer in self.layers.items()}
        self.roots = [Path(root) for root in roots]
        self.max_resident = max_resident
        self.max_rank = max_rank
        self.quantized = any(not layer.base.weight.is_floating_point() for layer in self.layers.values())  # 4-bit
        self._adapters: dict[str, AdapterWeights] = {}
        # the weights held in device slots -> their slot, least recently used first
        self._resident: OrderedDict[AdapterWeights, int] = OrderedDict()
        self._merged: AdapterWeights | None = None
        # module -> its base weight as loaded, kept at its first merge (see _keep_original)
        self._originals: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.zero_slot = max_resident
        self.fills = 0  # slots filled with an adapter's weights so far
        self._slot_lists: dict[tuple, list[torch.Tensor]] = {}  # see _flat_views
        self._slot_lists_storage = -1  # the banks' storage those views were made of

    # ---- host side: any thread -------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> tuple[dict, float]:
        """Validate and load an adapter onto the host; the registry is unchanged if anything is wrong. Returns its
        description and the seconds it took. Raises AdapterError (its subclasses: AdapterConflict for a name taken,
        AdapterPathRefused/AdapterPathMissing for the path) for anything the engine cannot serve."""
        check_name(name)
        folder = check_path(path, self.roots)
        with self._lock:
            self._refuse_duplicate(name)  # before the work of loading...
        started = time.perf_counter()
        adapter = load_adapter(name, folder, self.shapes, self.max_rank, self.dtype)
        with self._lock:
            self._refuse_duplicate(name)  # ...and after it, in case another thread registered the name meanwhile
            self._adapters[name] = adapter
        return adapter.describe(), time.perf_counter() - started

    def _refuse_duplicate(self, name: str) -> None:
        if name in self._adapters:
            raise AdapterConflict(f"adapter {name!r} is already loaded; delete it first")

    def unregister(self, name: str) -> None:
        """Forget an adapter; its slot is cleared the next time the engine activates adapters without it. Raises
        UnknownAdapter, or AdapterMerged while it is merged into the base."""
        with self._lock:
            if name not in self._adapters:
                raise UnknownAdapter(f"unknown adapter {name!r}")
            if self._adapters[name] is self._merged:
                raise AdapterMerged(name)
            del self._adapters[name]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def require(self, name: str | None) -> None:
        """Raise 404 unless ``name`` is None (bare base) or a registered adapter."""
        self.lookup(name)

    def lookup(self, name: str | None) -> AdapterWeights | None:
        """The weights registered under ``name`` now (None for the bare base); UnknownAdapter if none are."""
        with self._lock:
            if name is not None and name not in self._adapters:
                raise UnknownAdapter(f"unknown adapter {name!r}")
            return None if name is None else self._adapters[name]

    def describe(self) -> list[dict]:
        with self._lock:
            return [
                {**adapter.describe(), "state": self._state(name)}
                for name, adapter in sorted(self._adapters.items())
            ]

    def _state(self, name: str) -> str:
        adapter = self._adapters[name]
        if adapter is self._merged:
            return "merged"
        return "resident" if adapter in self._resident else "loaded"

    @property
    def merged(self) -> str | None:
        """The name of the adapter merged into the base weights, if any."""
        return None if self._merged is None else self._merged.name

    @property
    def merged_weights(self) -> AdapterWeights | None:
        """The weights merged into the base, if any (rows bound to them run with no LoRA)."""
        return self._merged

    @property
    def resident_count(self) -> int:
        return len(self._resident)

    def is_resident(self, adapter: AdapterWeights) -> bool:
        """Whether ``adapter`` sits in a device slot (or is merged into the base)."""
        return adapter is self._merged or adapter in self._resident

    # ---- device side: engine thread only ----------------------------------------------------
    def activate(self, names: list[str | None]) -> list[int]:
        """``activate_weights`` for the weights registered under each row's name now (None: no adapter).

        Returns the indices of rows whose adapter is not registered (they get no adapter)."""
        adapters, missing = [], []
        for row, name in enumerate(names):
            try:
                adapters.append(self.lookup(name))
            except UnknownAdapter:
                adapters.append(None)
                missing.append(row)
        self.activate_weights(adapters)
        return missing

    def activate_weights(self, adapters: list[AdapterWeights | None]) -> None:
        """Make each row's adapter resident and point the shared row mapping at their slots.

        Rows bound to the merged weights run with no LoRA: their weights are already in the base. Weights that are
        no longer registered keep their slot while rows ask for them, and lose it at the first call that does not.
        Raises NoFreeSlot if the rows need more adapters than there are slots.
        """
        wanted = {adapter for adapter in adapters if adapter is not None and adapter is not self._merged}
        self._drop_unregistered(keep=wanted)
        for adapter in wanted:
            self._make_resident(adapter, protect=wanted)
        slots = [self._resident[adapter] if adapter in wanted else self.zero_slot for adapter in adapters]
        rank = self._rank(slots)
        self.rows.assign(torch.tensor(slots, device=self.device) if rank else None, rank)

    def select_rows(self, keep: torch.Tensor) -> None:
        """Shrink the row mapping to the rows still running (``keep`` indexes the old rows); the rank in play
        drops to the largest among their adapters (rows of higher rank that left no longer cost compute)."""
        if self.rows.slots is not None:
            slots = self.rows.slots[keep]
            rank = self._rank(slots.unique().tolist())
            self.rows.assign(slots if rank else None, rank)

    def _rank(self, slots: list[int]) -> int:
        """The rank in play for rows in ``slots``: the largest among the adapters there (0: no LoRA at all)."""
        ranks = {slot: adapter.rank for adapter, slot in self._resident.items()}
        return max((ranks.get(slot, 0) for slot in set(slots)), default=0)

    def _make_resident(self, adapter: AdapterWeights, protect: set[AdapterWeights]) -> None:
        if adapter in self._resident:
            self._resident.move_to_end(adapter)
            return
        if len(self._resident) >= self.max_resident:
            victim = next((held for held in self._resident if held not in protect), None)
            if victim is None:
                raise NoFreeSlot(f"a batch needs more than {self.max_resident} resident adapters")
            slot = self._resident.pop(victim)
        else:
            slot = min(set(range(self.max_resident)) - set(self._resident.values()))
        on_device = adapter.packed.to(self.device, self.dtype, non_blocking=True)  # one transfer
        storage = self.rows.storage
        for module in adapter.layout:
            self.layers[module].reserve(adapter.rank, self.device, self.dtype)
        modules = tuple(adapter.layout)
        stale = self._flat_views(slot, adapter.rank, modules, stale=True)  # what an earlier adapter left there
        if stale:
            torch._foreach_zero_(stale)
        torch._foreach_copy_(self._flat_views(slot, adapter.rank, modules), adapter.segments(on_device))
        self.rows.slot_written(slot if self.rows.storage == storage else None)
        self._resident[adapter] = slot
        self.fills += 1

    def _flat_views(self, slot: int, rank: int, modules: tuple[str, ...], stale: bool = False) -> list[torch.Tensor]:
        """Flat views of one slot's A and B^T: where an adapter of ``rank`` on ``modules`` (in its packed order)
        writes, or with ``stale``, the rest of the slot's allocated banks. Kept until a bank is reallocated:
        making a few hundred views costs more than the copies."""
        if self._slot_lists_storage != self.rows.storage:
            self._slot_lists, self._slot_lists_storage = {}, self.rows.storage
        key = (slot, rank, modules, stale)
        if key not in self._slot_lists:
            if stale:
                kept = dict.fromkeys(modules, rank)
                views = [view[kept.get(name, 0):] for name, layer in self.layers.items() if layer.a is not None
                         for view in layer.slot(slot)]
            else:
                views = [view[:rank] for name in modules for view in self.layers[name].slot(slot)]
            self._slot_lists[key] = [view.view(-1) for view in views if view.numel()]  # none: nothing to clear
        return self._slot_lists[key]

    def _drop_unregistered(self, keep: set[AdapterWeights]) -> None:
        """Clear the slots of weights no longer registered, except those in ``keep`` (rows still use them)."""
        with self._lock:
            gone = [held for held in self._resident if held not in keep and self._adapters.get(held.name) is not held]
        for held in gone:
            slot = self._resident.pop(held)
            torch._foreach_zero_(self._flat_views(slot, 0, (), stale=True))  # the whole slot
            self.rows.slot_written(slot)
        if not self._resident:
            for layer in self.layers.values():
                layer.release()
            self._slot_lists = {}  # their views would keep the freed banks alive

    def merge(self, name: str) -> None:
        """Fold the adapter registered under ``name`` into the base weights (``merge_weights``); UnknownAdapter
        for an unknown name, AdapterConflict on a 4-bit base."""
        self.merge_weights(self.lookup(name))

    def merge_weights(self, adapter: AdapterWeights) -> None:
        """Fold ``adapter`` into the base weights, in place, unmerging any other first. The first merge of a module
        keeps its weight as loaded, which every unmerge restores exactly (a fresh copy at each merge took 3-5x the
        merge on a CPU). Raises AdapterConflict on a 4-bit base."""
        if self.quantized:
            raise AdapterConflict("merging needs a full-precision base; this one is 4-bit")
        if self._merged is adapter:
            return
        name = adapter.name
        self.unmerge()
        started = time.perf_counter()
        for module, (lora_a, lora_b_t) in adapter.views(adapter.packed.to(self.device, self.dtype)).items():
            if module not in self._originals:  # what is kept stays exact: only merge and unmerge write these weights
                self._keep_original(module)
            weight = self.layers[module].base.weight.data
            if isinstance(self.layers[module].base, Conv1D):
                weight.addmm_(lora_a.t(), lora_b_t)  # [in, out] += A^T B^T
            else:
                weight.addmm_(lora_b_t.t(), lora_a)  # [out, in] += B A
        with self._lock:
            self._merged = adapter
        self._record_switch("merge", name, started)

    def _keep_original(self, module: str) -> None:
        """Keep a module's weight as loaded, for unmerges. On the CPU the loaded weights are pages of the model
        file mapped copy-on-write: the weight itself is kept and the module gets a copy to merge into, instead of
        a copy kept and the mapped pages copied again by the first write (twice the memory and time); the copy is
        also aligned, where the file's offsets can leave the loaded weights unaligned (40 bytes past a 64-byte
        boundary for SmolLM2), which made the in-place products 3x slower. On a GPU the weight keeps its address (captured graphs read it) and a copy is kept."""
        weight = self.layers[module].base.weight
        if weight.device.type == "cpu":
            self._originals[module], weight.data = weight.data, weight.data.clone()
        else:
            self._originals[module] = weight.data.clone()

    def unmerge(self) -> None:
        """Restore the base weights exactly as they were before the merge."""
        if self._merged is None:
            return
        started = time.perf_counter()
        modules = list(self._merged.layout)
        torch._foreach_copy_([self.layers[module].base.weight.data for module in modules],
                             [self._originals[module] for module in modules])
        with self._lock:
            name, self._merged = self._merged.name, None
        self._record_switch("unmerge", name, started)

    def _record_switch(self, action: str, name: str, started: float) -> None:
        """Observe a merge's or an unmerge's time, once the device has done its part."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics.MERGE_SWITCH.labels(action=action, adapter=name).observe(time.perf_counter() - started)

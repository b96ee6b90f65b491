"""The adapter registry: the one owner of adapter state (registered, resident in a slot, merged)."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from service import metrics
from service.errors import AdapterConflict, AdapterMerged, NoFreeSlot, UnknownAdapter
from service.lora.adapter_files import AdapterWeights, check_name, check_path, load_adapter, packed_bytes, read_config
from service.lora.adapter_memory import UNBOUNDED, AdapterRoom, bank_bytes, bank_slots, rank_bytes
from service.lora.layers import LoraLayers


class AdapterRegistry:
    """Registered adapters live on the host; at most ``max_resident`` sit in device slots (LRU).

    Residency is by identity, the ``AdapterWeights`` a name was registered with, not by name: rows admitted for a
    name keep those weights (``lookup`` when admitted, ``place`` at every step) even if the name is unregistered
    and registered again with other weights meanwhile; the old weights keep their slot while rows use them. What
    goes into the device weights, the LoRA layers write (``layers``: ``LoraLayers``). ``register``/``unregister``/
    ``lookup``/``describe`` may be called from any thread; ``place``, ``merge`` and ``unmerge`` touch device weights
    and are called by the engine thread between steps only. A registration that would make the adapters' memory (their
    host copies and the banks at their widest: ``adapter_memory``) pass ``room`` is refused (NoRoomForAdapter).
    """

    def __init__(self, model: nn.Module, roots: list[Path], max_resident: int, max_rank: int,
                 room: AdapterRoom = UNBOUNDED):
        self.layers = LoraLayers(model, max_resident)
        self.device, self.dtype, self.quantized = self.layers.device, self.layers.dtype, self.layers.quantized
        self.roots = [Path(root) for root in roots]
        self.max_resident = max_resident
        self.max_rank = max_rank
        self.room = room
        self.rank_bytes = rank_bytes(self.layers.shapes, self.dtype)
        self.zero_slot = max_resident  # the slot of rows with no adapter
        self._adapters: dict[str, AdapterWeights] = {}
        # the weights held in device slots -> their slot, least recently used first
        self._resident: OrderedDict[AdapterWeights, int] = OrderedDict()
        self._merged: AdapterWeights | None = None
        self._lock = threading.Lock()

    # ---- host side: any thread -------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> tuple[dict, float]:
        """Validate, load and register an adapter (``prepare``, then ``add``); the registry is unchanged if anything
        is wrong. Returns its description and the seconds it took. Raises what ``prepare`` and ``add`` raise."""
        adapter, seconds = self.prepare(name, path)
        self.add(adapter)
        return adapter.describe(), seconds

    def prepare(self, name: str, path: str | Path, replace: bool = False) -> tuple[AdapterWeights, float]:
        """Validate and load an adapter onto the host, not yet registered: its weights and the seconds it took.
        Raises AdapterError (its subclasses: AdapterConflict for a name taken, unless ``replace``;
        AdapterPathRefused/AdapterPathMissing for the path) for anything the engine cannot serve; NoRoomForAdapter
        where its rank and its weights file's size (``packed_bytes``) already need more memory than is left, before
        any weight is read."""
        check_name(name)
        folder = check_path(path, self.roots)
        if not replace:
            with self._lock:
                self._refuse_duplicate(name)  # before the work of loading (``add`` checks again after it)
        config = read_config(folder, self.max_rank)
        host = packed_bytes(folder, self.dtype)
        with self._lock:
            self._check_room(name, config.r, host)  # before the weights are read (``add`` checks again after)
        started = time.perf_counter()
        adapter = load_adapter(name, folder, self.layers.shapes, self.max_rank, self.dtype, self.layers.base_modules,
                               config)
        return adapter, time.perf_counter() - started

    def add(self, adapter: AdapterWeights, replace: bool = False) -> AdapterWeights | None:
        """Register ``adapter`` (from ``prepare``) under its name. With ``replace`` (vLLM's ``load_inplace``) a name
        taken is given these weights, and the weights it held are returned: rows admitted on them finish on them,
        later requests get the new ones. Raises AdapterConflict for a name taken without ``replace`` (another thread
        may have registered it since ``prepare``), AdapterMerged when the weights to replace are merged into the
        base (unmerge them first, on the engine thread), NoRoomForAdapter where the registered adapters with it would
        need more memory than is left (``_check_room``): the registry is unchanged."""
        with self._lock:
            replaced = self._adapters.get(adapter.name)
            if not replace:
                self._refuse_duplicate(adapter.name)
            elif replaced is not None and replaced is self._merged:
                raise AdapterMerged(adapter.name)
            self._check_room(adapter.name, adapter.rank, adapter.nbytes)
            self._adapters[adapter.name] = adapter
            return replaced

    def _check_room(self, name: str, rank: int, host: int) -> None:
        """NoRoomForAdapter where the adapters registered but ``name``'s, with an adapter of ``rank`` and ``host``
        bytes under ``name``, need more memory than ``room`` holds (``AdapterRoom.check``): their host copies, and the
        banks at their widest (``adapter_memory``), at least as wide as they are now (they never shrink while an
        adapter is resident). Called with the lock held."""
        kept = [held for held_name, held in self._adapters.items() if held_name != name]
        slots = max(bank_slots(len(kept) + 1, self.max_resident), self.layers.banks.slots)
        widest = max(rank, self.layers.widest_rank, *(held.rank for held in kept))
        self.room.check(host + sum(held.nbytes for held in kept), bank_bytes(slots, widest, self.rank_bytes), name)

    def _refuse_duplicate(self, name: str) -> None:
        if name in self._adapters:
            raise AdapterConflict(f"adapter {name!r} is already loaded; delete it first, or load it in place "
                                  "(replace: true; vLLM's load_inplace)")

    def unregister(self, name: str) -> AdapterWeights:
        """Forget an adapter and return the weights it held; its slot is cleared the next time the engine activates
        adapters without it. Raises UnknownAdapter, or AdapterMerged while it is merged into the base."""
        with self._lock:
            if name not in self._adapters:
                raise UnknownAdapter(f"unknown adapter {name!r}")
            if self._adapters[name] is self._merged:
                raise AdapterMerged(name)
            return self._adapters.pop(name)

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

    def registered(self, name: str) -> bool:
        """Whether some weights are registered under ``name`` now."""
        with self._lock:
            return name in self._adapters

    def holds(self, adapter: AdapterWeights) -> bool:
        """Whether ``adapter`` is what its name holds now (not unregistered, nor replaced by other weights)."""
        with self._lock:
            return self._adapters.get(adapter.name) is adapter

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
    def place(self, adapters: list[AdapterWeights | None]) -> tuple[list[int], int]:
        """Make each row's adapter resident: returns each row's slot (the zero slot for a row without one, or bound
        to the merged weights, which are in the base already) and how many adapters this made resident.

        Weights that are no longer registered keep their slot while rows ask for them, and lose it at the first call
        that does not. Raises NoFreeSlot if the rows need more adapters than there are slots.
        """
        wanted = {adapter for adapter in adapters if adapter is not None and adapter is not self._merged}
        self._drop_unregistered(keep=wanted)
        filled = sum(self._make_resident(adapter, protect=wanted) for adapter in wanted)
        return [self._resident[adapter] if adapter in wanted else self.zero_slot for adapter in adapters], filled

    def _make_resident(self, adapter: AdapterWeights, protect: set[AdapterWeights]) -> bool:
        """Give ``adapter`` a slot (the least recently used one not in ``protect`` when all are taken); whether it
        had to be filled."""
        if adapter in self._resident:
            self._resident.move_to_end(adapter)
            return False
        if len(self._resident) >= self.max_resident:
            victim = next((held for held in self._resident if held not in protect), None)
            if victim is None:
                raise NoFreeSlot(f"a batch needs more than {self.max_resident} resident adapters")
            slot = self._resident.pop(victim)
        else:
            slot = min(set(range(self.max_resident)) - set(self._resident.values()))
        self.layers.fill(slot, adapter)
        self._resident[adapter] = slot
        return True

    def _drop_unregistered(self, keep: set[AdapterWeights]) -> None:
        """Clear the slots of weights no longer registered, except those in ``keep`` (rows still use them)."""
        with self._lock:
            gone = [held for held in self._resident if held not in keep and self._adapters.get(held.name) is not held]
        for held in gone:
            self.layers.clear(self._resident.pop(held))
        if gone and not self._resident:
            self.layers.release()

    def merge(self, name: str) -> None:
        """Fold the adapter registered under ``name`` into the base weights (``merge_weights``); UnknownAdapter
        for an unknown name, AdapterConflict on a 4-bit base."""
        self.merge_weights(self.lookup(name))

    def merge_weights(self, adapter: AdapterWeights) -> None:
        """Fold ``adapter`` into the base weights (``LoraLayers.merge``), unmerging any other first. Raises
        AdapterConflict on a 4-bit base."""
        if self.quantized:
            raise AdapterConflict("merging needs a full-precision base; this one is 4-bit")
        if self._merged is adapter:
            return
        self.unmerge()
        started = time.perf_counter()
        self.layers.merge(adapter)
        with self._lock:
            self._merged = adapter
        self._record_switch("merge", adapter.name, started)

    def unmerge(self) -> None:
        """Restore the base weights exactly as they were before the merge."""
        if self._merged is None:
            return
        started = time.perf_counter()
        self.layers.unmerge(self._merged)
        with self._lock:
            name, self._merged = self._merged.name, None
        self._record_switch("unmerge", name, started)

    def _record_switch(self, action: str, name: str, started: float) -> None:
        """Observe a merge's or an unmerge's time, once the device has done its part."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics.MERGE_SWITCH.labels(action=action, adapter=name).observe(time.perf_counter() - started)

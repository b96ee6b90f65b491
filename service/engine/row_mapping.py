"""How the engine points the LoRA layers at the rows of a pass: the one writer of the row-to-slot mapping.

Before every pass (a chunk of the joining requests' prompts, or a decoding step of the running rows) the engine
makes every row's adapter resident (``AdapterRegistry.place``: running and joining rows alike, so that weights no
longer registered keep their slot while any row uses them) and points the mapping at the rows that run.
"""
from __future__ import annotations

import torch

from service.lora.adapter_files import AdapterWeights
from service.lora.registry import AdapterRegistry


def map_rows(registry: AdapterRegistry, adapters: list[AdapterWeights | None], pointed: slice = slice(None),
             rows_at_least: int = 1) -> int:
    """Make each row's adapter (``adapters``, one per row; None: no adapter) resident, and point the mapping at the
    rows ``pointed``. Returns how many adapters this made resident (a slot filled). Raises NoFreeSlot."""
    slots, filled = registry.place(adapters)
    point(registry, adapters[pointed], slots[pointed], rows_at_least)
    return filled


def point(registry: AdapterRegistry, adapters: list[AdapterWeights | None], slots: list[int],
          rows_at_least: int = 1) -> None:
    """Point the mapping at rows whose adapters sit in ``slots`` (one per row); the rank in play is the largest
    among the adapters in a slot (those merged into the base, in the zero slot, need none)."""
    rank = max((adapter.rank for adapter, slot in zip(adapters, slots) if slot != registry.zero_slot), default=0)
    registry.layers.mapping.assign(torch.tensor(slots, device=registry.device), rank, rows_at_least)

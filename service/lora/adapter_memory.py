"""The memory registered adapters take, and the room a server leaves them, so that a registration past it is refused
instead of the kernel killing the server (a review: SmolLM2 under a 2 GB container limit, copies of the rank-16
``squad`` registered one at a time, each answered with once, grew the server by ~40 MB each; the 33rd's answer was
killed, status 137).

An adapter costs memory twice (``layers``, ``adapter_files``): its host copy, held while it is registered (the packed
buffer of ``adapter_files.load_adapter``: rank x (in + out) of each module it targets, in the banks' dtype), and its
slot in the LoRA banks once resident. The banks grow, and never shrink while an adapter is resident, to a power of two
of slots (at most ``max_resident``) plus the zero slot, each as wide as the largest rank resident (``LoraLayers.fill``
and ``InputGroup.reserve``). So the adapters' memory at its most, for a registered set, is

    host  = the sum of their packed buffers
    banks = (min(row_bucket(registered), max_resident) + 1) x their largest rank x ``rank_bytes`` (every LoRA target)

(measured on SmolLM2 in float32: a rank-16 copy of ``squad`` 19,537,920 bytes on the host, a rank-16 slot 19.5 MB
and a rank-64 one 78.1 MB in the banks, 1,221,120 bytes a rank; on the CPU slots never written take no memory, but a
slot refilled after an eviction is cleared whole, at the banks' width: the bound is reached). vLLM bounds the same two
by counts fixed at start: ``max_cpu_loras`` host copies (an LRU cache that drops the least recently used adapter to
take another) and ``max_loras`` GPU slots, every target's stacked A and B allocated at once at ``max_lora_rank``
(``create_lora_weights``), counted by its profiling run before the KV cache takes the rest. Here registration is
explicit and never drops an adapter, so the bound is in bytes, against what the start check left
(``device_room.adapter_room``): on a GPU the banks against its memory and the host copies against the host's, on the
CPU both against the one memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from service.engine.kv_cache import row_bucket
from service.errors import NoRoomForAdapter


def rank_bytes(shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> int:
    """Bytes one rank of one slot takes in the banks of every LoRA target (``shapes``: module -> (in, out),
    ``LoraLayers.shapes``), A's row and B^T's, in ``dtype``."""
    return sum(fan_in + fan_out for fan_in, fan_out in shapes.values()) * dtype.itemsize


def bank_slots(registered: int, max_resident: int) -> int:
    """The adapter slots the banks grow to for ``registered`` adapters: a power of two, at most ``max_resident``
    (``LoraLayers._reserve``); 0 for none."""
    return min(row_bucket(registered), max_resident) if registered else 0


def bank_bytes(slots: int, rank: int, per_rank: int) -> int:
    """Bytes LoRA banks of ``slots`` adapter slots (``bank_slots``) and the zero slot take at ``rank`` (the largest):
    (slots + 1) x ``rank`` x ``per_rank`` (``rank_bytes``); 0 for no slot."""
    return (slots + 1) * rank * per_rank if slots else 0


@dataclass(frozen=True)
class AdapterRoom:
    """The bytes the adapters may take: ``banks`` of the device's memory and ``host`` of the host's; ``shared``: one
    memory (the CPU), which both count against together (``banks`` its bytes). None: not known, not bounded."""

    banks: int | None
    host: int | None
    shared: bool

    def check(self, host: int, banks: int, name: str) -> None:
        """NoRoomForAdapter (507) where adapters needing ``host`` bytes of host copies and ``banks`` bytes of banks,
        adapter ``name`` with them, need more than the room; its message names the bytes needed and left."""
        parts = [("the host copies and the LoRA banks", host + banks, self.banks)] if self.shared else [
            ("the LoRA banks", banks, self.banks), ("the host copies", host, self.host)]
        for what, needed, room in parts:
            if room is not None and needed > room:
                raise NoRoomForAdapter(
                    f"no memory for adapter {name!r}: with it the registered adapters need {needed} bytes for {what} "
                    f"({host} of host copies, {banks} of LoRA banks at their widest), more than the {room} bytes "
                    "the server has left for them; delete an adapter (DELETE /adapters/<name>; at the start, take one "
                    "out of the adapters folder), or restart the server with a smaller max_resident or more memory",
                    settings=("max_resident",))


UNBOUNDED = AdapterRoom(None, None, False)

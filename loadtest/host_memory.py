"""Host memory for ``loraswap bench`` (Linux, from /proc/self): the process's resident set (RSS), how far it rose
while a block ran (``PeakRss``), and how it grows with many adapters registered (``registered_memory``, whose count
``check_registered_room`` bounds by the host's memory before the base loads)."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Self

import torch
from transformers import PretrainedConfig

from service.cli.command import UsageError
from service.model.device_room import device_memory
from service.model.process_status import proc_status

if TYPE_CHECKING:
    from service.lora.registry import AdapterRegistry


class PeakRss:
    """How far the process's resident set rose while entered, over its size at entry (``rise``, bytes): Linux's
    high-water mark (VmHWM), reset to the current size at entry (writing 5 to /proc/self/clear_refs)."""

    def __enter__(self) -> Self:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        self.start, self.rise = rss_bytes(), 0
        return self

    def __exit__(self, *exc) -> None:
        self.rise = max(0, proc_status("VmHWM") - self.start)


def rss_bytes() -> int:
    """The process's resident set size now (VmRSS), in bytes."""
    return proc_status("VmRSS")


def check_registered_room(count: int, config: PretrainedConfig, rank: int, dtype: torch.dtype) -> None:
    """UsageError naming ``--registered`` where ``count`` adapters of ``rank`` registered for the memory check
    (``registered_memory``: each holds its weights on the host, in ``dtype``) need more than the host's RAM and swap,
    or its container's memory limit (``device_room.device_memory``), found from the base model's ``config`` before it
    loads: each at least an A and a B on one module of each layer that reads and writes the hidden state (both of
    bench's target presets adapt one), ``rank`` x 2 x hidden size x layers x the dtype's bytes (a review: a huge count
    was taken, to fail only once the timed modes had run)."""
    each = rank * 2 * config.hidden_size * config.num_hidden_layers * dtype.itemsize
    memory = device_memory(torch.device("cpu"))
    if count * each > memory:
        raise UsageError(f"--registered {count} needs at least {count} x {each} bytes (--rank {rank} x 2 x "
                         f"{config.hidden_size} x {config.num_hidden_layers} layers x {dtype.itemsize} bytes) of host "
                         f"memory, more than the {memory} bytes of memory this machine has (its RAM and swap, or its "
                         "container's memory limit where less); lower it")


def registered_memory(registry: AdapterRegistry, name: str, source: Path, count: int, device: torch.device) -> dict:
    """Host RSS with ``count`` more adapters registered (each a copy of ``source``, the folder of the registered
    adapter ``name``), and after they are all unloaded. Returns the RSS growth over the start at a quarter, half and
    all of them (bytes, keyed by how many were registered), the growth left after unloading them (bytes), the size of
    ``name`` (bytes) and, on CUDA, the bytes the device has allocated. Raises AdapterError when ``source`` cannot be
    registered."""
    gc.collect()
    baseline = rss_bytes()
    checkpoints = {}
    for i in range(count):
        registry.register(f"mem{i}", source)
        if (i + 1) in (count // 4, count // 2, count):
            checkpoints[i + 1] = rss_bytes() - baseline
    for i in range(count):
        registry.unregister(f"mem{i}")
    gc.collect()
    after = rss_bytes() - baseline
    adapter_bytes = sum(a["size_bytes"] for a in registry.describe() if a["name"] == name)
    report = {"registered": count, "adapter_bytes": adapter_bytes,
              "rss_growth_bytes": {str(k): v for k, v in checkpoints.items()}, "rss_after_unload_bytes": after}
    if device.type == "cuda":
        report["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
    return report

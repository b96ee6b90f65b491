"""What the size settings make the engine allocate, found from the base model's config (no weights), and whether the
device has room for it: a setting whose allocation cannot exist is refused before the model loads (a review:
``serve --max-batch 4611686018427387904`` failed its start with torch's "Storage size calculation overflowed", and a
value within that bound but past the device's memory fails once a full batch comes).

The settings that allocate in proportion to their value (the others bound counts and allocate nothing by themselves:
``max_queue``, ``max_choices``, ``max_answer_windows``, ``max_prefill_tokens``, ``max_body_bytes``,
``prefix_block_tokens``, ``max_rank``; ``max_input_tokens`` and ``max_new_tokens`` are bounded by the model's
positions, ``runtime.check_room``; ``scale`` bounds ``max_batch`` + ``max_queue`` by Ray's 32 bits,
``scale.preflight.check_ongoing``):

- ``max_batch``: the KV cache of a full batch of the shortest requests, ``row_bucket(max_batch)`` rows (a power of
  two) x ``COLUMN_STEP`` columns (the fewest a cache has) x ``kv_bytes_per_token`` (``kv_cache.RowKVCache``; with
  CUDA graphs it is allocated for so many rows at the first request);
- ``max_resident``: the LoRA banks of ``max_resident`` resident adapters of rank 1 on a single layer, with the zero
  slot, (``max_resident`` + 1) x ``hidden_size`` x the dtype's bytes (each layer reads or writes the hidden state:
  ``lora.layers.InputGroup.reserve``);
- ``prefix_cache_bytes``: the bytes of keys and values the prefix cache may keep (``prefix_cache.PrefixCache``).
"""
from __future__ import annotations

import os

import torch
from transformers import PretrainedConfig

from service.engine.kv_cache import COLUMN_STEP, row_bucket
from service.settings import INT64, Settings


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token takes in the KV cache of a model of ``config`` in ``dtype``: 2 (keys,
    values) x layers x key-value heads x head size x the dtype's bytes."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize


def allocations(settings: Settings, config: PretrainedConfig, dtype: torch.dtype) -> dict[str, tuple[int, str]]:
    """The bytes each size setting makes the engine allocate at least (see the module's docstring), by setting, with
    the formula in words."""
    per_token = kv_bytes_per_token(config, dtype)
    rows = row_bucket(settings.max_batch)
    return {
        "max_batch": (rows * COLUMN_STEP * per_token, f"a full batch's KV cache, {rows} rows x {COLUMN_STEP} columns x "
                      f"{per_token} bytes a token"),
        "max_resident": ((settings.max_resident + 1) * config.hidden_size * dtype.itemsize,
                         f"the LoRA banks of so many adapters of rank 1 on one layer, "
                         f"{settings.max_resident + 1} slots x {config.hidden_size} x {dtype.itemsize} bytes"),
        "prefix_cache_bytes": (settings.prefix_cache_bytes, "the prefix cache's keys and values"),
    }


def check_allocations(settings: Settings, config: PretrainedConfig, dtype: torch.dtype, memory: int | None) -> None:
    """ValueError naming the first size setting (``allocations``) whose allocation cannot exist: past 2**63 bytes
    (torch's storage sizes are 64-bit: "Storage size calculation overflowed"), or past ``memory`` bytes, the device's
    (None: not known here, as for a cluster's replicas)."""
    for name, (size, what) in allocations(settings, config, dtype).items():
        if size >= INT64:
            raise ValueError(f"{name} {getattr(settings, name)} needs {what}: past 2**63 bytes, more than any torch "
                             "tensor can hold; lower it")
        if memory is not None and size > memory:
            raise ValueError(f"{name} {getattr(settings, name)} needs {what}: {size} bytes, more than the "
                             f"{memory} bytes of memory the device has; lower it")


def device_memory(device: torch.device) -> int:
    """Bytes of memory ``device`` has: a GPU's total memory; for the CPU the host's RAM and swap (the most a private
    map can be given: ``file_pages.mapped_zeros``), or a container's memory limit where that is less
    (``container_memory``: under ``docker run --memory 2g`` a size setting past it was taken, and the process killed
    by the kernel once the engine filled it)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") + swap_bytes()
    return min(host, container_memory() or host)


def container_memory() -> int | None:
    """Bytes of memory and swap the cgroup a container sees as its root may use, as joblib reads a container's CPU
    quota (``service.model.cpu_quota``): cgroup v2's ``memory.max`` plus ``memory.swap.max``, cgroup v1's memory and
    swap limit, else its memory limit, swap not limited counting as the host's swap; None where no memory limit is set
    or none can be read. A limit on a cgroup below that root (systemd's ``MemoryMax=`` on a host) is not found."""
    memory = read_limit(f"{CGROUP}/memory.max")
    if memory is not None:
        swap = read_limit(f"{CGROUP}/memory.swap.max")
        return memory + (swap_bytes() if swap is None else swap)
    both = read_limit(f"{CGROUP}/memory/memory.memsw.limit_in_bytes")
    if both is not None:
        return both
    memory = read_limit(f"{CGROUP}/memory/memory.limit_in_bytes")
    return None if memory is None else memory + swap_bytes()


CGROUP = "/sys/fs/cgroup"  # where a container sees its own cgroup: v2's files, or v1's hierarchies' folders
NO_LIMIT = 2**62  # cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit count, v2 as "max"


def read_limit(path: str) -> int | None:
    """A cgroup limit file's bytes; None where it says no limit or cannot be read."""
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) < NO_LIMIT else None


def swap_bytes() -> int:
    """The host's swap space in bytes (``/proc/meminfo``'s SwapTotal; 0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            line = next((line for line in meminfo if line.startswith("SwapTotal:")), "SwapTotal: 0 kB")
    except OSError:
        return 0
    return int(line.split()[1]) * 1024

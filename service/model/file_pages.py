"""Pages of the model file, and of the tensors kept in maps of their own. On the CPU, weights loaded from safetensors
are views of a private (copy-on-write) map of the file, so the pages of one never written can leave memory and come
back from the file, unchanged, when read; a copy or a zero tensor kept in a map of its own leaves memory when freed,
and a zero tensor's pages take memory only once written."""
from __future__ import annotations

import ctypes
import math
import mmap
from pathlib import Path

import torch

MADV_DONTNEED = 4  # linux/mman.h: drop the pages; a private file mapping reads them from the file again


def private_file_maps() -> list[tuple[int, int]]:
    """The address ranges [start, end) of this process's private maps of files (/proc/self/maps; none without it).
    Read once for many ``release`` calls: reading it costs about 0.5 ms."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    ranges = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1][3] == "p" and fields[4] != "0" and fields[5].startswith("/"):
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


def release(tensor: torch.Tensor, maps: list[tuple[int, int]]) -> bool:
    """Drop the resident pages that lie wholly inside ``tensor``'s bytes, if they belong to one of the private file
    ``maps`` (``private_file_maps``; the pages at its ends, shared with neighbours, stay); anywhere else (anonymous
    memory, whose pages this would zero) nothing is done. Only for a tensor nobody wrote since it was loaded: a written
    page would come back as the file has it. Returns whether pages were dropped (Linux only)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first or not any(low <= start and end <= high for low, high in maps):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) == 0


def mapped_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``tensor`` (a CPU tensor, any shape and dtype) in an anonymous map of its own, page
    aligned, which is unmapped when the copy is freed. A copy from malloc would, once freed, mostly stay in the
    process as free space in malloc's arenas: glibc raises its mmap threshold to the size of each mapped chunk freed
    (up to 32 MiB, mallopt(3)), so copies of a few MiB come from arenas, and freeing the merged weights of an
    all-linear adapter on SmolLM2 left about 0.3 GB resident (docs/benchmarks.md, "Merged copies in maps of their
    own")."""
    if not tensor.numel():
        return tensor.clone(memory_format=torch.contiguous_format)
    buffer = mmap.mmap(-1, tensor.numel() * tensor.element_size())
    copy = torch.frombuffer(buffer, dtype=tensor.dtype, count=tensor.numel()).view(tensor.shape)
    return copy.copy_(tensor)


def mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros of ``shape`` in a private anonymous map of its own, page aligned. The kernel hands out its
    pages zeroed as they are first written (a page only read stays the shared zero page, outside the RSS), so the
    parts never written take no memory and nothing is cleared up front; the map is unmapped when the tensor is freed.
    For storage reserved ahead of its use (a KV cache's rows and columns, the slots of LoRA banks), where zeros from
    malloc would be written whole at once and, once freed, mostly kept as free space in malloc's arenas."""
    numel = math.prod(shape)
    if not numel:
        return torch.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, numel * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)

"""Pages of the model file. On the CPU, weights loaded from safetensors are views of a private (copy-on-write) map of
the file, so the pages of one never written can leave memory and come back from the file, unchanged, when read."""
from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import torch

MADV_DONTNEED = 4  # linux/mman.h: drop the pages; a private file mapping reads them from the file again


def release(tensor: torch.Tensor) -> bool:
    """Drop the resident pages that lie wholly inside ``tensor``'s bytes, if they belong to a private map of a file
    (the pages at its ends, shared with neighbours, stay); anywhere else (anonymous memory, whose pages this would
    zero) nothing is done. Only for a tensor nobody wrote since it was loaded: a written page would come back as the
    file has it. Returns whether pages were dropped (Linux only)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first or not in_private_file_map(start, end):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) == 0


def in_private_file_map(start: int, end: int) -> bool:
    """Whether the addresses [start, end) lie in one private mapping of a file (/proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return False
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        if low <= start and end <= high:
            return fields[1][3] == "p" and fields[4] != "0" and len(fields) == 6 and fields[5].startswith("/")
    return False

"""Aligned weights in a safetensors file. On the CPU the base's weights are views of a map of its file, so a tensor
starts wherever the file puts it: 8 bytes of header length, the JSON header, then the tensors at their offsets. Each
tensor of SmolLM2's converted cache lies a multiple of 64 bytes into the data, but the data began 40 bytes past a
64-byte boundary, and SmolLM2's body took about 4% longer a one-token decoding step over such weights than over the
same file with its data aligned (docs/benchmarks.md, "Aligned weights"). The format lets the header be padded with
spaces (https://github.com/huggingface/safetensors, "Format": "The header data MAY be trailing padded with
whitespace"), so padding it moves the data without changing a byte of it."""
from __future__ import annotations

import fcntl
import os
import shutil
import struct
from pathlib import Path

ALIGNMENT = 64  # bytes: a cache line, and one AVX-512 register
LENGTH = struct.Struct("<Q")  # the header's length, the file's first 8 bytes


def data_start(path: Path) -> int:
    """Offset in bytes of the tensors' data in the safetensors file at ``path``: 8 plus the header's length.
    ValueError for a file too short to have a header, or to hold the header its first 8 bytes announce."""
    with open(path, "rb") as handle:
        head = handle.read(LENGTH.size)
        size = os.fstat(handle.fileno()).st_size
    start = LENGTH.size + LENGTH.unpack(head)[0] if len(head) == LENGTH.size else None
    if start is None or start > size:
        raise ValueError(f"{path} is not a safetensors file: {size} bytes, no whole header")
    return start


def align(path: Path) -> bool:
    """Make the data of the safetensors file at ``path`` start at a multiple of ``ALIGNMENT`` bytes by padding its
    header with spaces, when it does not already; returns whether it rewrote the file. The new file is written
    beside it (``<name>.aligning``, removed if that fails) and renamed over it (its mode kept), so a reader opens
    either whole file and one that mapped the old keeps it; processes aligning one file take turns on a lock file
    beside it (flock(2)), the later one finding it aligned. OSError when an unaligned file's folder cannot be
    written; ValueError for a file without a whole header (``data_start``)."""
    if not -data_start(path) % ALIGNMENT:  # no lock taken: an aligned file in a read-only folder is left alone
        return False
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        start = data_start(path)
        padding = -start % ALIGNMENT
        if not padding:
            return False
        partial = path.with_name(f"{path.name}.aligning")  # one name: a copy left by a killed process is replaced
        try:
            with open(path, "rb") as source, open(partial, "wb") as target:
                shutil.copymode(path, partial)  # before a byte is written: the cache's mode, not the umask's
                header = source.read(start)[LENGTH.size:] + b" " * padding
                target.write(LENGTH.pack(len(header)) + header)
                shutil.copyfileobj(source, target, 1 << 24)
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)  # a full disk or a file that cannot be replaced keeps no half copy
            raise
        return True

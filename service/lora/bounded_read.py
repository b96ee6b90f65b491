"""Reading the small text files of an adapter folder (its config, card, chat template) as the server may: only a
file inside the folder (``adapter_file``), only a regular file, and only one of a bounded size. A folder is the
adapter author's: its ``adapter_config.json`` may be a named pipe, which a plain ``open`` waits on until something
writes to it (a review: a FIFO held the lock on adapter changes, so every later load and unload hung until a
restart), or hundreds of MB of spaces, read whole."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from service.errors import AdapterError, AdapterPathRefused

MAX_ADAPTER_JSON_BYTES = 2**20  # an adapter_config.json or card.json: peft's configs and our cards take 1-4 KB


def read_bounded(path: Path, most: int) -> str:
    """The UTF-8 text of ``path``, opened without waiting (``O_NONBLOCK``: a FIFO opens at once) and checked before
    it is read: AdapterError for anything but a regular file, or one over ``most`` bytes; OSError (FileNotFoundError
    for none) or UnicodeDecodeError (a ValueError) as opening and reading it raise."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):  # a FIFO, a folder, a device
            raise AdapterError(f"the adapter's {path.name} is not a regular file")
        if status.st_size > most:
            raise AdapterError(f"the adapter's {path.name} has {status.st_size} bytes, more than the {most} it may "
                               "have")
        data = os.read(descriptor, most + 1)  # a regular file: all of it (grown since, one byte past the bound)
    finally:
        os.close(descriptor)
    if len(data) > most:
        raise AdapterError(f"the adapter's {path.name} has more than the {most} bytes it may have")
    return data.decode("utf-8")


def adapter_file(folder: Path, name: str) -> Path:
    """``folder``/``name``, refused (AdapterPathRefused) when it is a symlink leading out of ``folder``: the folder
    was checked to lie inside an adapter root, and a file in it must not reach past it; AdapterError (422) when it is
    a symlink that cannot be followed (a loop)."""
    path = folder / name
    try:
        outside = path.is_symlink() and not path.resolve().is_relative_to(folder.resolve())
    except (RuntimeError, OSError):  # a symlink loop: RuntimeError before Python 3.13, OSError (ELOOP) after
        raise AdapterError(f"{path} is a symlink that cannot be followed (a loop)") from None
    if outside:
        raise AdapterPathRefused(f"{path} is a symlink to a file outside the adapter folder")
    return path

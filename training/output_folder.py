"""A command's output folder (``--out`` of ``loraswap train`` and ``merge``), written whole or not at all: checked to
be new or empty when parsed (``service.cli.command.new_folder``), written beside it, then moved there in one rename
that takes the place of nothing or of an empty folder only (rename(2)), so that a folder filled while the command ran
(an adapter copied there, a second run into it) is never written over; its files have the modes of the umask."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from service.cli.command import UsageError
from service.model.process_status import status_value


def partial_folder(out: Path) -> Path:
    """A new hidden folder beside ``out`` (its parents made) for a command to write into before ``publish``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    partial.mkdir()
    return partial


def publish(partial: Path, out: Path) -> None:
    """Move the finished folder ``partial`` to ``out``; UsageError, naming where the new files stay, when ``out`` was
    filled meanwhile (it is left as it is)."""
    try:
        os.rename(partial, out)
    except OSError:  # ENOTEMPTY or EEXIST: filled meanwhile; ENOTDIR: a file there now
        raise UsageError(f"{out} was filled while the command ran, so it is left as it is: the new files are in "
                         f"{partial}") from None


def current_umask() -> int:
    """The process's file mode creation mask, read without changing it: the ``Umask`` line of /proc/self/status
    (Linux 4.7 and later). Where there is none (another system, an older kernel) it is read by setting it and setting
    it back (``os.umask``), which is not thread-safe: a file another thread creates in between gets the mask set
    meanwhile, 077 (the strictest: too private a mode, never too open)."""
    try:
        return int(status_value("Umask"), 8)
    except (StopIteration, OSError):
        mask = os.umask(0o077)
        os.umask(mask)
        return mask


def modes_of_the_umask(folder: Path) -> None:
    """Give every file under ``folder`` the mode the umask gives a new file (0666 & ~umask), and every folder under
    it a new folder's (0777 & ~umask): libraries write some files 0600 (safetensors 0.8 its weights), which another
    user cannot read, as a container's non-root user cannot once the folder is copied into an image (COPY keeps
    modes)."""
    mask = current_umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """The folder to write ``out``'s files into (``partial_folder``), published to ``out`` when the block ends
    (``publish``: UsageError if ``out`` was filled meanwhile), its files and folders with the modes of the umask
    (``modes_of_the_umask``); removed if it fails or is interrupted: nothing half-written is left."""
    partial = partial_folder(out)
    try:
        yield partial
        modes_of_the_umask(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish(partial, out)

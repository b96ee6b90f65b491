"""A command's output folder (``--out`` of ``loraswap train`` and ``merge``), written whole or not at all: checked to
be new or empty when parsed (``service.cli.command.new_folder``), written beside it, then moved there in one rename
that takes the place of nothing or of an empty folder only (rename(2)), so that a folder filled while the command ran
(an adapter copied there, a second run into it) is never written over."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from service.cli.command import UsageError


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


@contextlib.contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """The folder to write ``out``'s files into (``partial_folder``), published to ``out`` when the block ends
    (``publish``: UsageError if ``out`` was filled meanwhile), removed if it fails or is interrupted: nothing
    half-written is left."""
    partial = partial_folder(out)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish(partial, out)

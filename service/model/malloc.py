"""glibc malloc as the server uses it: without its per-thread cache of freed small chunks (tcache) from the process's
start, and its free memory given back to the system when the server rests.

On the CPU, torch takes every tensor from malloc. A prefill pass allocates and frees tensors of several MiB (a
layer's activations: 9.4 MiB for SmolLM2's MLP over 1,600 prompt tokens) between the small blocks torch allocates for
every op. glibc's tcache keeps up to 7 freed small chunks of each size per thread, still marked in use, so they stay
where they lie: between big free chunks that would otherwise merge, which then no longer fit the next big tensors,
and the thread's arena grows by more heaps, each resident once written. Without the tcache, freed small chunks go to
the fast bins, which malloc merges back before it serves a big request (its share of the peak RSS saved, beside the
other measures of docs/benchmarks.md, "Peak memory on the CPU", was not measured alone). glibc reads its tunables
(``GLIBC_TUNABLES``) once, when a process starts, so the server starts again with the tcache off before it loads
anything.

Free chunks stay resident in malloc's arenas until reused; ``give_back`` returns their pages (``malloc_trim``), for
the times the server rests: after loading, and when a batch ends.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

TCACHE = "glibc.malloc.tcache_count"
GLIBC = platform.libc_ver()[0] == "glibc"
LIBC = ctypes.CDLL(None) if GLIBC else None  # this process's C library, opened once


def tunables_with_tcache_off(environ: dict[str, str]) -> str | None:
    """``GLIBC_TUNABLES`` for a process started with ``environ``: its tunables plus the tcache off; None when they set
    the tcache's size already (whoever did keeps it: an earlier restart, or a user's own choice)."""
    current = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=")[0] == TCACHE for item in current.split(":")):
        return None
    return f"{current}:{TCACHE}=0" if current else f"{TCACHE}=0"


def restart_without_tcache() -> None:
    """Execute this process's command line (``sys.orig_argv``, the same interpreter) again with glibc's tcache off,
    unless it is off already (``tunables_with_tcache_off``) or the C library is not glibc: what the process did so far
    is done again, and what it holds is lost; its signal mask is kept (a stop held back, ``entry.hold_stops``, stays
    held for the new process). Returns only when nothing needs doing; raises OSError when the execution fails."""
    tunables = tunables_with_tcache_off(dict(os.environ)) if GLIBC else None
    if tunables is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})


def give_back() -> None:
    """Return the whole free pages of every malloc arena to the system (glibc's ``malloc_trim(0)``; elsewhere nothing):
    the RSS they held leaves, and a later allocation that reuses them faults them in again, zeroed."""
    if LIBC is not None:
        LIBC.malloc_trim(0)

"""Torch work off the engine thread runs on threads that end with it, so that the engine's OpenMP team stays fast.

libgomp (the OpenMP runtime of torch's Linux wheels) gives every thread that runs a parallel torch op a team of
worker threads, kept for as long as that thread lives. Once it manages more threads than there are CPUs, it lets the
workers of every team spin only 100 rounds, instead of about 3 ms, before they sleep on a futex
(``gomp_throttled_spin_count_var`` in libgomp's env.c), so each of the engine thread's many small parallel ops then
pays for waking them. On 2 cores, SiLU times a product of [1, 154, 1536] took 250 us on the engine thread of a
started server whose loading and adapter-packing threads lived on, and 86-92 us once they had ended
(docs/benchmarks.md, "Thread teams").
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from service.model.malloc import give_back

T = TypeVar("T")


def on_passing_thread(fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` run on a new thread that ends when it returns: its result, or what it raised. What the thread
    freed leaves memory with it (``malloc.give_back``: loading leaves 20 MiB of free chunks behind). A stop
    (KeyboardInterrupt) while ``fn`` runs is raised at once, ``fn`` left to run on: waiting for it (a batch of
    transformers' ``generate``) kept ``loraswap bench`` 26 s past its SIGTERM; the command's process then ends
    without it (``server_process.end_stopped``)."""
    thread = ThreadPoolExecutor(1, thread_name_prefix="loraswap-passing")
    work = thread.submit(fn, *args)
    try:
        work.exception()  # waits for fn to end; what it raised, result() raises below
    except KeyboardInterrupt:  # a stop: fn runs on, not waited for
        thread.shutdown(wait=False)
        raise
    thread.shutdown()
    give_back()
    return work.result()

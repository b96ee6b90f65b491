"""Timing for ``loraswap bench``: the seconds a call takes with the device's queued work included (``timed``), and the
start and end of each call of one of the engine's callables (``Stamped``)."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; on the CPU, work is done when its call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """The wall-clock seconds ``fn()`` takes, the device work it queues included."""
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


class Stamped:
    """A callable of the engine (its decoding step, the registry's placing of adapters) that also notes when each
    call starts and ends (``time.perf_counter`` seconds, appended to ``stamps``), the device's queued work included
    (the stall check; a CUDA graph replay runs no module hooks, so the steps are stamped here). Other attributes
    pass through to the wrapped object."""

    def __init__(self, wrapped, stamps: list[tuple[float, float]], device: torch.device):
        self.wrapped, self.stamps, self.device = wrapped, stamps, device

    def __call__(self, *args):
        started = time.perf_counter()
        result = self.wrapped(*args)
        sync(self.device)
        self.stamps.append((started, time.perf_counter()))
        return result

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)


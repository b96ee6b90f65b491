"""Register and unregister one adapter many times over, and whether the server's memory comes back to its baseline:
a registry that kept anything of an adapter it let go would grow by it at every cycle."""
from __future__ import annotations

import time
from pathlib import Path

import httpx

from loadtest.checked.adapters import register, unregister
from loadtest.checked.answer_key import AnswerKey
from loadtest.checked.memory import resident_bytes
from loadtest.checked.report import summary
from loadtest.checked.traffic import sent_alone


def register_cycles(admin: httpx.Client, http: httpx.Client, key: AnswerKey, name: str, folder: Path, cycles: int,
                    max_growth: float) -> dict:
    """Unregister adapter ``name`` (of the answer ``key``, registered from ``folder``) and register it again
    ``cycles`` times; every 100th cycle (every tenth of them, when fewer than 1,000) one request of the key is sent to
    it and must get its right answer. The baseline is the resident memory (``/metrics``) once the first tenth of the
    cycles is done (a warm-up), the end what it is after the last; ``flat`` when the end is at most ``max_growth``
    over the baseline. Raises httpx.HTTPStatusError when an admin call is refused."""
    warmup, baseline, checks = max(cycles // 10, 1), None, []
    check_every = min(100, warmup)
    started = time.perf_counter()
    for cycle in range(1, cycles + 1):
        unregister(admin, name)
        register(admin, name, folder)
        if cycle % check_every == 0:
            checks.append(sent_alone(http, key, name, cycle // check_every % len(key.asks)))
        if cycle == warmup:
            baseline = resident_bytes(http.get("/metrics").text)
    end = resident_bytes(http.get("/metrics").text)
    growth = round(end / baseline - 1, 4) if baseline and end else None
    return {"cycles": cycles, "seconds": round(time.perf_counter() - started, 1), "warmup_cycles": warmup,
            "baseline_bytes": baseline, "end_bytes": end, "growth": growth,
            "max_growth": max_growth, "flat": None if growth is None else growth <= max_growth,
            "checks": summary(checks, 0)}


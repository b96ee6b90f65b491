"""The server's resident memory over a load test, from its ``/metrics`` (``process_resident_memory_bytes``, read by
prometheus_client from /proc on Linux), and whether it stayed flat once warmed up: the most it held after the
warm-up over the most it held during it. ``MemoryWatch`` is the plain side; ``users.clock_user`` samples it on a
clock."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

RSS = "process_resident_memory_bytes"


@dataclass
class MemoryWatch:
    """``samples``: (seconds since ``started``, resident bytes), one per ``tick``."""

    started: float = field(default_factory=time.perf_counter)
    samples: list[tuple[float, float]] = field(default_factory=list)

    def tick(self, client) -> None:
        """Scrape ``/metrics`` through ``client`` (a locust FastHttpSession) and keep its resident memory, if any."""
        with client.get("/metrics", name="memory watch", catch_response=True) as reply:
            rss = resident_bytes(reply.text) if reply.status_code == 200 else None
            if rss is None:
                reply.failure(f"no {RSS} in /metrics")
                return
            self.samples.append((round(time.perf_counter() - self.started, 2), rss))


def resident_bytes(metrics_text: str) -> float | None:
    """The value of ``process_resident_memory_bytes`` in a ``/metrics`` text, or None without it."""
    return next((sample.value for family in text_string_to_metric_families(metrics_text)
                 for sample in family.samples if sample.name == RSS), None)


def flatness(samples: list[tuple[float, float]], warmup_s: float, max_growth: float) -> dict:
    """Whether memory stayed flat after ``warmup_s`` seconds: ``growth`` = the most held after the warm-up over the
    most held during it, less 1; ``flat`` when it is at most ``max_growth`` (0.05: 5%). None for either when a side
    has no sample. Bytes as sampled; the samples themselves are kept, in MiB."""
    during = [rss for at, rss in samples if at <= warmup_s]
    after = [rss for at, rss in samples if at > warmup_s]
    growth = round(max(after) / max(during) - 1, 4) if during and after else None
    return {"warmup_s": warmup_s, "max_growth": max_growth, "samples": len(samples),
            "warmup_peak_bytes": max(during, default=None), "peak_after_bytes": max(after, default=None),
            "last_bytes": samples[-1][1] if samples else None,
            "growth": growth,
            "flat": None if growth is None else growth <= max_growth,
            "mib": [(at, round(rss / 2**20, 1)) for at, rss in samples]}

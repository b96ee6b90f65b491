"""The server's resident memory over a load test, from its ``/metrics`` (``process_resident_memory_bytes``, read by
prometheus_client from /proc on Linux), and whether it stayed flat once warmed up: the most it held after the
warm-up over the most it held during it, less what its prefix cache held at each moment
(``loraswap_prefix_cache_bytes``). The prefix cache fills over minutes of varied traffic up to its own bound
(``--prefix-cache-bytes``, 256 MiB by default, more than 5 % of a SmolLM2 server's RSS, and tested on its own): it
is memory the server was told to use, where a leak is growth in everything else. ``MemoryWatch`` is the plain side;
``users.clock_user`` samples it on a clock."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

RSS = "process_resident_memory_bytes"
PREFIX_CACHE = "loraswap_prefix_cache_bytes"


@dataclass
class MemoryWatch:
    """``samples``: (seconds since ``started``, resident bytes, prefix cache bytes), one per ``tick``."""

    started: float = field(default_factory=time.perf_counter)
    samples: list[tuple[float, float, float]] = field(default_factory=list)

    def tick(self, client) -> None:
        """Scrape ``/metrics`` through ``client`` (a locust FastHttpSession) and keep its resident memory and its
        prefix cache's bytes (0 when it has none), if it has the first."""
        with client.get("/metrics", name="memory watch", catch_response=True) as reply:
            rss = resident_bytes(reply.text) if reply.status_code == 200 else None
            if rss is None:
                reply.failure(f"no {RSS} in /metrics")
                return
            cached = gauge(reply.text, PREFIX_CACHE) or 0.0
            self.samples.append((round(time.perf_counter() - self.started, 2), rss, cached))


def resident_bytes(metrics_text: str) -> float | None:
    """The value of ``process_resident_memory_bytes`` in a ``/metrics`` text, or None without it."""
    return gauge(metrics_text, RSS)


def gauge(metrics_text: str, name: str) -> float | None:
    """The value of the unlabelled sample ``name`` in a ``/metrics`` text, or None without it."""
    return next((sample.value for family in text_string_to_metric_families(metrics_text)
                 for sample in family.samples if sample.name == name), None)


def flatness(samples: list[tuple[float, float, float]], warmup_s: float, max_growth: float) -> dict:
    """Whether memory stayed flat after ``warmup_s`` seconds, from ``MemoryWatch.samples``: ``growth`` = the most
    held outside the prefix cache (resident bytes less the prefix cache's) after the warm-up over the most held so
    during it, less 1; ``flat`` when it is at most ``max_growth`` (0.05: 5%). None for either when a side has no
    sample. The resident peaks and the prefix cache's largest size are reported beside it; the samples themselves are
    kept, in MiB (seconds, resident, prefix cache)."""
    held = [(at, rss - cached) for at, rss, cached in samples]
    during = [bytes_ for at, bytes_ in held if at <= warmup_s]
    after = [bytes_ for at, bytes_ in held if at > warmup_s]
    growth = round(max(after) / max(during) - 1, 4) if during and after else None
    return {"warmup_s": warmup_s, "max_growth": max_growth, "samples": len(samples),
            "warmup_peak_bytes": max(during, default=None), "peak_after_bytes": max(after, default=None),
            "growth": growth, "flat": None if growth is None else growth <= max_growth,
            "rss_warmup_peak_bytes": max((rss for at, rss, _ in samples if at <= warmup_s), default=None),
            "rss_peak_after_bytes": max((rss for at, rss, _ in samples if at > warmup_s), default=None),
            "rss_last_bytes": samples[-1][1] if samples else None,
            "prefix_cache_peak_bytes": max((cached for *_, cached in samples), default=None),
            "mib": [(at, round(rss / 2**20, 1), round(cached / 2**20, 1)) for at, rss, cached in samples]}

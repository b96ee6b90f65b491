"""Percentiles of measured times, one definition for every report: the nearest rank."""
from __future__ import annotations

import math
from collections.abc import Sequence


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 < q <= 100) of ``values`` by the nearest rank: the smallest value that at least q
    percent of them are at most (Hyndman and Fan 1996, definition 1), so that a lower q never gives a higher value.
    Raises ValueError for no values."""
    if not values:
        raise ValueError("no values have percentiles")
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def percentiles(prefix: str, millis: Sequence[float]) -> dict[str, float]:
    """``{prefix}p50_ms`` and ``{prefix}p95_ms`` of ``millis`` (``nearest_rank``), in milliseconds rounded to 0.01.
    Raises ValueError when ``millis`` is empty."""
    return {f"{prefix}p{q}_ms": round(nearest_rank(millis, q), 2) for q in (50, 95)}

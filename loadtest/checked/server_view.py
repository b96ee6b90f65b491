"""The server's own view of a load test: its ``/metrics`` scraped before and after, and what changed between
(DESIGN.md's metric names). An adapter's series go when it is unregistered, so what is counted per adapter (merges,
tokens, replies by status) misses what an adapter unregistered meanwhile (the churn) had counted."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset], float]


def scrape(http: httpx.Client) -> Samples:
    """``GET /metrics`` as {(sample name, frozenset(labels.items())): value}; httpx.HTTPStatusError unless a 200."""
    text = http.get("/metrics").raise_for_status().text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(value for (sample, held), value in samples.items() if sample == name and wanted <= held)


def increase(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much the counters ``name`` whose labels include ``labels`` rose between the scrapes, series by series: a
    series new since (or lower than before: its adapter was unregistered and registered again) counts whole, one
    gone since (its adapter unregistered) not at all."""
    wanted = set(labels.items())
    rises = [value - before.get((sample, held), 0.0) if value >= before.get((sample, held), 0.0) else value
             for (sample, held), value in after.items() if sample == name and wanted <= held]
    return sum(rises)


def bucket_bound(before: Samples, after: Samples, name: str, quantile: float) -> float | None:
    """The upper bound of the histogram bucket of ``name`` (its ``_bucket`` samples) that holds the ``quantile`` of
    the observations made between the scrapes: the quantile is at most this. None without observations; inf when
    it lies past the last finite bucket."""
    labels = {dict(held)["le"] for sample, held in after if sample == f"{name}_bucket"}
    bounds = sorted((float(le), increase(before, after, f"{name}_bucket", le=le))
                    for le in labels)
    if not bounds or bounds[-1][1] <= 0:
        return None
    return next(bound for bound, count in bounds if count >= quantile * bounds[-1][1])


def histogram(before: Samples, after: Samples, name: str, unit: float = 1.0) -> dict:
    """What a histogram saw between the scrapes: ``count``, ``mean``, and the bucket bounds that the median and the
    95th percentile are at most (``p50_at_most``, ``p95_at_most``), all times ``unit`` (1000: seconds to ms)."""
    count = increase(before, after, f"{name}_count")
    spent = increase(before, after, f"{name}_sum")
    bounds = {f"p{q}_at_most": bucket_bound(before, after, name, q / 100) for q in (50, 95)}
    return {"count": int(count), "mean": round(spent / count * unit, 3) if count else None,
            **{key: None if bound is None else bound * unit for key, bound in bounds.items()}}


def model_info(samples: Samples) -> dict[str, str] | None:
    """The labels of ``loraswap_model_info`` (base, device, dtype, quantize) in ``samples``; None where the server
    exports none (an older one)."""
    return next((dict(labels) for (sample, labels), value in samples.items()
                 if sample == "loraswap_model_info" and value == 1), None)


def server_view(before: Samples, after: Samples) -> dict:
    """The server's side of the run: its base model (``model_info``), queue wait (ms) and batch size (requests
    admitted together) histograms, adapters registered between the scrapes (``adapter_loads``: the run's own are
    registered before the first), merges and unmerges, resident adapters and resident memory (bytes) before and
    after, tokens generated, and the replies by status (the request-duration histogram's counts)."""
    def rise(name: str, **labels: str) -> int:
        return int(increase(before, after, name, **labels))

    duration = "loraswap_request_duration_seconds_count"
    statuses = sorted({dict(labels)["status"] for sample, labels in after if sample == duration})
    return {
        "model": model_info(after),
        "queue_wait_ms": histogram(before, after, "loraswap_queue_wait_seconds", 1000),
        "batch_size": histogram(before, after, "loraswap_batch_size"),
        "adapter_loads": rise("loraswap_adapter_load_seconds_count"),
        "merges": rise("loraswap_merge_switch_seconds_count", action="merge"),
        "unmerges": rise("loraswap_merge_switch_seconds_count", action="unmerge"),
        "resident_before": total(before, "loraswap_adapters_resident"),
        "resident_after": total(after, "loraswap_adapters_resident"),
        "rss_before_bytes": total(before, "process_resident_memory_bytes"),
        "rss_after_bytes": total(after, "process_resident_memory_bytes"),
        "generated_tokens": rise("loraswap_generated_tokens_total"),
        "replies_by_status": {status: count for status in statuses if (count := rise(duration, status=status))},
    }

"""Prometheus metrics (names per DESIGN.md; label values come only from registered adapters)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUEST_DURATION = Histogram(
    "loraswap_request_duration_seconds", "Time to answer an HTTP request", ["endpoint", "adapter", "status"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram("loraswap_queue_wait_seconds", "Time a request waited in the engine queue",
                       buckets=LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram("loraswap_time_to_first_token_seconds", "Time from queueing to the first token",
                                ["adapter"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("loraswap_batch_size", "Requests admitted together: a new batch, or requests joining a running one", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
GENERATED_TOKENS = Counter("loraswap_generated_tokens", "Tokens generated", ["adapter"])
ADAPTER_LOAD = Histogram("loraswap_adapter_load_seconds", "Time to read and check an adapter",
                         buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5))
MERGE_SWITCH = Histogram("loraswap_merge_switch_seconds", "Time the engine spent folding an adapter into the base "
                         "weights (action=merge) or restoring them (action=unmerge)", ["action", "adapter"],
                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
ADAPTERS_RESIDENT = Gauge("loraswap_adapters_resident", "Adapters held in device slots")
REQUESTS_IN_FLIGHT = Gauge("loraswap_requests_in_flight", "HTTP requests being served (probes and scrapes not counted)")

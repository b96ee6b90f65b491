"""Prometheus metrics (names per DESIGN.md; label values come only from registered adapters, and an adapter's series
go when it is unregistered).

The series live in prometheus_client's process-wide registry, as the server has one runtime per process. A process
that builds several (the tests) shares them: a name one runtime unregistered is recorded for none until that runtime
registers it again."""
from __future__ import annotations

import threading
from collections.abc import Callable, Collection

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

_lock = threading.Lock()  # orders series creation against series removal
# adapter -> the registered names now, for adapters unregistered since their series were removed
_unregistered: dict[str, Callable[[], Collection[str]]] = {}


class _Dropped:
    """The child ``labels`` gives for an unregistered adapter: what is recorded on it goes nowhere."""

    def observe(self, amount: float) -> None:
        pass

    def inc(self, amount: float = 1) -> None:
        pass


class _ByAdapter:
    """A metric with an ``adapter`` label whose series go with the adapter. A request still in flight when its adapter
    is unregistered records nothing afterwards: its series stay gone (until the name is registered again)."""

    def labels(self, *values: str, **labels: str):
        adapter = labels["adapter"] if labels else values[self._labelnames.index("adapter")]
        with _lock:
            if adapter in _unregistered:
                if adapter not in _unregistered[adapter]():
                    return _Dropped()
                del _unregistered[adapter]  # registered again
            return super().labels(*values, **labels)


class AdapterHistogram(_ByAdapter, Histogram):
    pass


class AdapterCounter(_ByAdapter, Counter):
    pass


REQUEST_DURATION = AdapterHistogram(
    "loraswap_request_duration_seconds", "Time to answer an HTTP request", ["endpoint", "adapter", "status"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram("loraswap_queue_wait_seconds", "Time a request waited in the engine queue",
                       buckets=LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = AdapterHistogram(
    "loraswap_time_to_first_token_seconds", "Time from queueing to the first token: for a streamed completion, to its "
    "first text handed out to the client (held-back text, e.g. a possible stop string, waits)", ["adapter"],
    buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("loraswap_batch_size",
                       "Requests admitted together: a new batch, or requests joining a running one",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
INTER_TOKEN_LATENCY = AdapterHistogram(
    "loraswap_inter_token_latency_seconds", "Time between two consecutive tokens of a streamed choice, as the engine "
    "picked them (its decoding steps, and the pauses in which requests join the batch)", ["adapter"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
GENERATED_TOKENS = AdapterCounter("loraswap_generated_tokens", "Tokens generated", ["adapter"])
ADAPTER_LOAD = Histogram("loraswap_adapter_load_seconds", "Time to read and check an adapter",
                         buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5))
MERGE_SWITCH = AdapterHistogram("loraswap_merge_switch_seconds", "Time the engine spent folding an adapter into the "
                                "base weights (action=merge) or restoring them (action=unmerge)", ["action", "adapter"],
                                buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
ADAPTERS_RESIDENT = Gauge("loraswap_adapters_resident", "Adapters held in device slots")
PREFIX_CACHE_QUERY_TOKENS = Counter(
    "loraswap_prefix_cache_query_tokens", "Prompt tokens of prefill passes while the prefix cache is on: every "
    "request's prompt, and each prefix that several prompts admitted together share (run once, in a pass of its own)")
PREFIX_CACHE_HIT_TOKENS = Counter("loraswap_prefix_cache_hit_tokens", "Prompt tokens of prefill passes whose keys and "
                                  "values came from the prefix cache; query tokens less these were computed")
PREFIX_CACHE_BYTES = Gauge("loraswap_prefix_cache_bytes", "Bytes of keys and values the prefix cache holds")
REQUESTS_IN_FLIGHT = Gauge("loraswap_requests_in_flight", "HTTP requests being served (probes and scrapes not counted)")
BY_ADAPTER = (REQUEST_DURATION, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, GENERATED_TOKENS, MERGE_SWITCH)


def forget_adapter(name: str, registered: Callable[[], Collection[str]]) -> None:
    """Remove every series of the adapter ``name``, once unregistered; ``registered()`` gives the names registered
    now, to tell when ``name`` is registered again (its series are then recorded anew)."""
    with _lock:
        _unregistered[name] = registered
        for metric in BY_ADAPTER:
            metric.remove_by_labels({"adapter": name})

"""Prometheus metrics (names per DESIGN.md; label values come only from registered adapters, and an adapter's series
go when it is unregistered).

The series live in prometheus_client's process-wide registry, as the server has one runtime per process. A process
that builds several (the tests) shares them: a name one runtime unregistered is recorded for none until that runtime
registers it again."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from service.lora.adapter_files import BASE_LABEL

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

_lock = threading.Lock()  # orders series creation against series removal
# adapter -> the registered names now, for adapters unregistered since their series were removed
_unregistered: dict[str, Callable[[], Collection[str]]] = {}


# the adapter label of what a request records once its adapter was unregistered (its series removed): no adapter's
# name can be it (a name is a plain identifier)
UNREGISTERED_LABEL = "(unregistered)"


class _ByAdapter:
    """A metric with an ``adapter`` label whose series go with the adapter. A request still in flight when its adapter
    is unregistered records what comes afterwards under ``UNREGISTERED_LABEL`` (its reply, a 404 where it still
    queued, counted once as every other): the adapter's own series stay gone (until the name is registered again)."""

    def labels(self, *values: str, **labels: str):
        given = dict(zip(self._labelnames, values)) if values else labels
        adapter = given["adapter"]
        with _lock:
            if adapter in _unregistered:
                if adapter not in _unregistered[adapter]():
                    return super().labels(**{**given, "adapter": UNREGISTERED_LABEL})
                del _unregistered[adapter]  # registered again
            return super().labels(**given)


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
    "loraswap_inter_token_latency_seconds", "Time between two consecutive tokens of a completion's choice, streamed "
    "or not (as vLLM's time_per_output_token), as the engine picked them (its decoding steps, and the pauses in which "
    "requests join the batch)", ["adapter"],
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
DRAFT_TOKENS = Counter("loraswap_draft_tokens", "Draft tokens decoding steps fed generations after their last token "
                       "(speculative decoding: the draft_tokens setting)")
ACCEPTED_DRAFT_TOKENS = Counter("loraswap_accepted_draft_tokens", "Draft tokens generations took (the token their own "
                                "strategy picked agreed): each saved a decoding step")
PREFIX_CACHE_BYTES = Gauge("loraswap_prefix_cache_bytes", "Bytes of keys and values the prefix cache holds")
# an info metric (Prometheus' *_info convention, as vLLM's cache_config_info): one series of value 1
MODEL_INFO = Gauge("loraswap_model_info", "1 for the base model the server computes with: its name (base: the "
                   "embedded one's, or its folder's, never the path), its device, the dtype it computes in and its "
                   "quantization", ["base", "device", "dtype", "quantize"])
REQUESTS_IN_FLIGHT = Gauge("loraswap_requests_in_flight", "HTTP requests being served (probes and scrapes not counted)")
BY_ADAPTER = (REQUEST_DURATION, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, GENERATED_TOKENS, MERGE_SWITCH)


def describe_model(base: str, device: str, dtype: str, quantize: str) -> None:
    """Make ``loraswap_model_info`` the one series of these labels: a runtime built before in the process (the tests
    build several) leaves none of its own. ``base`` is a name, not a path (``/metrics`` needs no key, and paths are
    shown to the admin key alone); ``dtype`` as torch names it without ``torch.``, e.g. ``bfloat16``."""
    MODEL_INFO.clear()
    MODEL_INFO.labels(base=base, device=device, dtype=dtype, quantize=quantize).set(1)


def forget_adapter(name: str, registered: Callable[[], Collection[str]]) -> None:
    """Remove every series of the adapter ``name``, once unregistered; ``registered()`` gives the names registered
    now, to tell when ``name`` is registered again (its series are then recorded anew)."""
    with _lock:
        _unregistered[name] = registered
        for metric in BY_ADAPTER:
            metric.remove_by_labels({"adapter": name})


# The name the Kubernetes Gateway API Inference Extension reads LoRA state under by default (its --lora-info-metric):
# vLLM's, so that an extension deployed with its defaults routes to loraswap with LoRA affinity.
LORA_REQUESTS_INFO = "vllm:lora_requests_info"
LORA_INFO_LABELS = ("running_lora_adapters", "waiting_lora_adapters", "max_lora")
ENGINE_GAUGES = {  # name -> (help, label names)
    "loraswap_requests_running": ("Requests in the engine's running batch (generating, or being scored)", ()),
    "loraswap_requests_waiting": ("Requests queued for the engine", ()),
    "loraswap_adapter_requests_running": ("Requests in the engine's running batch, by adapter", ("adapter",)),
    "loraswap_adapter_requests_waiting": ("Requests queued for the engine, by adapter", ("adapter",)),
    "loraswap_adapter_resident": ("1 while the adapter is served without a load (in a device slot, or merged into "
                                  "the base weights), else 0", ("adapter",)),
    "loraswap_adapter_merged": ("1 while the adapter is merged into the base weights, else 0", ("adapter",)),
    LORA_REQUESTS_INFO: ("vLLM's LoRA gauge, as the Gateway API Inference Extension reads it: the adapters with "
                         "running and with waiting requests (names joined by commas) and max_lora, the device slots; "
                         "the value is the scrape's Unix time (s), the newest series", LORA_INFO_LABELS),
}


class EngineState:
    """A collector of the gauges of ``ENGINE_GAUGES``, read at each scrape from the engine and the adapter registry last
    ``watch``ed (the server's; in a process that builds several runtimes, the last one built). ``adapter`` labels are
    the registered names and ``none`` (the bare base, for requests only): an adapter's series are gone at the first
    scrape after it is unregistered. ``vllm:lora_requests_info`` is one series, its labels the state now."""

    def __init__(self) -> None:
        self._watched = None

    def watch(self, engine, registry) -> None:
        """Read ``engine.requests_by_adapter()`` and ``registry.describe()`` / ``registry.max_resident`` from now on."""
        self._watched = (engine, registry)

    def describe(self) -> list[GaugeMetricFamily]:
        return list(_families().values())

    def collect(self) -> list[GaugeMetricFamily]:
        families = _families()
        if self._watched is not None:
            _fill(families, *self._watched)
        return list(families.values())


def _families() -> dict[str, GaugeMetricFamily]:
    return {name: GaugeMetricFamily(name, text, labels=labels) for name, (text, labels) in ENGINE_GAUGES.items()}


def _fill(families: dict[str, GaugeMetricFamily], engine, registry) -> None:
    running, waiting = engine.requests_by_adapter()
    states = {adapter["name"]: adapter["state"] for adapter in registry.describe()}
    names = sorted(states)
    families["loraswap_requests_running"].add_metric([], sum(running.values()))
    families["loraswap_requests_waiting"].add_metric([], sum(waiting.values()))
    for name, label in [(None, BASE_LABEL), *zip(names, names)]:
        families["loraswap_adapter_requests_running"].add_metric([label], running.get(name, 0))
        families["loraswap_adapter_requests_waiting"].add_metric([label], waiting.get(name, 0))
    for name, state in states.items():
        families["loraswap_adapter_resident"].add_metric([name], state in ("resident", "merged"))
        families["loraswap_adapter_merged"].add_metric([name], state == "merged")
    lora_info = [_joined(running, names), _joined(waiting, names), str(registry.max_resident)]
    families[LORA_REQUESTS_INFO].add_metric(lora_info, time.time())


def _joined(requests: Mapping[str | None, int], names: list[str]) -> str:
    """The registered ``names`` with requests, joined by commas (vLLM's format; adapter names hold no comma)."""
    return ",".join(name for name in names if requests.get(name, 0))


ENGINE_STATE = EngineState()
REGISTRY.register(ENGINE_STATE)

"""One load test from start to end: derive and register the adapters, make the answer key, scrape /metrics, run the
locust users for the duration, scrape again, check that the server answers normally once the load is gone, then
unregister the adapters and report. ``run_load`` is the library entry (a soak can run the churn scenario for longer
and add users of its own)."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gevent
import httpx
from locust import User
from locust.env import Environment

from loadtest.checked.adapters import derived_adapters, register, source_path
from loadtest.checked.answer_key import AnswerKey, reference_pass
from loadtest.checked.asks import asks
from loadtest.checked.cycles import register_cycles
from loadtest.checked.memory import MemoryWatch, flatness
from loadtest.checked.report import Record, examples, grouped, summary
from loadtest.checked.scenarios import SCENARIOS, Scenario
from loadtest.checked.server_view import scrape, server_view
from loadtest.checked.storm import Storm
from loadtest.checked.traffic import Absences, Churn, Traffic, sent_alone
from loadtest.checked.users import clock_user, storm_user, traffic_user
from loadtest.endpoints import bearer

log = logging.getLogger("loraswap.loadtest")
ADMIN_ACTIONS_OK = ("register 201", "unregister 200")


@dataclass(frozen=True)
class LoadConfig:
    """What a load test does (the options of ``loraswap loadtest``, ``options.add_loadtest_options``, say more):
    ``scenario`` (a name of SCENARIOS), ``users``, ``duration_s``, the server's URL ``host``, its ``admin_key`` and
    ``api_key`` (None: none), ``adapter_root`` (a folder the server loads adapters from), the adapter ``source``
    (None: the first registered), ``adapters`` and ``prompts`` (None: the scenario's defaults), the SQuAD file and the
    NLI file with the MNLI splits kept, and the knobs of the derived adapters, the churn, timeouts and checks."""

    scenario: str
    users: int
    duration_s: float
    host: str
    admin_key: str
    adapter_root: Path
    squad: Path
    nli: tuple[Path, tuple[str, ...] | None]
    api_key: str | None = None
    source: str | None = None
    adapters: int | None = None
    prompts: int | None = None
    new_tokens: int = 8
    rank: int = 4
    kinds: tuple[str, ...] = ("q_proj", "v_proj", "c_attn")
    spread: float = 32.0
    seed: int = 0
    churn_interval_s: float = 1.0
    timeout_s: float = 60.0
    tolerance: float = 1e-3
    recovery: int = 6
    storm_clients: int = 200
    hang_up_s: float = 2.0
    warmup_s: float | None = None
    max_rss_growth: float = 0.05
    register_cycles: int = 0
    memory_interval_s: float = 1.0

    @property
    def plan(self) -> Scenario:
        return SCENARIOS[self.scenario]

    def warmup(self) -> float:
        """Seconds of warm-up before memory must stay flat: ``warmup_s``, else a fifth of the load."""
        return self.duration_s / 5 if self.warmup_s is None else self.warmup_s

    def adapter_count(self) -> int:
        return self.adapters or self.plan.adapters

    def prompt_count(self) -> int:
        """Distinct requests per adapter: ``prompts``, else 24 / adapters, at least 3 (one per endpoint)."""
        return self.prompts or max(3, 24 // self.adapter_count())


def run_load(config: LoadConfig, extra_users: Sequence[type[User]] = ()) -> dict:
    """Run the load test ``config`` describes (``extra_users``: more locust user classes to run beside the traffic)
    and return its report: the figures of ``report.summary`` overall, ``by_endpoint`` and ``by_adapter``, with the
    ``settings``, the load's ``seconds``, the ``reference`` pass, the churn's ``admin`` calls, the ``recovery``
    requests sent alone after the load (with their own ``wrong_examples``), the ``server``'s view, the ``memory``
    sampled during the load (``flatness``),
    the ``storm`` (a scenario with one, else None), the ``register_cycles`` (None without) and ``wrong_examples``.
    Raises FileNotFoundError without the data, ValueError without an adapter to derive from,
    answer_key.ReferenceFailed when the reference pass gets no answer, httpx errors when the server refuses the admin
    calls."""
    requests = asks(config.squad, config.nli, config.prompt_count(), config.new_tokens)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request of the reference pass
    with httpx.Client(base_url=config.host, timeout=config.timeout_s, headers=bearer(config.api_key)) as http, \
            httpx.Client(base_url=config.host, timeout=config.timeout_s, headers=bearer(config.admin_key)) as admin:
        source = source_path(admin, config.source)
        with derived_adapters(admin, source, config.adapter_root, config.scenario, config.adapter_count(),
                              seed=config.seed, rank=config.rank, kinds=config.kinds, spread=config.spread) as folders:
            log.info("%d adapters derived from %s; reference pass: %d requests alone", len(folders), source,
                     len(folders) * len(requests))
            key = reference_pass(http, list(folders), requests, config.tolerance)
            log.info("reference pass done in %.1f s: %.1f %% of the answers tell their adapter apart", key.seconds,
                     100 * key.distinct_fraction())
            before = scrape(http)
            ran = load(config, key, folders, extra_users)
            after = scrape(http)
            if ran.churn is not None and ran.churn.away is not None:
                register(admin, ran.churn.away, folders[ran.churn.away])
            recovery = recover(http, key, config.recovery)
            cycles = (register_cycles(admin, http, key, *next(iter(folders.items())), config.register_cycles,
                                      config.max_rss_growth) if config.register_cycles else None)
    records, seconds = ran.traffic.records, ran.seconds
    return {"scenario": config.scenario, "settings": settings(config), "seconds": round(seconds, 2),
            **summary(records, seconds), "by_endpoint": grouped(records, seconds, "endpoint"),
            "by_adapter": grouped(records, seconds, "adapter"),
            "reference": {"requests": len(key.expected), "seconds": round(key.seconds, 2),
                          "distinct_fraction": round(key.distinct_fraction(), 4)},
            "admin": admin_calls(ran.churn),
            "recovery": {**summary(recovery, 0), "wrong_examples": examples(recovery, key.expected)},
            "server": server_view(before, after),
            "memory": flatness(ran.memory.samples, config.warmup(), config.max_rss_growth),
            "storm": ran.storm.report() if ran.storm is not None else None, "register_cycles": cycles,
            "locust": ran.totals, "wrong_examples": examples(records, key.expected)}


@dataclass
class Load:
    """What ran under load: the ``traffic``, the ``churn`` and the ``storm`` (None without), the ``memory`` watch,
    the ``seconds`` the load lasted, its stop included, and locust's own ``totals`` (every user's requests)."""

    traffic: Traffic
    churn: Churn | None
    storm: Storm | None
    memory: MemoryWatch
    seconds: float
    totals: dict


def load(config: LoadConfig, key: AnswerKey, folders: dict[str, Path], extra_users: Sequence[type[User]]) -> Load:
    """Run the traffic (and the churn, the storm) for ``config.duration_s`` seconds with locust, the server's memory
    sampled every ``memory_interval_s``, then stop, each user ending the request it has out (so that every request
    sent is graded)."""
    absences = Absences()
    traffic = Traffic(key, config.plan.weights(len(key.adapters)), bearer(config.api_key), absences)
    memory = MemoryWatch()
    classes = [traffic_user(traffic, config.host, config.plan.wait_s, config.timeout_s),
               clock_user("MemoryUser", memory, config.host, config.memory_interval_s, config.timeout_s), *extra_users]
    churn = Churn(folders, bearer(config.admin_key), absences) if config.plan.churn else None
    if churn is not None:
        classes.append(clock_user("ChurnUser", churn, config.host, config.churn_interval_s, config.timeout_s))
    storm = (Storm(config.host, key.asks, key.adapters, bearer(config.api_key), config.hang_up_s)
             if config.plan.storm else None)
    if storm is not None:
        classes.append(storm_user(storm, config.host, config.storm_clients))
    environment = Environment(user_classes=classes, host=config.host, stop_timeout=config.timeout_s)
    runner = environment.create_local_runner()
    users = config.users + sum(getattr(cls, "fixed_count", 0) for cls in classes)
    memory.started = started = time.perf_counter()
    runner.start(users, spawn_rate=users)
    gevent.sleep(config.duration_s)
    runner.quit()
    seconds = time.perf_counter() - started
    totals = environment.stats.total
    return Load(traffic, churn, storm, memory, seconds,
                {"requests": totals.num_requests, "failures": totals.num_failures})


def recover(http: httpx.Client, key: AnswerKey, count: int) -> list[Record]:
    """Send ``count`` requests of the answer key alone, one at a time (adapters and requests in turn), once the load
    is gone; each must get its right answer."""
    return [sent_alone(http, key, key.adapters[i % len(key.adapters)], i % len(key.asks)) for i in range(count)]


def admin_calls(churn: Churn | None) -> dict:
    """The churn's admin calls by action and status, and how many failed (none without a churn)."""
    calls = churn.calls if churn is not None else {}
    return {"calls": calls, "failures": sum(n for call, n in calls.items() if call not in ADMIN_ACTIONS_OK)}


def settings(config: LoadConfig) -> dict:
    """The settings of the run, for the report (no keys)."""
    return {"users": config.users, "duration_s": config.duration_s, "host": config.host,
            "adapters": config.adapter_count(), "prompts": config.prompt_count(), "new_tokens": config.new_tokens,
            "wait_s": list(config.plan.wait_s), "rank": config.rank, "kinds": list(config.kinds),
            "spread": config.spread, "seed": config.seed, "source": config.source, "tolerance": config.tolerance,
            "timeout_s": config.timeout_s, "squad": str(config.squad), "nli": str(config.nli[0]),
            "churn_interval_s": config.churn_interval_s if config.plan.churn else None,
            "storm_clients": config.storm_clients if config.plan.storm else None, "hang_up_s": config.hang_up_s,
            "warmup_s": config.warmup(), "max_rss_growth": config.max_rss_growth,
            "register_cycles": config.register_cycles}

"""The figures of a load test, from its records (``Record``, one per request): counts by outcome, requests/s and latency
percentiles, overall and per endpoint and per adapter, and a markdown table of them."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from loadtest.checked.answer_key import FAILED, FINE, GONE, OK, OUTCOMES, REJECTED, SERVER_ERROR, WRONG, WRONG_ADAPTER
from loadtest.percentiles import nearest_rank

EXAMPLES = 10  # wrong replies kept in the report, with the answer they should have been


@dataclass
class Record:
    """One request: its ``endpoint``, ``adapter`` and request ``index`` (in the answer key), the ``status`` (0: no
    reply), its ``outcome`` (``answer_key.OUTCOMES``), ``latency_ms``, and for an answer that was not right, what
    came (``got``)."""

    endpoint: str
    adapter: str
    index: int
    status: int
    outcome: str
    latency_ms: float
    got: dict | str | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0 < q <= 100) of ``values`` by the nearest rank, rounded to 0.1; None for no
    values."""
    return round(nearest_rank(values, q), 1) if values else None


def summary(records: Sequence[Record], seconds: float) -> dict:
    """The figures of ``records`` over a load of ``seconds``: ``requests``; ``failures`` (every outcome but ok, 429
    and a 404 for an adapter away: wrong answers, 5xx, no reply, any other status); ``wrong`` (a 200 with the wrong
    answer), of which ``wrong_adapter`` (another adapter's); ``server_errors`` (5xx); ``rejected_429``; ``gone_404``;
    ``no_reply``; ``rps`` (requests/s) and ``answered_rps`` (right answers/s); the latency of the 200 replies,
    ``p50_ms``, ``p95_ms``, ``p99_ms``; and the most a 429 took, ``rejected_429_max_ms``."""
    counts = {outcome: sum(r.outcome == outcome for r in records) for outcome in OUTCOMES}
    answered = [r.latency_ms for r in records if r.status == 200]
    rejected = [r.latency_ms for r in records if r.outcome == REJECTED]
    return {
        "requests": len(records),
        "ok": counts[OK],
        "failures": sum(count for outcome, count in counts.items() if outcome not in FINE),
        "wrong": counts[WRONG] + counts[WRONG_ADAPTER],
        "wrong_adapter": counts[WRONG_ADAPTER],
        "server_errors": counts[SERVER_ERROR],
        "rejected_429": counts[REJECTED],
        "gone_404": counts[GONE],
        "other_failures": counts[FAILED],
        "no_reply": sum(r.status == 0 for r in records),
        "rps": round(len(records) / seconds, 2) if seconds else None,
        "answered_rps": round(counts[OK] / seconds, 2) if seconds else None,
        **{f"p{q}_ms": percentile(answered, q) for q in (50, 95, 99)},
        "rejected_429_max_ms": percentile(rejected, 100),
    }


def grouped(records: Sequence[Record], seconds: float, field: str) -> dict[str, dict]:
    """``summary`` of the records of each value of ``field`` (``endpoint`` or ``adapter``)."""
    values = sorted({getattr(r, field) for r in records})
    return {value: summary([r for r in records if getattr(r, field) == value], seconds) for value in values}


def examples(records: Sequence[Record], expected: dict[tuple[str, int], dict]) -> list[dict]:
    """The first EXAMPLES requests that got a wrong answer: what came and what was right."""
    wrong = [r for r in records if r.outcome in (WRONG, WRONG_ADAPTER)][:EXAMPLES]
    return [{"endpoint": r.endpoint, "adapter": r.adapter, "request": r.index, "outcome": r.outcome, "got": r.got,
             "expected": expected[(r.adapter, r.index)]} for r in wrong]


COLUMNS = ("requests", "failures", "wrong", "server_errors", "rejected_429", "gone_404", "rps", "p50_ms", "p95_ms",
           "p99_ms")


def markdown(report: dict) -> str:
    """The report's figures as a markdown table: a row overall, one per endpoint, one per adapter (at most 20: the
    busiest), then the recovery requests sent alone after the load; then the wrong answers of each phase
    (``wrong_lines``)."""
    rows = [("all", report)] + [(f"`{name}`", figures) for name, figures in report["by_endpoint"].items()]
    busiest = sorted(report["by_adapter"].items(), key=lambda item: -item[1]["requests"])[:20]
    rows += [(f"`{name}`", figures) for name, figures in busiest] + [("recovery", report["recovery"])]
    lines = [f"scenario `{report['scenario']}`, {report['settings']['users']} users, {report['seconds']} s",
             "", "| | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join("" if figures[c] is None else str(figures[c]) for c in COLUMNS) + " |"
              for label, figures in rows]
    lines += wrong_lines("under load", report["wrong_examples"])
    lines += wrong_lines("in recovery", report["recovery"]["wrong_examples"])
    extra = [memory_line(report["memory"]), storm_line(report["storm"]), cycles_line(report["register_cycles"])]
    server = [server_lines(report["server"]), model_line(report["server"]["model"])]
    return "\n".join([*lines, "", *[line for line in server + extra if line]]) + "\n"


def wrong_lines(phase: str, wrong: list[dict]) -> list[str]:
    """The wrong answers of a ``phase`` (``examples``), a line each: the request, what came, what was right; none
    where every answer was right."""
    if not wrong:
        return []
    return ["", f"Wrong answers {phase} (the first {len(wrong)}):"] + [
        f"- `{example['adapter']}` {example['endpoint']} request {example['request']} ({example['outcome']}): got "
        f"{json.dumps(example['got'])}, expected {json.dumps(example['expected'])}" for example in wrong]


def memory_line(memory: dict) -> str:
    """The server's memory during the load (``memory.flatness``) in one line."""
    if memory["growth"] is None:
        return f"Memory: {memory['samples']} samples, too few to compare the warm-up with what followed."
    mib = 2 ** 20
    return (f"Memory outside the prefix cache: peak {memory['warmup_peak_bytes'] / mib:.0f} MiB in the first "
            f"{memory['warmup_s']:g} s, {memory['peak_after_bytes'] / mib:.0f} MiB after "
            f"({100 * memory['growth']:+.1f} %). Resident: peak {memory['rss_warmup_peak_bytes'] / mib:.0f} MiB, then "
            f"{memory['rss_peak_after_bytes'] / mib:.0f} MiB, {memory['rss_last_bytes'] / mib:.0f} MiB at the end; "
            f"prefix cache up to {memory['prefix_cache_peak_bytes'] / mib:.0f} MiB; {memory['samples']} samples.")


def storm_line(storm: dict | None) -> str | None:
    """The disconnect storm's figures in one line (None without a storm)."""
    if storm is None:
        return None
    return (f"Storm: hang-ups {storm['hang_ups']}, status lines seen first {storm['statuses_seen']}, connections "
            f"refused or reset {storm['connection_errors']}, 5xx {storm['server_errors']}.")


def cycles_line(cycles: dict | None) -> str | None:
    """The register cycles' figures in one line (None without)."""
    if cycles is None:
        return None
    mib = 2 ** 20
    growth = "?" if cycles["growth"] is None else f"{100 * cycles['growth']:+.1f} %"
    return (f"Register cycles: {cycles['cycles']} in {cycles['seconds']} s; memory "
            f"{(cycles['baseline_bytes'] or 0) / mib:.0f} MiB after {cycles['warmup_cycles']}, "
            f"{(cycles['end_bytes'] or 0) / mib:.0f} MiB after all ({growth}); requests {cycles['checks']['ok']} of "
            f"{cycles['checks']['requests']} right.")


def server_lines(view: dict) -> str:
    """The server's view (``server_view.server_view``) in one paragraph."""
    wait, batch = view["queue_wait_ms"], view["batch_size"]
    mib = 2 ** 20
    return (f"Server (/metrics, before and after): queue wait mean {wait['mean']} ms (p95 at most {wait['p95_at_most']}"
            f" ms) over {wait['count']} requests; batch size mean {batch['mean']} over {batch['count']} admissions; "
            f"{view['adapter_loads']} adapters registered during the load (the run's own were before it), "
            f"{view['merges']} merges, {view['unmerges']} unmerges; "
            f"resident adapters {view['resident_before']:g} -> {view['resident_after']:g}; resident memory "
            f"{view['rss_before_bytes'] / mib:.0f} -> {view['rss_after_bytes'] / mib:.0f} MiB.")


def model_line(model: dict[str, str] | None) -> str | None:
    """The server's base model (``server_view.model_info``) in one line, with what its dtype means for the check:
    the reference pass's answers are exact in float32 only (None where the server does not say)."""
    if model is None:
        return None
    line = (f"Model: {model['base']} on {model['device']}, computing in {model['dtype']}"
            f"{'' if model['quantize'] == 'none' else ', weights in ' + model['quantize']}.")
    if model["dtype"] == "float32":
        return line
    return (f"{line} In {model['dtype']} an answer moves with its batch and the prefix cache at that dtype's rounding "
            "(docs/benchmarks.md: NF4 on an H200), and this check counts such moves as wrong; serve with --dtype "
            "float32 for answers the reference pass's exactly.")


def failed_checks(report: dict) -> list[str]:
    """The checks ``report`` (``run_load``'s) failed: requests not answered right or fairly refused, failed admin
    calls, recovery requests not answered right, 5xx seen by the storm, memory that grew past the bound after the
    warm-up, or too few samples to tell (scenarios with a storm), or over the register cycles (or their requests not
    answered right)."""
    storm, cycles = report["storm"], report["register_cycles"]
    failed = {"requests": report["failures"], "admin calls": report["admin"]["failures"],
              "recovery": report["recovery"]["failures"], "storm 5xx": storm and storm["server_errors"],
              "memory after warm-up": storm is not None and report["memory"]["flat"] is not True,  # None: unchecked
              "register cycles memory": cycles is not None and cycles["flat"] is False,
              "register cycles requests": cycles and cycles["checks"]["failures"]}
    return [name for name, failure in failed.items() if failure]

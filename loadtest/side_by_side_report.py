"""Scoring and reporting for the side-by-side comparison (``loadtest.side_by_side``): EM/F1 and NLI accuracy of one
load's replies, each system's figures per load over the rounds, and the markdown tables of ``docs/benchmarks.md``.
Pure: no HTTP, no clock."""
from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence

from loadtest.percentiles import nearest_rank
from loadtest.workload import Item
from training.metrics import accuracy, squad_scores

GB = 1e9
TIMING_FIELDS = ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms")  # llama.cpp's, averaged per request


def score(items: Sequence[Item], texts: Sequence[str]) -> dict:
    """EM and F1 (percent, the official SQuAD v1.1 scoring of ``training.metrics``) over the questions among
    ``items``, and the accuracy (percent) over the NLI pairs, of the replies ``texts`` (one per item, in order), with
    how many of each there were. Raises ValueError when the two differ in length."""
    if len(items) != len(texts):
        raise ValueError(f"{len(texts)} replies for {len(items)} requests")
    questions = [(str(i), item, text) for i, (item, text) in enumerate(zip(items, texts)) if item.task == "squad"]
    pairs = [(item.references[0], text) for item, text in zip(items, texts) if item.task == "nli"]
    squad = squad_scores({i: text for i, _, text in questions}, {i: list(item.references) for i, item, _ in questions})
    return {"squad_count": len(questions), "exact_match": round(squad["exact_match"], 2), "f1": round(squad["f1"], 2),
            "nli_count": len(pairs),
            "nli_accuracy": round(accuracy([t for _, t in pairs], [g for g, _ in pairs]), 2) if pairs else None}


def load_name(mode: str, clients: int) -> str:
    """How a load is named in the tables: ``squad, 1 client``, ``mixed, 8 clients``."""
    return f"{mode}, {clients} client{'s' if clients != 1 else ''}"


def summarize(records: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """Each system's figures per load, ``{system: {load name: figures}}``, from the records of single loads (the
    keys ``run`` writes: system, mode, clients, requests_per_s, latencies_ms, scores, answers, peak_rss_bytes,
    rss_before_bytes and, for llama.cpp, timings). Figures: requests/s of each round in order, p50/p95 latency
    over all rounds (ms), the first round's scores, whether the rounds that asked the same questions (the same
    ``question_set``, 0 where absent) gave the same answers, the peak RSS over
    the rounds (bytes, the loads' and the server's start; None without a process id), and llama.cpp's timings
    averaged per request."""
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        grouped[record["system"], load_name(record["mode"], record["clients"])].append(record)
    summary: dict[str, dict[str, dict]] = defaultdict(dict)
    for (system, load), runs in grouped.items():
        latencies = [ms for run in runs for ms in run["latencies_ms"]]
        figures = {"requests_per_s": [run["requests_per_s"] for run in runs],
                   "p50_ms": round(nearest_rank(latencies, 50), 1), "p95_ms": round(nearest_rank(latencies, 95), 1),
                   "scores": runs[0]["scores"],
                   "same_answers": same_answers(runs),
                   "peak_rss_bytes": peak_rss(runs)}
        timings = [t for run in runs for t in run.get("timings") or ()]
        if timings:
            figures["timings"] = {key: round(statistics.fmean(t[key] for t in timings), 2) for key in TIMING_FIELDS}
        summary[system][load] = figures
    return dict(summary)


def same_answers(runs: Sequence[dict]) -> bool:
    """Whether every run gave the answers of the first run that asked the same questions (``question_set``)."""
    first: dict[int, list[str]] = {}
    return all(first.setdefault(run.get("question_set", 0), run["answers"]) == run["answers"] for run in runs)


def peak_rss(runs: Sequence[dict]) -> int | None:
    """The highest resident set (bytes) of the server over ``runs``, its start included; None when it was not
    watched (no process id)."""
    peaks = [max(run["peak_rss_bytes"], run["rss_before_bytes"]) for run in runs if run["peak_rss_bytes"] is not None]
    return max(peaks, default=None)


def ratio(summary: dict, system: str, baseline: str, load: str) -> float:
    """Mean requests/s of ``system`` over ``baseline``'s on ``load``."""
    return statistics.fmean(summary[system][load]["requests_per_s"]) / statistics.fmean(
        summary[baseline][load]["requests_per_s"])


def row(cells: Sequence[object]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def throughput_table(summary: dict, systems: Sequence[str], baseline: str, loads: Sequence[str]) -> list[str]:
    """Requests/s of each round, each system's ratio over ``baseline``, peak RSS and answer quality, as markdown
    lines: a row per load, a column per system, then one per ratio."""
    others = [s for s in systems if s != baseline]
    lines = [row(["requests/s", *systems, *(f"{s} / {baseline}" for s in others)]),
             row(["---", *["---:"] * (len(systems) + len(others))])]
    for load in loads:
        rates = [", ".join(f"{r:.2f}" for r in summary[s][load]["requests_per_s"]) for s in systems]
        lines.append(row([load, *rates, *(f"{ratio(summary, s, baseline, load):.2f}x" for s in others)]))
    peaks = {s: max(summary[s][load]["peak_rss_bytes"] or 0 for load in loads) for s in systems}  # 0: unknown
    lines.append(row(["peak RSS", *(f"{peaks[s] / GB:.2f} GB" if peaks[s] else "n/a" for s in systems),
                      *(f"{peaks[s] / peaks[baseline]:.2f}x" if peaks[s] and peaks[baseline] else "n/a"
                        for s in others)]))
    for load in loads:
        quality = [quality_cell(summary[s][load]) for s in systems]
        lines.append(row([f"EM / F1 ({load})", *quality, *[""] * len(others)]))
    return lines


def quality_cell(figures: dict) -> str:
    """``EM / F1`` (and NLI accuracy where there were pairs), marked when the rounds' answers differed."""
    scores = figures["scores"]
    cell = f"{scores['exact_match']:.1f} / {scores['f1']:.1f}"
    if scores["nli_accuracy"] is not None:
        cell += f", NLI {scores['nli_accuracy']:.1f}%"
    return cell if figures["same_answers"] else cell + " (answers differ by round)"


def latency_table(summary: dict, systems: Sequence[str], loads: Sequence[str]) -> list[str]:
    """p50 / p95 latency (ms) per load and system, as markdown lines."""
    lines = [row(["latency p50 / p95 (ms)", *systems]), row(["---", *["---:"] * len(systems)])]
    for load in loads:
        lines.append(row([load, *(f"{summary[s][load]['p50_ms']:.0f} / {summary[s][load]['p95_ms']:.0f}"
                                   for s in systems)]))
    return lines


def timings_table(summary: dict, loads: Sequence[str]) -> list[str]:
    """llama.cpp's own per-request timings (mean prompt tokens and ms, generated tokens and ms) for each system
    that reported them, as markdown lines; none when no system did."""
    lines = []
    for system, per_load in summary.items():
        for load in loads:
            timings = per_load.get(load, {}).get("timings")
            if timings:
                lines.append(row([system, load, *(timings[key] for key in TIMING_FIELDS)]))
    if not lines:
        return []
    return [row(["server's timings, mean per request", "load", *TIMING_FIELDS]), row(["---", "---", *["---:"] * 4]),
            *lines]


def markdown(summary: dict, systems: Sequence[str], baseline: str) -> str:
    """The comparison's tables (throughput and quality, latency, llama.cpp's timings) as markdown. Raises KeyError
    when a system lacks a load another has."""
    loads = list(summary[systems[0]])
    tables = [throughput_table(summary, systems, baseline, loads), latency_table(summary, systems, loads),
              timings_table(summary, loads)]
    return "\n\n".join("\n".join(table) for table in tables if table) + "\n"

"""Profile a running loraswap server's ``/answer`` path: send the first SQuAD dev questions (as
``loadtest.side_by_side`` does; with ``--fresh-questions`` new ones for each load) at each number of clients while
py-spy samples the server's Python stacks, then report where each thread's time went (``loadtest.stack_shares``), as
shares and as milliseconds per request.

    pip install py-spy   # into any environment: it only needs to be on PATH or given with --py-spy
    loraswap serve & server=$!
    python -m loadtest.profile_answer --pid $server --clients 1,8 --questions 48 --out OUT_DIR

py-spy reads the server's memory (ptrace: root, or the server's owner with ptrace allowed); it samples without
pausing the server (``--nonblocking``) and counts idle samples too, so that the engine thread's shares add up to the
load's wall time. Writes OUT_DIR/stacks_<clients>.txt (py-spy raw stacks) and OUT_DIR/profile.json; prints a
markdown table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.endpoints import Loraswap
from loadtest.side_by_side import run_load
from loadtest.side_by_side_report import row
from loadtest.stack_shares import ENGINE, EVENT_LOOP, parse_raw, shares, stage_of
from loadtest.workload import MODES, workload, workloads
from service.cli.command import UsageError, comma_list, input_path, positive, report_folder, server_url
from service.cli.main import BriefErrors
from training.data import data_dir, naming_default_data

ATTACH_S = 1.0  # time py-spy is given to attach before the load starts
WARMUP = 8  # unprofiled requests sent first, all at once


def generated_tokens(url: str) -> float:
    """``loraswap_generated_tokens_total`` over every adapter, from the server's /metrics."""
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text)
    return sum(sample.value for family in families if family.name == "loraswap_generated_tokens"
               for sample in family.samples if sample.name.endswith("_total"))


def profiled_load(args: argparse.Namespace, clients: int, items: list) -> dict:
    """One load of ``items`` at ``clients`` clients under py-spy; returns its seconds, requests, generated tokens
    and samples per category per thread, and keeps the raw stacks in ``args.out``. Raises RuntimeError when py-spy
    fails, httpx errors when a request does."""
    raw = args.out / f"stacks_{clients}.txt"
    command = [args.py_spy, "record", "--pid", str(args.pid), "--rate", str(args.rate), "--format", "raw",
               "--nonblocking", "--idle", "--output", str(raw)]
    spy = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(ATTACH_S)
    tokens_before = generated_tokens(args.url)
    result = run_load(Loraswap(args.url), items, clients)
    tokens = generated_tokens(args.url) - tokens_before
    spy.send_signal(signal.SIGINT)
    output, _ = spy.communicate(timeout=120)
    if not raw.is_file():
        raise RuntimeError(f"py-spy wrote no stacks ({' '.join(command)}): {output[-2000:]}")
    return {"clients": clients, "seconds": result["seconds"], "requests": len(items), "generated_tokens": tokens,
            "samples": shares(parse_raw(raw.read_text().splitlines()))}


def per_request_ms(load: dict, thread: str) -> dict[str, float]:
    """Each category of ``thread`` as wall milliseconds per request: its share of the thread's samples times the
    load's seconds, over the requests."""
    counts = load["samples"].get(thread, {})
    total = sum(counts.values()) or 1
    return {category: 1000 * load["seconds"] * n / total / load["requests"] for category, n in counts.items()}


def by_stage(ms: dict[str, float]) -> dict[str, float]:
    """Milliseconds per category summed by stage (``stage_of``): all of prefill, all of the decoding steps, ..."""
    totals: dict[str, float] = {}
    for category, value in ms.items():
        totals[stage_of(category)] = totals.get(stage_of(category), 0.0) + value
    return totals


def breakdown_table(loads: list[dict], thread: str, stages: bool = False) -> list[str]:
    """Markdown lines: a row per category of ``thread`` (or, with ``stages``, per stage: ``by_stage``), with its
    share of the thread's time and milliseconds per request at each load, largest first (by the last load)."""
    ms = [per_request_ms(load, thread) for load in loads]
    if stages:
        ms = [by_stage(m) for m in ms]
    categories = sorted({c for m in ms for c in m}, key=lambda c: -ms[-1].get(c, 0.0))
    head = [f"{thread}", *(f"{load['clients']} client(s): share, ms/request" for load in loads)]
    lines = [row(head), row(["---", *["---:"] * len(loads)])]
    for category in categories:
        cells = []
        for m in ms:
            total = sum(m.values()) or 1
            cells.append(f"{100 * m.get(category, 0.0) / total:.1f}%, {m.get(category, 0.0):.0f}")
        lines.append(row([category, *cells]))
    lines.append(row(["requests/s; tokens/request", *(
        f"{load['requests'] / load['seconds']:.2f}; {load['generated_tokens'] / load['requests']:.1f}"
        for load in loads)]))
    return lines


def planned_loads(args: argparse.Namespace) -> list[list]:
    """The requests of each load in ``args.clients``: the first ``args.questions`` of ``args.mode`` every time, or
    with ``args.fresh_questions`` each load's own, after the warm-up's ``WARMUP`` (``workload.workloads``). Raises
    ValueError where the data holds too few, FileNotFoundError for an absent data file."""
    if args.fresh_questions:
        return workloads([args.mode] * len(args.clients), args.questions, WARMUP, args.data)
    return [workload(args.mode, args.questions, args.data)] * len(args.clients)


def add_profile_options(parser: argparse.ArgumentParser) -> None:
    """The options of the profile: the server, the loads, py-spy and where the results go."""
    parser.add_argument("--pid", type=positive(int), required=True, help="the loraswap server's process id")
    parser.add_argument("--url", type=server_url, default="http://127.0.0.1:8000", help="the loraswap server")
    parser.add_argument("--clients", type=comma_list(positive(int)), default="1,8", help="comma-separated loads")
    parser.add_argument("--questions", type=positive(int), default=48, help="requests per load")
    parser.add_argument("--mode", choices=MODES, default="squad",
                        help="squad: /answer only; mixed: /answer and /nli taking turns (two adapters in play)")
    parser.add_argument("--fresh-questions", action="store_true",
                        help="give each load questions of its own after the warm-up's, none asked before (as "
                             "side-by-side --fresh-questions does), instead of the same first ones each time")
    parser.add_argument("--rate", type=positive(int), default=100, help="py-spy's samples per second")
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy executable")
    parser.add_argument("--data", type=input_path, help="the data folder, SQuAD dev and MNLI (default: "
                        "$LORASWAP_DATA_DIR, else shared/data beside the repository)")
    parser.add_argument("--out", type=report_folder, required=True,
                        help="folder for the raw stacks and profile.json (made if absent)")


def main() -> None:
    """``python -m loadtest.profile_answer``: profile each load, write the stacks and profile.json, print the
    tables (the engine thread by stage, then by category; the event loop)."""
    parser = BriefErrors(prog="python -m loadtest.profile_answer", description=__doc__.split("\n\n")[0])
    add_profile_options(parser)
    args = parser.parse_args()
    if shutil.which(args.py_spy) is None:
        parser.error(f"no py-spy at {args.py_spy!r}: pip install py-spy, or give its path with --py-spy")
    try:
        given, args.data = args.data, args.data or data_dir()  # UsageError: a $LORASWAP_DATA_DIR refused
        with naming_default_data({"--data": given}):
            asked = planned_loads(args)
    except (ValueError, UsageError) as error:
        parser.error(str(error))
    except OSError as error:  # a file of the --data folder given
        parser.error(f"--data {given}: {error.strerror or error}: {error.filename}")
    args.out.mkdir(parents=True, exist_ok=True)
    run_load(Loraswap(args.url), workload(args.mode, WARMUP, args.data), WARMUP)  # unprofiled
    loads = [profiled_load(args, clients, items) for clients, items in zip(args.clients, asked)]
    (args.out / "profile.json").write_text(json.dumps({"loads": loads, "rate": args.rate}, indent=1))
    tables = [breakdown_table(loads, ENGINE, stages=True), breakdown_table(loads, ENGINE),
              breakdown_table(loads, EVENT_LOOP)]
    print("\n\n".join("\n".join(table) for table in tables))


if __name__ == "__main__":
    main()

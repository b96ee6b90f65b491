"""Side by side: the same requests to loraswap and to other servers (llama.cpp's ``llama-server``, any OpenAI-style
``/v1/completions``), taking turns, each load at a fixed number of concurrent clients. Reports requests/s, p50/p95
latency, EM/F1 (and NLI accuracy) and each server's peak RSS, as JSON and as markdown tables. How to build and run
llama-server for it: ``docs/llamacpp.md``.

    loraswap side-by-side --system llama_f32=llamacpp@http://127.0.0.1:8080 --pid llama_f32=$LLAMA \\
        --system loraswap=loraswap-free@http://127.0.0.1:8000 --pid loraswap=$LORASWAP \\
        --questions 96 --rounds 2 --json OUT.json --markdown OUT.md

The servers run all the time; only the one measured gets requests. Each round runs every load (``--loads``) on
every system, the systems' order reversed every other round. Before measuring, each system answers ``--warmup``
requests, untimed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from loadtest.endpoints import KINDS, Loraswap, bearer, endpoint
from loadtest.process_memory import ServerMemory
from loadtest.side_by_side_report import markdown, score, summarize
from loadtest.workload import MODES, Item, data_files, workload, workloads
from service.cli.command import (
    Command,
    UsageError,
    comma_list,
    input_path,
    nonnegative,
    output_file,
    positive,
    server_url,
    spare_inputs,
)
from service.settings import variable
from training.data import data_dir, naming_default_data

TIMEOUT_S = 600.0  # per request: a 2-core machine under load answers slowly, but it answers


def named(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> (NAME, VALUE); argparse.ArgumentTypeError when either is empty or there is no ``=``."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def system_spec(text: str) -> tuple[str, str, str]:
    """``NAME=KIND@URL`` (KIND one of KINDS) -> (NAME, KIND, URL); argparse.ArgumentTypeError otherwise."""
    name, value = named(text)
    kind, sep, url = value.partition("@")
    if not sep or kind not in KINDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=KIND@URL with KIND one of {', '.join(KINDS)}")
    return name, kind, server_url(url)


def pid_spec(text: str) -> tuple[str, int]:
    """``NAME=PID`` -> (NAME, PID); argparse.ArgumentTypeError when PID is not a positive integer."""
    name, value = named(text)
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the process id must be a positive integer")
    return name, int(value)


def load_spec(text: str) -> tuple[str, int]:
    """``MODE:CLIENTS`` (MODE one of MODES) -> (MODE, CLIENTS); argparse.ArgumentTypeError otherwise."""
    mode, sep, clients = text.partition(":")
    if not sep or mode not in MODES or not clients.isdigit() or int(clients) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not MODE:CLIENTS with MODE one of {', '.join(MODES)}")
    return mode, int(clients)


def schedule(systems: Sequence[str], loads: Sequence[tuple[str, int]], rounds: int) -> list[tuple[int, tuple, str]]:
    """The order of the measurements, (round, load, system): rounds 1..``rounds``, each load of a round on every
    system, in ``systems``' order in odd rounds and in reverse order in even ones (A B, B A, ...), so that no system
    always runs first after another's load."""
    order = []
    for round_ in range(1, rounds + 1):
        turn = list(systems) if round_ % 2 else list(reversed(systems))
        order += [(round_, load, system) for load in loads for system in turn]
    return order


def session(system) -> httpx.Client:
    """A client of ``system``'s server (an ``endpoints`` client); a loraswap server is sent the API key of
    ``$LORASWAP_API_KEY``, where it is set, as loadtest sends it (a review: a server with a key was a 401)."""
    key = os.environ.get(variable("api_key")) if isinstance(system, Loraswap) else None
    return httpx.Client(base_url=system.url, timeout=TIMEOUT_S, headers=bearer(key))


def run_load(system, items: Sequence[Item], clients: int) -> dict:
    """Send ``items`` to ``system`` (an ``endpoints`` client) from ``clients`` threads, each taking the next item as
    soon as its last reply came. Returns the seconds the load took, each request's latency (ms) and reply text, and
    the server's timings where it gave them, all in the items' order. Raises the first request's error (httpx)."""
    answers: list[str] = [""] * len(items)
    latencies: list[float] = [0.0] * len(items)
    timings: list[dict | None] = [None] * len(items)
    taken = itertools.count()  # shared by the threads: next() on it is atomic in CPython

    def client() -> None:
        with session(system) as http:
            while (i := next(taken)) < len(items):
                sent = time.perf_counter()
                reply = system.ask(http, items[i])
                latencies[i] = (time.perf_counter() - sent) * 1000
                answers[i], timings[i] = reply.text, reply.timings

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "latencies_ms": [round(ms, 1) for ms in latencies], "answers": answers,
            "timings": timings if any(timings) else None}


def measure_one(system, memory: ServerMemory | None, items: Sequence[Item], clients: int) -> dict:
    """One load on one system: ``run_load``'s figures with requests/s, the scores of the replies, the machine's
    1-minute load average before it, and the server's peak RSS before and during it (bytes; None without a pid)."""
    load_average = round(os.getloadavg()[0], 2)
    before = memory.start_load() if memory else None
    result = run_load(system, items, clients)
    return {**result, "requests": len(items), "requests_per_s": round(len(items) / result["seconds"], 3),
            "scores": score(items, result["answers"]), "load_average": load_average, "rss_before_bytes": before,
            "peak_rss_bytes": memory.peak() if memory else None}


def warm_up(systems: dict, items: Sequence[Item], count: int) -> None:
    """Let each system look up what it needs (``prepare``) and answer ``count`` requests, untimed."""
    for system in systems.values():
        with session(system) as http:
            system.prepare(http)
        if count:
            run_load(system, items[:count], min(count, 8))


def planned_requests(args: argparse.Namespace) -> dict[tuple[int, tuple[str, int]], list[Item]]:
    """The requests of each (round, load), in the order they run: the first ``--questions`` of the load's mode every
    time, or with ``--fresh-questions`` requests of its own, none asked before, the warm-up's included (``workloads``;
    a prompt cache then serves only what new questions share with old: a SQuAD context's other questions). Raises
    ValueError where the data holds fewer requests than asked, FileNotFoundError without it."""
    blocks = list(dict.fromkeys((round_, load) for round_, load, _ in schedule(["any"], args.loads, args.rounds)))
    if args.fresh_questions:
        fresh = workloads([mode for _, (mode, _) in blocks], args.questions, args.warmup, args.data)
        return dict(zip(blocks, fresh))
    same = {mode: workload(mode, args.questions, args.data) for mode in {mode for mode, _ in args.loads}}
    if any(len(items) < args.questions for items in same.values()):
        raise ValueError(f"the data holds fewer than --questions {args.questions} requests for a load")
    return {block: same[block[1][0]] for block in blocks}


def compare(args: argparse.Namespace, planned: dict[tuple[int, tuple[str, int]], list[Item]]) -> dict:
    """Run the comparison ``args`` describe (see ``add_side_by_side_options``) with the requests ``planned`` for each
    (round, load) (``planned_requests``); returns the report: the settings, every load's record (``question_set``:
    which requests it sent, the same number for loads that sent the same), and the summary per system and load."""
    systems = {name: endpoint(kind, url, args.cache_prompt) for name, kind, url in args.system}
    memories = {name: ServerMemory(pid) for name, pid in args.pid}
    modes = {mode for mode, _ in args.loads}
    warm_up(systems, workload("mixed" if "mixed" in modes else "squad", args.warmup, args.data), args.warmup)
    sets = {id(items): number for number, items in enumerate(planned.values())}  # the same list: the same set
    records = []
    for round_, (mode, clients), name in schedule(list(systems), args.loads, args.rounds):
        items = planned[round_, (mode, clients)]
        record = measure_one(systems[name], memories.get(name), items, clients)
        records.append({"round": round_, "system": name, "mode": mode, "clients": clients,
                        "question_set": sets[id(items)], **record})
        print(f"round {round_} {name:>12} {mode} x{clients}: {record['requests_per_s']:.2f} requests/s, "
              f"F1 {record['scores']['f1']:.1f}, load average {record['load_average']}", flush=True)
    settings = {"questions": args.questions, "rounds": args.rounds, "loads": args.loads, "warmup": args.warmup,
                "fresh_questions": args.fresh_questions,
                "cache_prompt": args.cache_prompt, "systems": [list(s) for s in args.system], "cpus": os.cpu_count()}
    return {"settings": settings, "records": records, "summary": summarize(records)}


def add_side_by_side_options(parser: argparse.ArgumentParser) -> None:
    """The options of the side-by-side comparison: the systems and their process ids, the loads, the questions and
    rounds, and where the report goes."""
    parser.add_argument("--system", type=system_spec, action="append", required=True,
                        help=f"NAME=KIND@URL, KIND one of {', '.join(KINDS)} (repeat for each system; at least two)")
    parser.add_argument("--pid", type=pid_spec, action="append", default=[],
                        help="NAME=PID: the server process of a system, for its peak RSS (repeat)")
    parser.add_argument("--baseline", help="the system the others' ratios are over (default: the first)")
    parser.add_argument("--loads", type=comma_list(load_spec), default="squad:1,squad:8,mixed:8",
                        help=f"MODE:CLIENTS, comma-separated; MODE one of {', '.join(MODES)}")
    parser.add_argument("--questions", type=positive(int), default=96, help="requests per load")
    parser.add_argument("--rounds", type=positive(int), default=2, help="rounds of every load on every system")
    parser.add_argument("--warmup", type=nonnegative(int), default=8, help="untimed requests per system first")
    parser.add_argument("--fresh-questions", action="store_true",
                        help="each round and load asks questions and NLI pairs of its own, none asked before, "
                             "warm-up included; without it every round and load asks the first --questions, which "
                             "flatters a prompt cache from the second time on")
    parser.add_argument("--cache-prompt", action="store_true",
                        help="let llama.cpp reuse a slot's cached prompt (each request's cache_prompt)")
    parser.add_argument("--data", type=input_path, help="the data folder, SQuAD dev and MNLI (default: "
                        "$LORASWAP_DATA_DIR, else shared/data beside the repository)")
    parser.add_argument("--json", type=output_file,
                        help="write the whole report here (default: only its tables, printed)")
    parser.add_argument("--markdown", type=output_file, help="write the tables here (default: printed only)")


def check_names(args: argparse.Namespace) -> str:
    """The baseline's name, once the names are checked: ValueError for fewer than two systems, a name given twice,
    a pid or baseline that names no system, or a load given twice."""
    names = [name for name, _, _ in args.system]
    baseline = args.baseline or names[0]
    if len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"need at least two systems of distinct names, not {names}")
    unknown = ({name for name, _ in args.pid} | {baseline}) - set(names)
    if unknown:
        raise ValueError(f"{sorted(unknown)} name no system (systems: {names})")
    if len(set(args.loads)) != len(args.loads):
        raise ValueError(f"a load given twice in --loads: {[f'{mode}:{clients}' for mode, clients in args.loads]}")
    return baseline


def check_reachable(systems: Sequence[tuple[str, str, str]]) -> None:
    """ValueError naming the first system (NAME, KIND, URL) whose server does not answer at all (any HTTP status
    answers): found before any system is timed, not when its turn comes."""
    for name, _, url in systems:
        try:
            httpx.get(url, timeout=10)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            raise ValueError(f"system {name} does not answer at {url}: {type(exc).__name__}: {exc}") from None


def run_side_by_side(args: argparse.Namespace) -> None:
    """Run the comparison, print its tables, write the JSON and markdown asked for. Names that ``check_names``
    refuses, a report that would be written over a data file (``spare_inputs``) and a system that does not answer
    (``check_reachable``) are a usage error (exit status 2, before any
    request is timed); a request that fails during the run (an HTTP error status: a wrong URL path, a server that
    refuses) ends it with one line and exit status 1. Raises FileNotFoundError without the data, ValueError when a
    llama.cpp server lacks an adapter (``LlamaCpp.prepare``)."""
    try:
        baseline = check_names(args)
        given, args.data = args.data, args.data or data_dir()  # UsageError: a $LORASWAP_DATA_DIR refused
        spare_inputs([(option, getattr(args, option[2:], None)) for option in ("--json", "--markdown")],
                     [(f"a file of --data, {path}", path) for path in data_files(args.data)])
        with naming_default_data({"--data": given}):
            planned = planned_requests(args)
        check_reachable(args.system)
    except (ValueError, UsageError) as exc:
        print(f"loraswap side-by-side: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        report = compare(args, planned)
    except httpx.HTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # httpx adds a line of docs' address
        print(f"loraswap side-by-side: error: a request failed, so no report: {first}", file=sys.stderr)
        raise SystemExit(1) from None
    tables = markdown(report["summary"], [name for name, _, _ in args.system], baseline)
    print(tables)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(tables)


SIDE_BY_SIDE = Command("loraswap against llama.cpp or an OpenAI-style server, on the same questions",
                       add_side_by_side_options, run_side_by_side,
                       f"A loraswap system's API key, where its server sets one, comes from ${variable('api_key')}.")


def main() -> None:
    """``python -m loadtest.side_by_side``: the same as ``loraswap side-by-side`` where that entry point exists."""
    parser = argparse.ArgumentParser(description=SIDE_BY_SIDE.help)
    add_side_by_side_options(parser)
    run_side_by_side(parser.parse_args())


if __name__ == "__main__":
    main()

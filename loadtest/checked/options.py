"""The options of ``loraswap loadtest`` and the command. Light (no locust, torch or httpx): ``loraswap`` builds its
parser from here; the run imports them.

    LORASWAP_ADMIN_KEY=... loraswap loadtest --scenario zipf --users 8 --duration 60 --host http://127.0.0.1:8000 \\
        --adapter-root /tmp/loadtest-adapters --json zipf.json --md zipf.md

The server must accept adapters from ``--adapter-root`` (``loraswap serve --adapter-roots DIR``) and have the admin
key: the test derives its adapters from one the server has registered, registers them, and removes them at the end.
The exit status is 1 when a check failed (a wrong answer, a 5xx, a request unanswered, another status than 200,
429 with Retry-After, or 404 while its adapter was away; a failed admin call; a recovery request not answered right;
a 5xx seen by the soak's storm clients, or the server's memory outside its prefix cache growing past
``--max-rss-growth`` after the warm-up; the same growth over ``--register-cycles``), 2 for a usage error or a set-up
the server refused.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from loadtest.checked.scenarios import SCENARIOS
from service.cli.command import (
    Command,
    UsageError,
    comma_list,
    input_path,
    nonnegative,
    output_file,
    positive,
    require_extra,
    server_url,
    spare_inputs,
)
from service.cli.entry import STOPS
from service.settings import variable
from training.data import TASK_EVAL_FILES, data_dir, naming_default_data


def add_loadtest_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``loraswap loadtest``: the scenario and its load, the server, the reports, the requests and the
    derived adapters."""
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS),
                        help="; ".join(f"{s.name}: {s.help}" for s in SCENARIOS.values()))
    parser.add_argument("--users", type=positive(int), required=True, help="concurrent locust users sending requests")
    parser.add_argument("--duration", type=positive(float), required=True, help="seconds of load")
    parser.add_argument("--host", type=server_url, required=True, help="the server's URL, http://HOST:PORT")
    parser.add_argument("--json", type=output_file, required=True, help="write the report here")
    parser.add_argument("--md", type=output_file, help="write the report's tables here (default: printed only)")
    parser.add_argument("--adapter-root", type=input_path, required=True,
                        help="a folder the server loads adapters from (one of its --adapter-roots): the derived "
                        "adapters are written there and removed at the end")
    parser.add_argument("--source", help="the registered adapter to derive from (default: the first the server lists)")
    parser.add_argument("--adapters", type=positive(int),
                        help="adapters to derive and serve (default: the scenario's: "
                        f"{', '.join(f'{name} {scenario.adapters}' for name, scenario in SCENARIOS.items())})")
    parser.add_argument("--prompts", type=positive(int),
                        help="distinct requests per adapter, the endpoints taking turns (default: 24 / adapters, at "
                        "least 3); the reference pass sends each to each adapter alone")
    parser.add_argument("--new-tokens", type=positive(int), default=8, help="most tokens of an answer or completion")
    parser.add_argument("--rank", type=positive(int), default=4, help="rank of the derived adapters")
    parser.add_argument("--kinds", type=comma_list(), default="q_proj,v_proj,c_attn",
                        help="the kinds of module the derived adapters keep (all the source's if it has none of them)")
    parser.add_argument("--spread", type=positive(float), default=32.0,
                        help="the derived lora_B's spread, in units of the source's lora_B's (32 keeps the answers of "
                        "adapters derived from a trained one, whose lora_B is small, apart on SmolLM2)")
    parser.add_argument("--seed", type=nonnegative(int), default=0, help="seed of the first derived adapter")
    parser.add_argument("--churn-interval", type=positive(float), default=1.0,
                        help="seconds between two churn ticks (churn scenario)")
    parser.add_argument("--timeout", type=positive(float), default=60.0,
                        help="seconds a request may take: past them it counts as unanswered")
    parser.add_argument("--tolerance", type=nonnegative(float), default=1e-3,
                        help="how far an /nli probability may be from the reference pass's")
    parser.add_argument("--recovery", type=nonnegative(int), default=6,
                        help="requests sent alone once the load is gone, each to be answered right")
    parser.add_argument("--storm-clients", type=positive(int), default=200,
                        help="clients of the disconnect storm (soak scenario), each sending requests and hanging up at "
                        "a random point: while sending, before the reply, or mid-stream")
    parser.add_argument("--hang-up", type=positive(float), default=2.0,
                        help="the most seconds a storm client waits for a reply before hanging up")
    parser.add_argument("--warmup", type=nonnegative(float),
                        help="seconds of load before the server's memory must stay flat (soak scenario; default: a "
                        "fifth of --duration; less than --duration)")
    parser.add_argument("--max-rss-growth", type=nonnegative(float), default=0.05,
                        help="how much the server's resident memory may grow after the warm-up (soak: less what its "
                        "prefix cache holds, which fills up to its own bound) and over the register cycles, as a "
                        "fraction (0.05: 5%%)")
    parser.add_argument("--register-cycles", type=nonnegative(int), default=0,
                        help="after the load, unregister and register one adapter this many times, a request to it "
                        "every 100 cycles (every tenth of them when fewer than 1,000): the server's memory after the "
                        "last must be within --max-rss-growth of its memory after the first tenth")
    parser.add_argument("--squad", type=input_path,
                        help="SQuAD v1.1 questions (default: the dev set in the data folder, $LORASWAP_DATA_DIR, "
                        "else shared/data beside the repository)")
    parser.add_argument("--nli", type=input_path,
                        help="NLI pairs, every row (default: MNLI dev_matched in the data folder, "
                        "$LORASWAP_DATA_DIR, else shared/data beside the repository)")


def nli_source(path: Path | None) -> tuple[Path, tuple[str, ...] | None]:
    """The NLI file and the MNLI splits kept: the given file whole, else the data folder's eval file."""
    if path is not None:
        return path, None
    name, splits = TASK_EVAL_FILES["nli"]
    return data_dir() / name, splits


def run_loadtest(args: argparse.Namespace) -> None:
    """Run ``loraswap loadtest``: the report to ``--json``, its tables to ``--md`` and printed. UsageError for a
    ``--warmup`` not below ``--duration``, a report that would be written over the data it asks from
    (``spare_inputs``), and without locust (``require_extra``). Exit status
    2 without ``$LORASWAP_ADMIN_KEY`` or when the server refuses the test's set-up (a wrong admin key, an
    ``--adapter-root`` that is not one of its roots, no ``--source`` adapter, the server unreachable, a name or folder
    of the run's adapters taken), 1 when a check failed (the reference pass's included), 130 when interrupted
    (Ctrl-C or SIGTERM: the adapters it registered are unregistered and their files removed first)."""
    require_extra("loadtest", "locust", "gevent")
    if args.warmup is not None and args.warmup >= args.duration:
        raise UsageError(f"--warmup {args.warmup:g} leaves no load after it to check the memory by (--duration "
                         f"{args.duration:g})")
    squad, nli = args.squad or data_dir() / TASK_EVAL_FILES["squad"][0], nli_source(args.nli)
    spare_inputs([("--json", args.json), ("--md", args.md)],
                 [("the SQuAD file it asks from", squad), ("the NLI file it asks from", nli[0])])
    admin_key = os.environ.get(variable("admin_key"))
    if not admin_key:
        print(f"loraswap loadtest: error: set {variable('admin_key')}, the server's admin key (the test registers its "
              "adapters)", file=sys.stderr)
        raise SystemExit(2)
    import httpx

    from loadtest.checked.answer_key import ReferenceFailed
    from loadtest.checked.report import failed_checks, markdown
    from loadtest.checked.run import LoadConfig, run_load

    config = LoadConfig(
        scenario=args.scenario, users=args.users, duration_s=args.duration, host=args.host,
        admin_key=admin_key, api_key=os.environ.get(variable("api_key")), adapter_root=args.adapter_root,
        squad=squad, nli=nli, source=args.source,
        adapters=args.adapters, prompts=args.prompts, new_tokens=args.new_tokens, rank=args.rank,
        kinds=tuple(args.kinds), spread=args.spread, seed=args.seed, churn_interval_s=args.churn_interval,
        timeout_s=args.timeout, tolerance=args.tolerance, recovery=args.recovery, storm_clients=args.storm_clients,
        hang_up_s=args.hang_up, warmup_s=args.warmup, max_rss_growth=args.max_rss_growth,
        register_cycles=args.register_cycles)
    stop_on_signals()
    try:
        with naming_default_data({"--squad": args.squad, "--nli": args.nli}):
            report = run_load(config)
    except KeyboardInterrupt:
        print("loraswap loadtest: interrupted: no report; its adapters were unregistered and their files removed",
              file=sys.stderr)
        raise SystemExit(130) from None
    except (httpx.HTTPStatusError, httpx.TransportError, ValueError, FileExistsError) as refused:
        detail = refused.response.text[:300] if isinstance(refused, httpx.HTTPStatusError) else ""
        sent = f"{refused.request.method} {refused.request.url}: " if isinstance(refused, httpx.TransportError) else ""
        print(f"loraswap loadtest: error: {sent}{refused} {detail}".rstrip(), file=sys.stderr)
        raise SystemExit(2) from None
    except ReferenceFailed as failed:
        print(f"loraswap loadtest: failed: {failed}", file=sys.stderr)
        raise SystemExit(1) from None
    args.json.write_text(json.dumps(report, indent=1))
    tables = markdown(report)
    print(tables)
    if args.md:
        args.md.write_text(tables)
    failed = failed_checks(report)
    if failed:
        print(f"loraswap loadtest: failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


def stop_on_signals() -> None:
    """SIGTERM and Ctrl-C (SIGINT) stop a run: KeyboardInterrupt thrown into the main greenlet where it next waits
    (``gevent.kill``), so that it cleans up after itself. Raised by a plain signal handler, it could land anywhere,
    inside code holding a lock the clean-up then waited for forever (gevent's LoopExit, exit 1), or in gevent's hub.
    Once thrown, both are ignored: a second (``timeout`` signals the process group too) threw another into the
    clean-up, which it cut short with a traceback."""
    import gevent

    main = gevent.getcurrent()

    def stop() -> None:
        for signum in STOPS:
            signal.signal(signum, signal.SIG_IGN)
        gevent.kill(main, KeyboardInterrupt)

    for signum in STOPS:
        gevent.signal_handler(signum, stop)


LOADTEST = Command("load tests that check every answer (locust scenarios: single, uniform, zipf, churn, overload, "
                   "soak); "
                   f"the server's admin key from ${variable('admin_key')}",
                   add_loadtest_options, run_loadtest,
                   f"The server's API key, where it sets one, comes from ${variable('api_key')}.")

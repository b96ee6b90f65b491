"""Multiplexed routing against round-robin on ``loraswap scale`` (docs/benchmarks.md, "Scaling out on Ray Serve").

For each routing, ``loraswap scale`` (a process of its own: locust's gevent and Ray do not share one) serves the base
model on a Ray cluster of this machine alone from ``--replicas`` replicas of ``--max-resident`` device slots each, and
``loraswap loadtest``'s zipf scenario runs against it (``run_load``: its
adapters derived from the shipped squad adapter, its answer key, every answer checked). A locust user of its own
scrapes the gathered ``/metrics`` as the load begins and as it ends; between the two, each replica's
``loraswap_scale_adapter_requests_total`` says how many requests found their adapter resident on arrival, and
``loraswap_scale_adapter_holds_total`` how many times Ray Serve's multiplexing added an adapter to a replica's set
(an adapter load the routing caused). Writes both runs' figures to ``--json`` and prints their table.

    LORASWAP_DATA_DIR=/path/to/data python -m loadtest.scale_routing --json scale_routing.json
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from locust import User, constant, task

from loadtest.checked.asks import ENDPOINTS, asks
from loadtest.checked.options import nli_source
from loadtest.checked.run import LoadConfig, run_load
from loadtest.checked.server_view import Samples, increase, scrape
from service.cli.command import UsageError, output_file
from service.scale.replica_metrics import REPLICA_LABEL
from service.scale.routing import REPLICA_HEADER
from training.data import TASK_EVAL_FILES, data_dir, naming_default_data

ADMIN_KEY = "scale-routing-bench"
ROUTINGS = ("multiplexed", "round-robin")
ARRIVALS, HOLDS = "loraswap_scale_adapter_requests_total", "loraswap_scale_adapter_holds_total"
START_TIMEOUT_S = 600  # Ray, then every replica loading the base model, on a busy machine


@contextmanager
def scaled(routing: str, args: argparse.Namespace, root: Path):
    """``loraswap scale`` with ``routing`` running (every replica up) for the block, stopped (SIGTERM) after it.
    Raises RuntimeError if it ends or is not ready within START_TIMEOUT_S."""
    command = [sys.executable, "-m", "service.cli.entry", "scale", "--replicas", str(args.replicas), "--routing",
               routing, "--base-model", args.base_model, "--device", "cpu", "--max-resident", str(args.max_resident),
               "--adapter-roots", str(root), "--admin-key", ADMIN_KEY, "--host", "127.0.0.1", "--port", str(args.port)]
    process = subprocess.Popen(command, start_new_session=True)  # the signal goes to it alone
    try:
        wait_ready(process, f"http://127.0.0.1:{args.port}", args.replicas)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def wait_ready(process: subprocess.Popen, host: str, replicas: int) -> None:
    """Until the gathered /metrics names ``replicas`` replicas (the service answers once one is up)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"loraswap scale ended with status {process.returncode} before it was ready")
        try:
            reply = httpx.get(f"{host}/metrics", timeout=10)
            if reply.status_code == 200 and len(reply.headers.get(REPLICA_HEADER, "").split(",")) == replicas:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"loraswap scale was not ready within {START_TIMEOUT_S} s")


def scrapes_user(host: str, scrapes: dict[str, Samples]) -> type[User]:
    """A locust user class, one instance, that scrapes ``host``'s /metrics into ``scrapes`` when the load begins
    ("before") and when it ends ("after"), and sends nothing else."""
    class ScrapesUser(User):
        fixed_count = 1
        wait_time = constant(3600)

        def on_start(self) -> None:
            with httpx.Client(base_url=host, timeout=60) as http:
                scrapes["before"] = scrape(http)

        @task
        def idle(self) -> None:
            pass

        def on_stop(self) -> None:
            with httpx.Client(base_url=host, timeout=60) as http:
                scrapes["after"] = scrape(http)

    return ScrapesUser


def affinity(before: Samples, after: Samples) -> dict:
    """Between two scrapes: requests for an adapter that found it resident on arrival, and not; the hit rate; the
    adapters multiplexing added to the replicas (holds); the same by replica."""
    replicas = sorted({dict(labels)[REPLICA_LABEL] for name, labels in after if name == ARRIVALS})

    def figures(**labels: str) -> dict:
        hits, misses = (int(increase(before, after, ARRIVALS, resident=r, **labels)) for r in ("true", "false"))
        return {"requests": hits + misses, "resident_on_arrival": hits, "hit_rate": round(hits / (hits + misses), 4)
                if hits + misses else None, "holds": int(increase(before, after, HOLDS, **labels))}

    return {**figures(), "by_replica": {replica: figures(**{REPLICA_LABEL: replica}) for replica in replicas}}


Data = tuple[Path, tuple[Path, tuple[str, ...] | None]]  # the SQuAD file, the NLI file and its MNLI splits kept


def default_data() -> Data:
    """The files of the data folder the load test asks from, read once here (``asks``), so that an absent one is a
    usage error naming LORASWAP_DATA_DIR (``naming_default_data``) before any ``loraswap scale`` starts (a review:
    FileNotFoundError's traceback, naming no variable, once the first had started)."""
    squad, nli = data_dir() / TASK_EVAL_FILES["squad"][0], nli_source(None)
    with naming_default_data({}):
        asks(squad, nli, len(ENDPOINTS), 1)  # a request of each endpoint
    return squad, nli


def run_routing(routing: str, args: argparse.Namespace, root: Path, data: Data) -> dict:
    """One routing: the scaled service up, the zipf load test against it on ``data``, the service down; its
    figures."""
    host = f"http://127.0.0.1:{args.port}"
    scrapes: dict[str, Samples] = {}
    with scaled(routing, args, root):
        report = run_load(LoadConfig(
            scenario="zipf", users=args.users, duration_s=args.duration, host=host, admin_key=ADMIN_KEY,
            adapter_root=root, squad=data[0], nli=data[1], source="squad",
            adapters=args.adapters, prompts=args.prompts, new_tokens=args.new_tokens, seed=args.seed),
            extra_users=[scrapes_user(host, scrapes)])
    kept = ("requests", "failures", "wrong", "server_errors", "rejected_429", "rps", "p50_ms", "p95_ms", "p99_ms")
    return {"load": {key: report[key] for key in kept}, "seconds": report["seconds"],
            "reference": report["reference"], "affinity": affinity(scrapes["before"], scrapes["after"])}


def table(results: dict[str, dict]) -> str:
    """The runs side by side, in markdown."""
    rows = ["| routing | requests | wrong / 5xx | req/s | p50 ms | p95 ms | resident on arrival | adapter holds "
            "| requests by replica |", "|---|---|---|---|---|---|---|---|---|"]
    for routing, result in results.items():
        load, seen = result["load"], result["affinity"]
        shares = " / ".join(str(replica["requests"]) for replica in seen["by_replica"].values())
        rows.append(f"| {routing} | {load['requests']} | {load['wrong']} / {load['server_errors']} | {load['rps']} "
                    f"| {load['p50_ms']} | {load['p95_ms']} | {100 * seen['hit_rate']:.1f} % "
                    f"({seen['resident_on_arrival']}/{seen['requests']}) | {seen['holds']} | {shares} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", type=output_file, required=True, help="write both runs' figures here")
    parser.add_argument("--base-model", default="smollm2", help="the replicas' base model")
    parser.add_argument("--replicas", type=int, default=2, help="loraswap replicas (each reserves one CPU of Ray's)")
    parser.add_argument("--max-resident", type=int, default=4, help="device slots of each replica")
    parser.add_argument("--adapters", type=int, default=16, help="adapters the zipf scenario derives and serves")
    parser.add_argument("--prompts", type=int, default=3, help="distinct requests per adapter")
    parser.add_argument("--users", type=int, default=8, help="concurrent locust users")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per routing")
    parser.add_argument("--new-tokens", type=int, default=8, help="most tokens of an answer or completion")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first derived adapter")
    parser.add_argument("--port", type=int, default=8765, help="the port the service listens on")
    parser.add_argument("--routings", default=",".join(ROUTINGS), help="the routings to run, in order")
    args = parser.parse_args(argv)
    try:
        data = default_data()
    except UsageError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="scale-routing-") as root:
        results = {routing: run_routing(routing, args, Path(root), data) for routing in args.routings.split(",")}
    args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "results": results},
                                    indent=1))
    print(table(results))


if __name__ == "__main__":
    main()

"""Clients that give up under load: N completions whose clients time out, then one live question. Prints the live
question's latency, the server's CPU seconds and the tokens it generated over the run (since commit ac129b4 those
of abandoned requests too; before, finished requests only).

    loraswap serve --port 8031 --max-new-tokens 64 & server=$!
    until curl -s localhost:8031/ready | grep -q true; do sleep 2; done
    python -m loadtest.dead_clients --port 8031 --clients 24 --timeout 3 --server-pid $server
    kill $server
"""
import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

QUESTION = {"context": "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
                       "a region in France.", "question": "In what country is Normandy located?"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds each dead client waits")
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait before the final readings")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"

    def generated_tokens() -> float:
        lines = httpx.get(f"{url}/metrics").text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith("loraswap_generated_tokens_total"))

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{args.server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100  # user + system ticks

    def give_up(i: int) -> str:
        try:
            httpx.post(f"{url}/v1/completions", timeout=args.timeout, json={
                "model": "squad", "prompt": f"Write a long story number {i}:", "max_tokens": 64, "temperature": 0})
            return "answered"
        except httpx.TimeoutException:
            return "gave up"

    tokens, cpu = generated_tokens(), cpu_seconds()
    with ThreadPoolExecutor(args.clients) as pool:
        outcomes = list(pool.map(give_up, range(args.clients)))
    started = time.perf_counter()
    reply = httpx.post(f"{url}/answer", json=QUESTION, timeout=600).json()
    latency = time.perf_counter() - started
    time.sleep(args.settle)
    print(json.dumps({"outcomes": {outcome: outcomes.count(outcome) for outcome in sorted(set(outcomes))},
                      "live_answer": reply["answer"], "live_latency_s": round(latency, 2),
                      "server_cpu_s": round(cpu_seconds() - cpu, 1), "tokens_generated": generated_tokens() - tokens}))


if __name__ == "__main__":
    main()

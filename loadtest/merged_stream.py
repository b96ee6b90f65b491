"""A steady stream of /answer requests for one adapter (which the server should then merge), and /nli requests
in the middle of it: one (default), or one every ``--nli-every`` seconds until ``--most`` seconds have passed.
Prints whether the adapter was merged when the first NLI request came, how long the NLI requests took, the
stream's answers per second, and the merges and unmerges the server did meanwhile (from /metrics).

    loraswap serve --port 8031 & server=$!
    until curl -s localhost:8031/ready | grep -q true; do sleep 2; done
    python -m loadtest.merged_stream --port 8031 --clients 8 --warmup 20
    python -m loadtest.merged_stream --port 8031 --clients 8 --warmup 20 --nli-every 2 --most 80
    kill $server
"""
import argparse
import json
import statistics
import threading
import time
from collections import Counter

import httpx
from prometheus_client.parser import text_string_to_metric_families

CONTEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
           "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.")


def switches(url: str) -> Counter:
    """Merges and unmerges so far: ("merge" or "unmerge", "count" or "sum") -> number of them, or their seconds."""
    totals = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples if family.name == "loraswap_merge_switch_seconds" else ():
            suffix = sample.name.rpartition("_")[2]
            if suffix in ("count", "sum"):
                totals[sample.labels["action"], suffix] += sample.value
    return totals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--clients", type=int, default=8, help="threads, each sending /answer back to back")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of stream before the first NLI request")
    parser.add_argument("--nli-every", type=float, default=0.0,
                        help="seconds between NLI requests until --most (0: a single NLI request)")
    parser.add_argument("--most", type=float, default=120.0, help="seconds the stream runs at most")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    answered, nli_seconds, stop = [], [], threading.Event()  # when each stream request was answered

    def stream() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while not stop.is_set():
                http.post("/answer", json={"context": CONTEXT, "question": "Where is Normandy?"}).raise_for_status()
                answered.append(time.perf_counter())

    def ask_nli() -> None:
        sent = time.perf_counter()
        httpx.post(f"{url}/nli", json={"premise": "A man sleeps.", "hypothesis": "Nobody sleeps."},
                   timeout=600).raise_for_status()
        nli_seconds.append(time.perf_counter() - sent)

    threads = [threading.Thread(target=stream) for _ in range(args.clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(args.warmup)
    merged, before = httpx.get(f"{url}/adapters").json()["merged"], switches(url)
    asked, askers = time.perf_counter(), []
    while True:
        askers.append(threading.Thread(target=ask_nli))
        askers[-1].start()
        if not args.nli_every or time.perf_counter() + args.nli_every - began >= args.most:
            break
        time.sleep(args.nli_every)
    for asker in askers:
        asker.join(timeout=max(0.0, args.most - (time.perf_counter() - began)))
    stop.set()
    ended = time.perf_counter()
    for thread in (*threads, *askers):
        thread.join()
    after = switches(url)
    streamed = [at for at in answered if asked <= at <= ended]
    print(json.dumps({
        "merged_when_asked": merged,
        "nli_requests": len(askers),
        "nli_answered": len(nli_seconds),  # with a 2xx
        "nli_seconds_median": round(statistics.median(nli_seconds), 2) if nli_seconds else None,
        "nli_seconds_max": round(max(nli_seconds), 2) if nli_seconds else None,
        "stream_answers_per_s": round(len(streamed) / (ended - asked), 2),
        **{f"{action}s": int(after[action, "count"] - before[action, "count"]) for action in ("merge", "unmerge")},
        **{f"{action}_seconds": round(after[action, "sum"] - before[action, "sum"], 2)
           for action in ("merge", "unmerge")}}))


if __name__ == "__main__":
    main()

"""A steady stream of /answer requests for one adapter (which the server should then merge), and one /nli request
in the middle of it: prints whether the adapter was merged when the NLI request came, how long that request took,
how many stream requests were answered meanwhile, and the stream's answers per second.

    loraswap serve --port 8031 &
    python scripts/merged_stream.py --port 8031 --clients 8 --warmup 20
"""
import argparse
import json
import threading
import time

import httpx

CONTEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
           "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--clients", type=int, default=8, help="threads, each sending /answer back to back")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of stream before the NLI request")
    parser.add_argument("--most", type=float, default=120.0, help="seconds the stream runs at most")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    answered, stop = [], threading.Event()  # when each stream request was answered

    def stream() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while not stop.is_set():
                http.post("/answer", json={"context": CONTEXT, "question": "Where is Normandy?"}).raise_for_status()
                answered.append(time.perf_counter())

    def ask_nli() -> None:
        httpx.post(f"{url}/nli", json={"premise": "A man sleeps.", "hypothesis": "Nobody sleeps."},
                   timeout=600).raise_for_status()

    threads = [threading.Thread(target=stream) for _ in range(args.clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(args.warmup)
    merged = httpx.get(f"{url}/adapters").json()["merged"]
    asked = time.perf_counter()
    waiter = threading.Thread(target=ask_nli)
    waiter.start()
    waiter.join(timeout=max(0.0, args.most - (asked - began)))
    nli_done = None if waiter.is_alive() else time.perf_counter()
    stop.set()
    ended = time.perf_counter()
    for thread in (*threads, waiter):
        thread.join()
    streamed = [at for at in answered if at <= ended]
    print(json.dumps({
        "merged_when_asked": merged,
        "nli_seconds": None if nli_done is None else round(nli_done - asked, 2),
        "stream_answers_meanwhile": sum(1 for at in streamed if asked < at < (nli_done or ended)),
        "stream_answers_per_s": round(len(streamed) / (ended - began), 2)}))

if __name__ == "__main__":
    main()

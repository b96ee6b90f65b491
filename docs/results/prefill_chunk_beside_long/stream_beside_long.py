"""POST one /answer whose context is SQuAD dev contexts joined up to CHARS characters and, a second later, a streamed
/v1/completions of up to 16 tokens (greedy); print the stream's time to first token, its mean and longest gap
between tokens, its total time, and the long /answer's status and time. Usage: stream_beside_long.py PORT CHARS"""
import gzip
import itertools
import json
import sys
import threading
import time

import httpx

SQUAD_DEV = "/work/shared/data/squad/dev-v1.1.json.gz"


def long_answer(port: int, chars: int, out: dict) -> None:
    with gzip.open(SQUAD_DEV) as handle:
        paragraphs = [p for article in json.load(handle)["data"] for p in article["paragraphs"]]
    context = "\n\n".join(p["context"] for p in paragraphs[:200])[:chars]
    started = time.perf_counter()
    reply = httpx.post(f"http://127.0.0.1:{port}/answer", json={"context": context, "question":
                       paragraphs[0]["qas"][0]["question"]}, timeout=600)
    out["long"] = (reply.status_code, time.perf_counter() - started)


def stream(port: int) -> str:
    body = {"model": "base", "prompt": "The history of the Normans", "max_tokens": 16, "temperature": 0,
            "stream": True}
    started, times = time.perf_counter(), []
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter() - started)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    return (f"stream: first token {times[0]:.2f} s, {len(times)} chunks, gap mean {sum(gaps) / len(gaps):.2f} s, "
            f"longest {max(gaps):.2f} s, total {times[-1]:.2f} s")


def main(port: int, chars: int) -> None:
    out: dict = {}
    worker = threading.Thread(target=long_answer, args=(port, chars, out))
    worker.start()
    time.sleep(1.0)
    print(stream(port), flush=True)
    worker.join()
    print(f"long /answer: {out['long'][0]} in {out['long'][1]:.1f} s", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))

"""Sampled completions on two servers in turn: ROUNDS bursts of CLIENTS concurrent `/v1/completions` (SQuAD dev
questions as prompts, 32 tokens, a seed each, temperature 1 and the body's other fields as BODY_JSON says), each
burst sent to one server then the other (the order alternating). Prints per server the completion tokens per second
over all bursts and the p50 of a burst's seconds.
Usage: python sampled_load.py CLIENTS ROUNDS BODY_JSON URL_A URL_B"""
import gzip
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

SQUAD = "/work/shared/data/squad/dev-v1.1.json.gz"


def questions() -> list[str]:
    with gzip.open(SQUAD) as file:
        data = json.load(file)["data"]
    return [qa["question"] for article in data for paragraph in article["paragraphs"] for qa in paragraph["qas"]]


def complete(url: str, prompt: str, seed: int, extra: dict) -> int:
    body = {"model": "squad", "prompt": prompt, "max_tokens": 32, "seed": seed, "temperature": 1.0, **extra}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request).read())["usage"]["completion_tokens"]


def burst(pool: ThreadPoolExecutor, url: str, prompts: list[str], first_seed: int, extra: dict) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = sum(pool.map(lambda i: complete(url, prompts[i], first_seed + i, extra), range(len(prompts))))
    return time.perf_counter() - start, tokens


def main() -> None:
    clients, rounds, extra, urls = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:]
    prompts = questions()
    seconds = {url: [] for url in urls}
    tokens = dict.fromkeys(urls, 0)
    with ThreadPoolExecutor(clients) as pool:
        for round_ in range(rounds):
            batch = prompts[round_ * clients:(round_ + 1) * clients]
            for url in urls if round_ % 2 == 0 else urls[::-1]:
                took, count = burst(pool, url, batch, round_ * clients, extra)
                seconds[url].append(took)
                tokens[url] += count
    for url in urls:
        print(f"{url} {extra}: {tokens[url] / sum(seconds[url]):.1f} completion tokens/s over {rounds} bursts of "
              f"{clients}, burst p50 {statistics.median(seconds[url]):.2f} s")


if __name__ == "__main__":
    main()

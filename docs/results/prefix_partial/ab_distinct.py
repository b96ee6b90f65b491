"""SQuAD dev questions FIRST..END-1 sent to two loraswap servers in turn (the order alternating), one request at a
time, the same answer from both asserted: per server the p50 and mean latency (ms), the p50 of each run of 24, and
its cumulative prefix-cache query and hit tokens. Usage: python ab_distinct.py FIRST:END URL_A URL_B"""
import gzip
import json
import statistics
import sys
import time
import urllib.request

SQUAD = "/work/shared/data/squad/dev-v1.1.json.gz"


def post(url: str, context: str, question: str) -> tuple[float, str]:
    body = json.dumps({"context": context, "question": question}).encode()
    request = urllib.request.Request(url + "/answer", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    reply = urllib.request.urlopen(request).read()
    return (time.perf_counter() - start) * 1000, json.loads(reply)["answer"]


def prefix_tokens(url: str) -> list[float]:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return [float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("loraswap_prefix_cache_") and "total" in line]


def main() -> None:
    first, end = map(int, sys.argv[1].split(":"))
    urls = sys.argv[2:]
    with gzip.open(SQUAD) as file:
        data = json.load(file)["data"]
    questions = [(paragraph["context"], qa["question"]) for article in data for paragraph in article["paragraphs"]
                 for qa in paragraph["qas"]][first:end]
    latencies: dict[str, list[float]] = {url: [] for url in urls}
    for index, (context, question) in enumerate(questions):
        answers = []
        for url in urls if index % 2 == 0 else urls[::-1]:
            ms, answer = post(url, context, question)
            latencies[url].append(ms)
            answers.append(answer)
        assert answers[0] == answers[1], (question, answers)
    for url, ms in latencies.items():
        runs = [round(statistics.median(ms[i:i + 24])) for i in range(0, len(ms), 24)]
        print(url, f"p50 {statistics.median(ms):.0f} mean {statistics.mean(ms):.0f}", "by 24:", runs,
              "query/hit tokens", prefix_tokens(url))


if __name__ == "__main__":
    main()

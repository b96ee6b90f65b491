"""/answer scores and /nli probabilities of a prefix-caching server against an uncached one, both with draft tokens
off, over the first N SQuAD dev questions asked twice (the second time mostly from the cache):

    loraswap serve --port 8010 --draft-tokens 0 &
    loraswap serve --port 8011 --draft-tokens 0 --prefix-cache-bytes 0 &
    python scores.py 60

Output: scores.txt (the cached server at this session's tree, then at 2ab66e7, whole blocks only).
"""
import gzip
import json
import sys
import urllib.request

SQUAD = "/work/shared/data/squad/dev-v1.1.json.gz"


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://localhost:{port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request).read())


def main() -> None:
    with gzip.open(SQUAD) as file:
        data = json.load(file)["data"]
    questions = [(paragraph["context"], qa["question"]) for article in data for paragraph in article["paragraphs"]
                 for qa in paragraph["qas"]][:int(sys.argv[1])]
    pairs, differ, score_diff, probability_diff = 0, 0, 0.0, 0.0
    for _ in range(2):
        for context, question in questions:
            cached, whole = (post(port, "/answer", {"context": context, "question": question}) for port in (8010, 8011))
            pairs, differ = pairs + 1, differ + (cached["answer"] != whole["answer"])
            score_diff = max(score_diff, abs(cached["score"] - whole["score"]) / max(abs(whole["score"]), 1e-12))
            body = {"premise": context[:200], "hypothesis": question}
            cached, whole = (post(port, "/nli", body)["probabilities"] for port in (8010, 8011))
            probability_diff = max(probability_diff, *(abs(cached[label] - whole[label]) for label in whole))
    print(f"{pairs} /answer pairs, {differ} answers differ, score max relative diff {score_diff:.2e}; "
          f"/nli probability max abs diff {probability_diff:.2e}")


if __name__ == "__main__":
    main()

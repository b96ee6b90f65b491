"""The same SQuAD dev questions (every 97th, the first N) to two servers: their /answer answers and scores, and a greedy
/v1/completions with logprobs of each context's first 400 characters and question (same text asserted).

    loraswap serve --port 8300 & loraswap serve --port 8301 --draft-tokens 0 &
    python docs/results/drafts/same_answers.py http://127.0.0.1:8300 http://127.0.0.1:8301 40
"""
import gzip
import json
import sys

import httpx

first, second, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with gzip.open("/work/shared/data/squad/dev-v1.1.json.gz") as file:
    data = json.load(file)["data"]
questions = [(p["context"], q["question"]) for article in data for p in article["paragraphs"] for q in p["qas"]]
questions = questions[::97][:n]
worst_score, same, worst_logprob = 0.0, 0, 0.0
with httpx.Client(timeout=120) as client:
    for context, question in questions:
        replies = [client.post(f"{url}/answer", json={"context": context, "question": question}).json()
                   for url in (first, second)]
        same += replies[0]["answer"] == replies[1]["answer"]
        scores = [reply["score"] for reply in replies]
        worst_score = max(worst_score, abs(scores[0] - scores[1]) / max(abs(scores[0]), 1e-9))
        body = {"model": "squad", "prompt": f"{context[:400]}\nQ: {question}\nA:", "max_tokens": 16, "logprobs": 2,
                "temperature": 0}
        choices = [client.post(f"{url}/v1/completions", json=body).json()["choices"][0] for url in (first, second)]
        assert choices[0]["text"] == choices[1]["text"], [choice["text"] for choice in choices]
        pairs = zip(*(choice["logprobs"]["token_logprobs"] for choice in choices))
        worst_logprob = max([worst_logprob, *(abs(x - y) for x, y in pairs)])
print(f"{same}/{len(questions)} same answers; largest relative score difference {worst_score:.2e}; "
      f"largest logprob difference {worst_logprob:.2e}")

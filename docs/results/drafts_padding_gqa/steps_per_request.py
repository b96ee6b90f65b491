"""Decoding steps per /answer request, from a server's own counters: COUNT new SQuAD dev questions (after the first 8,
as side-by-side --fresh-questions takes them) sent one at a time, greedy and extractive as side-by-side sends them;
then, from /metrics, generated tokens G, draft tokens fed D and taken A: each request's first token comes from its
prompt pass, every other token not taken from a draft from a step of its own, so steps = G - COUNT - A. Writes the
answers to ANSWERS_JSON (to compare two servers' answers).

    loraswap serve &   # a fresh server: the counters start at 0
    HF_HUB_OFFLINE=1 python docs/results/drafts_padding_gqa/steps_per_request.py http://127.0.0.1:8000 400 OUT.json
"""
import json
import re
import sys
from pathlib import Path

import httpx

from loadtest.workload import workloads
from training.data import data_dir

url, count, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
items = workloads(["squad"], count, 8, data_dir())[0]
answers = []
with httpx.Client(timeout=120) as client:
    for item in items:
        body = {**item.fields, "adapter": "squad", "extractive": True,
                "decoding": {"strategy": "greedy", "max_new_tokens": 32}}
        reply = client.post(f"{url}/answer", json=body)
        reply.raise_for_status()
        answers.append(reply.json()["answer"])
    metrics = client.get(f"{url}/metrics").text


def total(name: str) -> float:
    return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", metrics, re.M))


generated, fed, taken = (total(f"loraswap_{name}_total") for name in ("generated_tokens", "draft_tokens",
                                                                       "accepted_draft_tokens"))
steps = generated - count - taken
print(json.dumps({"requests": count, "generated": generated, "drafts_fed": fed, "drafts_taken": taken,
                  "steps": steps, "steps_per_request": round(steps / count, 4)}))
Path(out).write_text(json.dumps(answers))

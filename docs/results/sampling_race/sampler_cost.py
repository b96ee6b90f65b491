"""Milliseconds per call of the sampler on 8 rows of SmolLM2-135M-Instruct's real next-token logits (48 positions:
8 steps of a sampled continuation of six prompts, in batches of 8), this commit's against b061d1d's (OLD_TREE, the
path of a checkout of b061d1d), calls alternated, per strategy; the median of 5 passes over the 6 batches.
Usage: python sampler_cost.py OLD_TREE (output: sampler_cost.txt)"""
import importlib.util
import statistics
import sys
import time

import torch

from service.engine.sampling import Decoding, Sampler
from service.model.base_model import load_base
from service.settings import Settings

PROMPTS = ["The history of the Normans", "Super Bowl 50 was", "In a small village there lived",
           "The theory of relativity", "Question: What is the capital of France?\nAnswer:", "Once upon a time"]
DECODINGS = [Decoding("temperature", 1.0), Decoding("nucleus", 1.0, top_p=0.9), Decoding("nucleus", 1.0, top_p=0.95),
             Decoding("nucleus", 1.0, top_p=0.99), Decoding("top_k", 1.0, top_k=50)]


def old_sampler_class(tree: str) -> type:
    spec = importlib.util.spec_from_file_location("old_sampling", f"{tree}/service/engine/sampling.py")
    module = sys.modules["old_sampling"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Sampler


def real_logits() -> torch.Tensor:
    model, tokenizer = load_base(Settings())
    rows, generator = [], torch.Generator().manual_seed(0)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        for _ in range(8):
            with torch.no_grad():
                logits = model(ids).logits[0, -1]
            rows.append(logits)
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, token[None]], dim=1)
    return torch.stack(rows)


def milliseconds(sampler_class: type, decoding: Decoding, batch: torch.Tensor) -> float:
    sampler = sampler_class([Decoding(decoding.strategy, decoding.temperature, decoding.top_k, decoding.top_p, seed=s)
                             for s in range(len(batch))], torch.device("cpu"))
    start = time.perf_counter()
    sampler(batch, 3)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    old, logits = old_sampler_class(sys.argv[1]), real_logits()
    for decoding in DECODINGS:
        passes = {"old": [], "new": []}
        for _ in range(5):
            for which, sampler_class in (("old", old), ("new", Sampler)):
                passes[which].append(sum(milliseconds(sampler_class, decoding, logits[i:i + 8])
                                         for i in range(0, len(logits), 8)) / (len(logits) // 8))
        print(f"{decoding.strategy} top_k={decoding.top_k} top_p={decoding.top_p}: ms per call of 8 rows: b061d1d "
              f"{statistics.median(passes['old']):.2f}, this commit {statistics.median(passes['new']):.2f}")


if __name__ == "__main__":
    main()

"""Forward passes of SmolLM2 (CPU) with its linear weights as loaded (the model file's pages, 40 bytes past a
64-byte boundary) and as aligned clones, alternated: 16 rows of one token, 4 rows of 64. Run from the project
root: python THIS_FILE"""
import statistics
import time

import torch

from service.base_model import load_base
from service.settings import Settings

model, _ = load_base(Settings(device="cpu"))
step, prompts = torch.randint(0, 1000, (16, 1)), torch.randint(0, 1000, (4, 64))
linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
loaded = [m.weight.data for m in linear]
cloned = [w.clone() for w in loaded]


def timed(label: str) -> None:
    with torch.inference_mode():
        for _ in range(3):
            model(input_ids=step)
        steps, passes = [], []
        for _ in range(15):
            started = time.perf_counter()
            model(input_ids=step)
            steps.append(time.perf_counter() - started)
            started = time.perf_counter()
            model(input_ids=prompts)
            passes.append(time.perf_counter() - started)
    print(f"{label}: 16x1 {statistics.median(steps) * 1000:.1f} ms, 4x64 {statistics.median(passes) * 1000:.1f} ms")


for _ in range(3):
    for module, weight in zip(linear, loaded):
        module.weight.data = weight
    timed("loaded weights")
    for module, weight in zip(linear, cloned):
        module.weight.data = weight
    timed("aligned clones")

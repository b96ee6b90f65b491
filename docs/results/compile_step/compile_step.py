"""A 1-row decoding step of SmolLM2 (fp32, 2 threads) over a 200-token DynamicCache: eager against torch.compile."""
import time

import torch
from transformers import DynamicCache

from service.model.base_model import load_base
from service.settings import Settings

model, _ = load_base(Settings())
ids = torch.randint(100, 40000, (1, 200))


def steps(m, n=30):
    with torch.inference_mode():
        cache = DynamicCache()
        m(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        tok = torch.tensor([[42]])
        for _ in range(3):
            m(input_ids=tok, cache=cache, use_cache=True)
        t0 = time.perf_counter()
        for _ in range(n):
            m(input_ids=tok, cache=cache, use_cache=True)
        return (time.perf_counter() - t0) / n * 1000


print(f"eager: {steps(model):.1f} ms/step", flush=True)
t0 = time.perf_counter()
compiled = torch.compile(model, dynamic=True)
first = steps(compiled, n=1)
print(f"compile + first run: {time.perf_counter()-t0:.0f} s", flush=True)
print(f"compiled: {steps(compiled):.1f} ms/step", flush=True)
print(f"eager again: {steps(model):.1f} ms/step", flush=True)

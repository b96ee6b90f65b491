"""One-row decoding steps of SmolLM2 (HF forward, KV cache of 200 tokens) on 2 threads: torch.profiler's CPU time
per op, summed over 20 steps."""
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(Path.home() / ".cache/loraswap/smollm2-135m-instruct", dtype=torch.float32)
model.eval()
ids = torch.randint(0, 49152, (1, 200))
with torch.no_grad():
    out = model(ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(5):
        model(token, cache=past, use_cache=True)
        past.crop(-1)
    started = time.perf_counter()
    for _ in range(20):
        model(token, cache=past, use_cache=True)
        past.crop(-1)
    print(f"step: {(time.perf_counter() - started) / 20 * 1000:.1f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            model(token, cache=past, use_cache=True)
            past.crop(-1)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))

"""SmolLM2's body (its 30 decoder layers, no LM head) over the weights of two copies of the converted cache, one
whose data starts 40 bytes past a 64-byte boundary (as converted before 3b2b547) and one aligned, loaded as the
server loads them (views of the file, linear layers through oneDNN), timed alternately in one process: 15 rounds of
10 forwards of 1, 8 and 24 tokens with no KV cache.
    python docs/results/aligned_weights/body_forward.py UNALIGNED_MODEL_DIR ALIGNED_MODEL_DIR"""
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from service.model.onednn_linear import use_onednn
from service.model.weight_alignment import data_start

torch.set_num_threads(2)
models = {}
for name, folder in zip(("unaligned", "aligned"), sys.argv[1:3]):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    use_onednn(model)
    offsets = {parameter.data_ptr() % 64 for parameter in model.parameters()}
    print(f"{name}: data starts at byte {data_start(f'{folder}/model.safetensors')}, weights at {offsets} mod 64")
    models[name] = model
with torch.no_grad():
    for tokens in (1, 8, 24):
        ids = torch.randint(0, 1000, (1, tokens))
        times = {name: [] for name in models}
        for _ in range(15):
            for name, model in models.items():
                model.model(input_ids=ids)
                start = time.perf_counter()
                for _ in range(10):
                    model.model(input_ids=ids)
                times[name].append((time.perf_counter() - start) * 100)
        ratio = statistics.median(a / u for a, u in zip(times["aligned"], times["unaligned"]))
        print(f"{tokens} tokens: ms a forward, min / median: "
              + ", ".join(f"{name} {min(t):.1f} / {statistics.median(t):.1f}" for name, t in times.items())
              + f"; aligned / unaligned, median of the rounds' ratios {ratio:.3f}")

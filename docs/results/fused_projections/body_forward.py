"""SmolLM2's body (its 30 decoder layers, no LM head, no KV cache) with its LoRA layers wrapped as the engine wraps
them (no adapter resident), once with q/k/v and gate/up fused (``fused_linears``) and once with ``fuse`` replaced
by a no-op, timed alternately in one process: 15 rounds of 10 forwards of 1, 8 and 24 tokens. The outputs of the two
are compared to the last bit.
    python docs/results/fused_projections/body_forward.py"""
import statistics
import time
from unittest import mock

import torch

from service.lora import layers as lora_layers
from service.model.base_model import load_base
from service.settings import Settings

torch.set_num_threads(2)
models = {}
for name in ("separate", "fused"):
    model, _ = load_base(Settings(device="cpu"))
    if name == "separate":
        with mock.patch.object(lora_layers, "fuse", lambda layers: None):
            lora_layers.LoraLayers(model, num_slots=2)
    else:
        lora_layers.LoraLayers(model, num_slots=2)
    models[name] = model.model
with torch.no_grad():
    for tokens in (1, 8, 24):
        ids = torch.randint(0, 1000, (1, tokens))
        outputs = {name: model(input_ids=ids).last_hidden_state for name, model in models.items()}
        times = {name: [] for name in models}
        for _ in range(15):
            for name, model in models.items():
                model(input_ids=ids)
                start = time.perf_counter()
                for _ in range(10):
                    model(input_ids=ids)
                times[name].append((time.perf_counter() - start) * 100)
        ratio = statistics.median(f / s for f, s in zip(times["fused"], times["separate"]))
        print(f"{tokens} tokens: ms a forward, min / median: "
              + ", ".join(f"{name} {min(t):.1f} / {statistics.median(t):.1f}" for name, t in times.items())
              + f"; fused / separate, median of the rounds' ratios {ratio:.3f}; outputs equal: "
              + str(torch.equal(outputs["fused"], outputs["separate"])))

"""What a decoding step's linear layers cost for 1 to 128 rows (oneDNN, the server's path on the CPU): all
211 of SmolLM2-135M's, a torch op after each as a model has; ms a step, five passes each, two rounds.

    HF_HUB_OFFLINE=1 python docs/results/drafts/step_rows.py
"""
import time

import torch

from service.model.base_model import load_base
from service.settings import Settings

model, _ = load_base(Settings())
weights = [module.weight.detach() for module in model.modules() if isinstance(module, torch.nn.Linear)]


def step(rows: int) -> float:
    inputs = {576: torch.randn(rows, 576), 1536: torch.randn(rows, 1536)}
    start = time.perf_counter()
    for _ in range(5):
        for weight in weights:
            torch.ops.mkldnn._linear_pointwise(inputs[weight.shape[1]], weight, None, "none", [], "").add_(1.0)
    return (time.perf_counter() - start) / 5 * 1e3


with torch.no_grad():
    for round_ in (1, 2):
        for rows in (1, 2, 4, 8, 16, 32, 64, 128):
            step(rows)
            print(f"round {round_}, {rows} rows: {step(rows):.1f} ms", flush=True)

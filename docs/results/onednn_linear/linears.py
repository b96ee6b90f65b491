"""All 211 linear layers of SmolLM2-135M (the tied LM head included) once each, at m input rows, with MKL (F.linear)
and with oneDNN (torch.ops.mkldnn._linear_pointwise), alternated, two rounds: ms per pass. 190 rows is about one
SQuAD prompt.

    HF_HUB_OFFLINE=1 python docs/results/onednn_linear/linears.py
"""
import time

import torch
import torch.nn.functional as F

from service.model.base_model import load_base
from service.settings import Settings

model, _ = load_base(Settings())
weights = [module.weight for module in model.modules() if isinstance(module, torch.nn.Linear)]
BACKENDS = {"mkl": lambda x, w: F.linear(x, w),
            "onednn": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")}
with torch.no_grad():
    for rows in (1, 8, 190):
        inputs = {width: torch.randn(rows, width) for width in (576, 1536)}
        for name in [*BACKENDS, *BACKENDS]:
            product = BACKENDS[name]
            for weight in weights:  # warm: oneDNN's kernels for these shapes
                product(inputs[weight.shape[1]], weight)
            start = time.perf_counter()
            for _ in range(20):
                for weight in weights:
                    product(inputs[weight.shape[1]], weight)
            print(f"{name:7s} m={rows}: {(time.perf_counter() - start) / 20 * 1e3:.1f} ms", flush=True)

"""SmolLM2-135M's linear layers bar the LM head (a prefill computes the LM head on its last rows only) once each, at
prompt-sized inputs of m rows, with MKL (F.linear) and with oneDNN (torch.ops.mkldnn._linear_pointwise), alternated,
two rounds of three passes: ms per pass. The first oneDNN pass at each m meets new shapes (its kernels are built).

    HF_HUB_OFFLINE=1 python docs/results/onednn_linear/prompt_rows.py
"""
import time

import torch
import torch.nn.functional as F

from service.model.base_model import load_base
from service.settings import Settings

model, _ = load_base(Settings())
weights = [module.weight for module in model.model.modules() if isinstance(module, torch.nn.Linear)]
BACKENDS = {"mkl": lambda x, w: F.linear(x, w),
            "onednn": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")}


def one_pass(product, inputs: dict) -> None:
    for weight in weights:
        product(inputs[weight.shape[1]], weight)


with torch.no_grad():
    for rows in (190, 800, 1500):
        inputs = {width: torch.randn(rows, width) for width in (576, 1536)}
        start = time.perf_counter()
        one_pass(BACKENDS["onednn"], inputs)
        print(f"onednn  m={rows}: {(time.perf_counter() - start) * 1e3:.0f} ms, first pass (new shapes)")
        for name in [*BACKENDS, *BACKENDS]:
            start = time.perf_counter()
            for _ in range(3):
                one_pass(BACKENDS[name], inputs)
            print(f"{name:7s} m={rows}: {(time.perf_counter() - start) / 3 * 1e3:.0f} ms", flush=True)

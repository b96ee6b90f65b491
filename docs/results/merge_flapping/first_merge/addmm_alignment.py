"""The in-place products of a merge (addmm_ of an r=16 delta into every linear weight of SmolLM2, CPU) into the
loaded weights (the model file's pages, after a first write copied them), into a clone of them, and into copies
placed 8 bytes past and at a 64-byte boundary. Run from the project root: python THIS_FILE"""
import time

import torch

from service.base_model import load_base
from service.settings import Settings

model, _ = load_base(Settings(device="cpu"))
linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
loaded = [m.weight.data for m in linear]
torch._foreach_mul_(loaded, 1.0)  # the first write copies every mapped page, as a merge into them does
cloned = [w.clone() for w in loaded]
A = [torch.randn(16, w.shape[1]) for w in loaded]
B = [torch.randn(w.shape[0], 16) for w in loaded]


def products_ms(weights) -> float:
    started = time.perf_counter()
    for w, a, b in zip(weights, A, B):
        w.addmm_(b, a)
    return (time.perf_counter() - started) * 1000


def placed(w: torch.Tensor, floats: int) -> torch.Tensor:
    out = torch.empty(w.numel() + 64)[floats:floats + w.numel()].view(w.shape)
    return out.copy_(w)


print("loaded weights' addresses mod 64:", sorted({w.data_ptr() % 64 for w in loaded}))
for _ in range(4):
    print(f"loaded {products_ms(loaded):.0f} ms   clone {products_ms(cloned):.0f} ms")
for floats in (2, 16):
    copies = [placed(w, floats) for w in loaded]
    print(f"copies {copies[0].data_ptr() % 64} bytes past 64:", [round(products_ms(copies)) for _ in range(3)], "ms")

"""How fast a one-row decoding step's products read the weights (GB/s of float32 weights read), on 1 and 2 threads:
all 211 linear layers of SmolLM2-135M at one row through oneDNN (plain, and with weights packed for one row by
``_reorder_linear_weight``, a copy) and MKL; the LM head alone through MKL's ``torch.mv`` and numpy's OpenBLAS;
``torch.sum`` over 540 MB as what memory gives. Two rounds.

    HF_HUB_OFFLINE=1 python docs/results/onednn_linear/decode_bandwidth.py
"""
import time

import torch
import torch.nn.functional as F

from service.model.base_model import load_base
from service.settings import Settings

model, _ = load_base(Settings())
weights = [module.weight.detach() for module in model.modules() if isinstance(module, torch.nn.Linear)]
head = model.lm_head.weight.detach()
packed = [torch.ops.mkldnn._reorder_linear_weight(weight, 1) for weight in weights]
rows = {576: torch.randn(1, 576), 1536: torch.randn(1, 1536)}
memory = torch.randn(135_000_000)


def onednn(x, weight):
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def step(product, layers):
    def run():
        for weight in layers:
            product(rows[weight.shape[1]], weight)
    return run


vector = rows[576][0]
CASES = {  # name: (one pass, bytes read)
    "all linears, oneDNN": (step(onednn, weights), sum(w.numel() for w in weights) * 4),
    "all linears, oneDNN packed": (step(onednn, packed), sum(w.numel() for w in weights) * 4),
    "all linears, MKL F.linear": (step(F.linear, weights), sum(w.numel() for w in weights) * 4),
    "LM head, MKL torch.mv": (lambda: torch.mv(head, vector), head.numel() * 4),
    "LM head, numpy OpenBLAS": (lambda: head.numpy() @ vector.numpy(), head.numel() * 4),
    "torch.sum over 540 MB": (lambda: memory.sum(), memory.numel() * 4),
}
with torch.no_grad():
    for round_ in (1, 2):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, (run, size) in CASES.items():
                run()
                start = time.perf_counter()
                for _ in range(5):
                    run()
                seconds = (time.perf_counter() - start) / 5
                print(f"round {round_}, {threads} thread(s), {name}: {size / seconds / 1e9:.1f} GB/s "
                      f"({seconds * 1e3:.1f} ms)", flush=True)

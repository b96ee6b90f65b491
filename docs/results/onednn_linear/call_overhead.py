"""The fixed cost of one call: a [1, 64] input through a [64, 64] weight (no arithmetic to speak of), with oneDNN
(the op packet, and its resolved overload) and with F.linear (MKL); us per call, two rounds.

    python docs/results/onednn_linear/call_overhead.py
"""
import time

import torch
import torch.nn.functional as F

weight, x = torch.randn(64, 64), torch.randn(1, 64)
CALLS = {"onednn (packet)": lambda: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""),
         "onednn (.default)": lambda: torch.ops.mkldnn._linear_pointwise.default(x, weight, None, "none", [], ""),
         "F.linear": lambda: F.linear(x, weight)}
with torch.no_grad():
    for _ in range(2):
        for name, call in CALLS.items():
            for _ in range(1000):
                call()
            start = time.perf_counter()
            for _ in range(20000):
                call()
            print(f"{name}: {(time.perf_counter() - start) / 20000 * 1e6:.1f} us", flush=True)

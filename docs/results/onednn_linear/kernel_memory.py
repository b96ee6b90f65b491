"""Resident memory (MB) and time as oneDNN meets new input shapes: one [1536, 576] weight, inputs of 1 to 400 rows,
each shape once, then all of them again; the mean time of a call, first meeting and again, tells what building a
shape's kernel costs. With an argument, F.linear (MKL) for comparison. Run it also with
ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 (oneDNN keeps no kernels).

    python docs/results/onednn_linear/kernel_memory.py [mkl]
"""
import ctypes
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def rss_mb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024


if len(sys.argv) > 1:
    def product(x, w):
        return F.linear(x, w)
else:
    def product(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

weight = torch.randn(1536, 576)
product(torch.randn(1, 576), weight)


def timed(rows: int) -> float:
    """Seconds of one product of ``rows`` rows (the input made outside the timing)."""
    x = torch.randn(rows, 576)
    start = time.perf_counter()
    product(x, weight)
    return time.perf_counter() - start


print("start", rss_mb())
first = 0.0
for rows in range(1, 401):
    first += timed(rows)
    if rows % 100 == 0:
        print(rows, "shapes", rss_mb(), flush=True)
ctypes.CDLL("libc.so.6").malloc_trim(0)
print("after malloc_trim", rss_mb())
again = sum(timed(rows) for rows in range(1, 401))
print("the same shapes again", rss_mb())
print(f"mean call: {first / 400 * 1e3:.2f} ms at first meeting, {again / 400 * 1e3:.2f} ms again")

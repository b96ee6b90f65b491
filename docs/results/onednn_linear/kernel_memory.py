"""Resident memory as oneDNN meets new input shapes: one [1536, 576] weight, inputs of 1 to 400 rows, each shape
once, then all of them again (MB). With an argument, F.linear (MKL) for comparison. Run it also with
ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 (oneDNN keeps no kernels).

    python docs/results/onednn_linear/kernel_memory.py [mkl]
"""
import ctypes
import re
import sys
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
print("start", rss_mb())
for rows in range(1, 401):
    product(torch.randn(rows, 576), weight)
    if rows % 100 == 0:
        print(rows, "shapes", rss_mb(), flush=True)
ctypes.CDLL("libc.so.6").malloc_trim(0)
print("after malloc_trim", rss_mb())
for rows in range(1, 401):
    product(torch.randn(rows, 576), weight)
print("the same shapes again", rss_mb())

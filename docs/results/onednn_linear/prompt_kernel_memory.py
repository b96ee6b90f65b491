"""Resident memory (MB over the start) as oneDNN meets prompts: 300 prompts of 65-700 rows (seeded), each through
SmolLM2's four layer shapes, each followed by decoding steps of 1, 2, 4 and 8 rows, with oneDNN's and ideep's kernel
caches at their defaults (1,024 entries each), bounded to N entries each, oneDNN's alone bounded ("onednn:N"), or
both bounded only after the first oneDNN call ("late": no effect, both are read then).

    python docs/results/onednn_linear/prompt_kernel_memory.py default|N|onednn:N|late
"""
import os
import random
import re
import sys
import time
from pathlib import Path

import torch

CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


setting = sys.argv[1]
if setting == "late":
    product(torch.randn(3, 8), torch.randn(4, 8))
if setting.startswith("onednn:"):
    os.environ[CACHES[0]] = setting.removeprefix("onednn:")
elif setting != "default":
    os.environ.update(dict.fromkeys(CACHES, "64" if setting == "late" else setting))
weights = [torch.randn(out, width) for out, width in ((576, 576), (192, 576), (1536, 576), (576, 1536))]
random.seed(0)
start, began = rss_mb(), time.perf_counter()
for prompt in range(1, 301):
    for rows in (random.randint(65, 700), 1, 2, 4, 8):
        for weight in weights:
            product(torch.randn(rows, weight.shape[1]), weight)
    if prompt % 100 == 0:
        print(f"{setting}: {prompt} prompts {rss_mb() - start:+.0f} MB", flush=True)
print(f"{setting}: {time.perf_counter() - began:.1f} s")

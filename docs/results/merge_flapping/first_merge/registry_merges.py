"""First and later merges of the shipped adapters on SmolLM2 (CPU) through the registry, with the process's
anonymous and file-backed RSS after each. Run from the project root; for another commit's registry, from a
worktree of it: PYTHONPATH=/tmp/old python docs/results/merge_flapping/first_merge/registry_merges.py"""
import time
from pathlib import Path

import torch

from service.base_model import load_base
from service.settings import Settings
from service.registry import AdapterRegistry
def rss():
    out = {}
    for l in open("/proc/self/status"):
        if l.startswith(("RssAnon", "RssFile")): k, v = l.split(":"); out[k] = int(v.split()[0]) // 1024
    return out
model, _ = load_base(Settings(device="cpu"))
root = Path("adapters")
reg = AdapterRegistry(model, [root.resolve()], 4, 64)
reg.register("squad", root / "squad"); reg.register("nli", root / "nli")
with torch.inference_mode():
    model(input_ids=torch.zeros(1, 8, dtype=torch.long))  # a forward first, as a server has done before merging
    print("after a forward", rss())
    for i, name in enumerate(["squad", "nli", "squad", "nli", "squad"]):
        s = time.perf_counter(); reg.merge(name); m = time.perf_counter() - s
        s = time.perf_counter(); reg.unmerge(); u = time.perf_counter() - s
        print(f"merge {i} {name}: {m*1000:.0f} ms, unmerge {u*1000:.0f} ms", rss())

"""SmolLM2-135M's linear layers bar the LM head at one row (a decoding step) and 190 rows (a prompt), MKL against
oneDNN, with the other core idle or busy (a second process spinning in Python), alternated, two rounds: ms a pass.
Run it also with OMP_NUM_THREADS=1 (torch's team of one thread).

    HF_HUB_OFFLINE=1 python docs/results/onednn_linear/contention.py
"""
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from service.model.base_model import load_base
from service.settings import Settings

model, _ = load_base(Settings(onednn=False))
ws = [m.weight.detach() for m in model.model.modules() if isinstance(m, torch.nn.Linear)]
BACKENDS = {"mkl": lambda x, w: F.linear(x, w),
            "onednn": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")}


def run(name: str, rows: int, n: int) -> float:
    """ms of one pass over the layers, the mean of ``n`` after a warm one."""
    xs = {576: torch.randn(rows, 576), 1536: torch.randn(rows, 1536)}
    for w in ws:
        BACKENDS[name](xs[w.shape[1]], w)
    start = time.perf_counter()
    for _ in range(n):
        for w in ws:
            BACKENDS[name](xs[w.shape[1]], w)
    return (time.perf_counter() - start) / n * 1e3


with torch.no_grad():
    for busy in (False, True, False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        time.sleep(0.5)
        for rows, n in ((1, 10), (190, 2)):
            times = ", ".join(f"{name} {run(name, rows, n):.0f} ms" for name in BACKENDS)
            print(f"threads {torch.get_num_threads()}, other core busy: {busy}, rows {rows}: {times}", flush=True)
        if hog:
            hog.kill()
            hog.wait()

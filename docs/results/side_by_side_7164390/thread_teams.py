"""SiLU times a product of [1, 154, 1536] on a second thread, after the main thread ran torch ops or not.

    python thread_teams.py main_first    # the main thread runs them first: it keeps an OpenMP team while it lives
    python thread_teams.py thread_only   # only the second thread runs torch ops
"""
import sys
import threading
import time

import torch


def timed(tag: str) -> None:
    x, y = torch.randn(1, 154, 1536), torch.randn(1, 154, 1536)
    for _ in range(20):
        torch.mul(x, y)
    start = time.perf_counter()
    for _ in range(2000):
        torch.nn.functional.silu(x) * y
    print(f"{tag}: {(time.perf_counter() - start) / 2000 * 1e6:.1f} us per silu*mul", flush=True)


if sys.argv[1] == "main_first":
    timed("main thread")
second = threading.Thread(target=timed, args=("second thread",))
second.start()
second.join()

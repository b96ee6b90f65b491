"""F.linear of [m, 576] by SmolLM2's [1536, 576] MLP weight on 2 threads: microseconds and GFLOP/s at m = 1, 8, 190."""
import time

import torch

torch.set_num_threads(2)
for m in (1, 8, 190):
    a, w = torch.randn(m, 576), torch.randn(1536, 576)
    for _ in range(20):
        torch.nn.functional.linear(a, w)
    n = 2000 if m < 100 else 200
    started = time.perf_counter()
    for _ in range(n):
        torch.nn.functional.linear(a, w)
    seconds = (time.perf_counter() - started) / n
    print(f"m={m}: {seconds * 1e6:.1f} us, {2 * m * 576 * 1536 / seconds / 1e9:.1f} GFLOP/s")

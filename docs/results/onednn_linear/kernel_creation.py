"""The first oneDNN inner product at a new row count (a kernel made) against the best of 20 later ones, for a
[1536, 576] weight. Run: LRU_CACHE_CAPACITY=64 ONEDNN_PRIMITIVE_CACHE_CAPACITY=64 python kernel_creation.py (output:
kernel_creation.txt)."""
import time

import torch


def timed(x: torch.Tensor, weight: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(1536, 576) * 0.02
    for m in (33, 41, 57, 77, 99, 150, 151):
        x = torch.randn(m, 576)
        first = timed(x, weight)
        best = min(timed(x, weight) for _ in range(20))
        print(m, f"first {first * 1e3:.2f} ms, then {best * 1e3:.2f} ms")


if __name__ == "__main__":
    main()

"""oneDNN's inner product (the op OneDnnLinear calls) over SmolLM2-135M's four linear layer shapes, 30 of each (its
body's q/o, k/v, gate/up and down products), in float32 and in bfloat16, alternated in rounds: per row count, the
median over 9 rounds of each dtype's time (ms) and of the rounds' bfloat16 / float32 ratios.
Run: python docs/results/bf16_cpu/products.py (torch's default threads: 2 on the 2-vCPU host)."""
import statistics
import time

import torch

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # [out, in]
LAYERS = 30


def weights(dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(out, width).to(dtype) for out, width in SHAPES for _ in range(LAYERS)]


def products(ws: list[torch.Tensor], inputs: dict[int, torch.Tensor]) -> float:
    started = time.perf_counter()
    for w in ws:
        torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], w, None, "none", [], "")
    return (time.perf_counter() - started) * 1000


def main() -> None:
    dtypes = (torch.float32, torch.bfloat16)
    ws = {dtype: weights(dtype) for dtype in dtypes}
    for rows in (1, 8, 24, 64, 150, 256):
        inputs = {dtype: {width: torch.randn(rows, width).to(dtype) for _, width in SHAPES} for dtype in dtypes}
        for dtype in dtypes:  # kernels made, caches warm
            products(ws[dtype], inputs[dtype])
        times = {dtype: [] for dtype in dtypes}
        for _ in range(9):
            for dtype in dtypes:
                times[dtype].append(products(ws[dtype], inputs[dtype]))
        ratios = [b / a for a, b in zip(times[torch.float32], times[torch.bfloat16])]
        print(f"rows {rows}: float32 {statistics.median(times[torch.float32]):.1f} ms, bfloat16 "
              f"{statistics.median(times[torch.bfloat16]):.1f} ms, ratio (median) {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()

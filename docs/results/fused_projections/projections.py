"""SmolLM2's q/k/v and gate/up products alone, over random weights of its shapes (30 layers: q [576, 576], k and v
[192, 576], gate and up [1536, 576]), as five oneDNN products a layer or as two over the weights stacked, timed
alternately in one process: 15 rounds of 5 passes over the 30 layers, for 1, 8 and 24 rows; the products compared to
the last bit.
    python docs/results/fused_projections/projections.py"""
import statistics
import time

import torch

from service.model.onednn_linear import inner_product

torch.set_num_threads(2)
LAYERS = 30
separate = [[torch.randn(out, 576) for out in (576, 192, 192, 1536, 1536)] for _ in range(LAYERS)]
fused = [[torch.cat(weights[:3]), torch.cat(weights[3:])] for weights in separate]


def run(weights: list[list[torch.Tensor]], x: torch.Tensor) -> list[torch.Tensor]:
    return [inner_product(x, weight, None) for layer in weights for weight in layer]


for rows in (1, 8, 24):
    x = torch.randn(rows, 576)
    equal = torch.equal(torch.cat(run(separate[:1], x), -1), torch.cat(run(fused[:1], x), -1))
    times = {"separate": [], "fused": []}
    for _ in range(15):
        for name, weights in (("separate", separate), ("fused", fused)):
            run(weights, x)
            start = time.perf_counter()
            for _ in range(5):
                run(weights, x)
            times[name].append((time.perf_counter() - start) / 5 * 1000)
    ratio = statistics.median(f / s for f, s in zip(times["fused"], times["separate"]))
    print(f"{rows} rows: ms for 30 layers, min / median: "
          + ", ".join(f"{name} {min(t):.2f} / {statistics.median(t):.2f}" for name, t in times.items())
          + f"; fused / separate, median of the rounds' ratios {ratio:.3f}; products equal: {equal}")

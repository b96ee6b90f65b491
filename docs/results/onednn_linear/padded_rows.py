"""oneDNN's inner product (the op ``OneDnnLinear`` calls) over all 30 layers of SmolLM2-sized linears (q, k, v, o,
gate, up, down; random weights) for inputs of m rows: best of 7 per m, three rounds. Run: python padded_rows.py
(output: padded_rows.txt)."""
import time

import torch

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)


def main() -> None:
    torch.manual_seed(0)
    layers = [[torch.randn(out, in_) * 0.02 for out, in_ in SHAPES] for _ in range(30)]
    for round_ in range(3):
        for m in (1, 8, 16, 20, 24, 32, 40, 48, 64):
            inputs = {width: torch.randn(m, width) for width in (576, 1536)}
            best = float("inf")
            for _ in range(7):
                start = time.perf_counter()
                for layer in layers:
                    for weight in layer:
                        torch.ops.mkldnn._linear_pointwise(inputs[weight.shape[1]], weight, None, "none", [], "")
                best = min(best, time.perf_counter() - start)
            print(round_, m, f"{best * 1000:.1f} ms", flush=True)


if __name__ == "__main__":
    main()

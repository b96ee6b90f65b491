"""The aten ops one decoding step runs (views apart), by name: the bare base against 16 r=8 adapters mixed in the batch,
in the dense form the GPU's captured steps use (on the GPU each op that is not a view is one kernel of the graph).

    python scripts/count_step_ops.py --rows 64 --targets attention   # SmolLM2, eager, on the CPU unless --device cuda
"""
import argparse
import copy
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loadtest.bench import TARGET_SETS, random_adapters
from service.base_model import load_base
from service.decode_step import DecodeStep
from service.registry import AdapterRegistry
from service.settings import Settings


class OpNames(TorchDispatchMode):
    """Counts the aten ops run inside it, by name, apart from views (they launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--targets", choices=sorted(TARGET_SETS), default="attention", help="as loraswap bench's")
    args = parser.parse_args()
    model, _ = load_base(Settings(device=args.device))
    work = Path(tempfile.mkdtemp())
    names = [f"a{i}" for i in range(16)]
    random_adapters(copy.deepcopy(model), names, 8, TARGET_SETS[args.targets], work)
    registry = AdapterRegistry(model, [work], len(names), 64)
    registry.rows.dense_decode = True
    for name in names:
        registry.register(name, work / name)
    step = DecodeStep(model, registry.rows, cuda_graphs=False, max_rows=args.rows)
    with torch.inference_mode():  # an 8-token prompt per row gives the step's cache its shapes
        prompt = model(input_ids=torch.ones(args.rows, 8, dtype=torch.long, device=registry.device), use_cache=True)
    step.cache.reserve(args.rows, 9, used=(0, 0), like=prompt.past_key_values)
    for label, rows in (("bare", [None] * args.rows), ("mixed", [names[i % 16] for i in range(args.rows)])):
        registry.activate(rows)
        with torch.inference_mode(), OpNames() as ops:
            step([1] * args.rows, [8] * args.rows)
        top = ", ".join(f"{name} {count}" for name, count in ops.counts.most_common(8))
        print(f"{label}: {sum(ops.counts.values())} ops that are not views ({top})")


if __name__ == "__main__":
    main()

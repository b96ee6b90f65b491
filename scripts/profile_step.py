"""One decoding step and one prompt pass of SmolLM2, bare against 16 r=8 adapters mixed in the batch, side by side:
the aten ops a step runs (views apart: on the GPU each other op is one kernel of the captured step), by name, and
the median time of each, eager.

    python scripts/profile_step.py --rows 64 --targets attention --form dense   # the form the GPU's steps use
    python scripts/profile_step.py --rows 16 --repeats 15                      # the CPU's (grouped) form, timed
"""
import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch

from loadtest.bench import random_adapters
from loadtest.op_counts import OpCounts
from loadtest.options import BENCH_TARGETS
from loadtest.timing import timed
from service.engine.decode_step import DecodeStep
from service.engine.prefill import Prefill
from service.engine.row_mapping import map_rows
from service.lora.registry import AdapterRegistry
from service.model.base_model import load_base
from service.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--targets", choices=BENCH_TARGETS, default="attention", help="as loraswap bench's")
    parser.add_argument("--form", choices=["dense", "grouped"], help="of the steps' LoRA (default: the engine's)")
    parser.add_argument("--prompt-tokens", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=0, help="timed steps and prompt passes of each, alternated")
    args = parser.parse_args()
    model, _ = load_base(Settings(device=args.device))
    work = Path(tempfile.mkdtemp())
    names = [f"a{i}" for i in range(16)]
    random_adapters(copy.deepcopy(model), names, 8, args.targets, work)
    registry = AdapterRegistry(model, [work], len(names), 64)
    if args.form:
        registry.layers.mapping.dense_decode = args.form == "dense"
    for name in names:
        registry.register(name, work / name)
    device, prompt_tokens = registry.device, args.prompt_tokens
    prompts = torch.randint(100, 1000, (args.rows, prompt_tokens), generator=torch.Generator().manual_seed(0)).tolist()
    step = DecodeStep(model, registry.layers, cuda_graphs=False, max_rows=args.rows)
    mappings = {"bare": [None] * args.rows, "mixed": [names[i % len(names)] for i in range(args.rows)]}
    with torch.inference_mode():
        step.cache.reserve(args.rows, prompt_tokens + 1, used=(0, 0),
                           like=model(input_ids=torch.tensor(prompts, device=device), use_cache=True).past_key_values)
        work_of = {"step": lambda: step([1] * args.rows, [prompt_tokens] * args.rows),
                   "prompt pass": lambda: Prefill(model, prompts, 0, device).advance(0)}
        for label, rows in mappings.items():
            map_rows(registry, [registry.lookup(name) for name in rows])
            work_of["step"]()  # the first step of a mapping gathers its adapters' weights (grouped form)
            with OpCounts() as ops:
                work_of["step"]()
            top = ", ".join(f"{name} {count}" for name, count in ops.counts.most_common(8))
            print(f"{label} step: {sum(ops.counts.values())} ops that are not views ({top})")
        seconds = {(label, kind): [] for label in mappings for kind in work_of}
        for _ in range(args.repeats):
            for (label, kind), times in seconds.items():
                map_rows(registry, [registry.lookup(name) for name in mappings[label]])
                times.append(timed(work_of[kind], device))
    for kind in work_of if args.repeats else ():
        bare, mixed = (statistics.median(seconds[(label, kind)]) * 1000 for label in mappings)
        print(f"{kind}, median of {args.repeats}: bare {bare:.1f} ms, mixed {mixed:.1f} ms, "
              f"mixed / bare speed {bare / mixed:.2f}")


if __name__ == "__main__":
    main()

"""SmolLM2's body with the shipped adapters squad and nli resident and applied per row, as the engine batches them,
once with q/k/v and gate/up fused (``fused_linears``) and once with ``fuse`` replaced by a no-op, timed alternately
in one process: 9 rounds of 3 forwards per batch shape (rows x tokens: decoding steps with drafts and prompts, mixed
adapters or one), no KV cache; outputs compared to the last bit.
    python docs/results/fused_projections/with_adapters.py"""
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository, for tests.lora_helpers
from service.lora import layers as lora_layers
from service.lora.registry import AdapterRegistry
from service.model.base_model import load_base
from service.settings import Settings
from tests.lora_helpers import activate

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[3] / "adapters"
SHAPES = ((8, 1, ["squad", "nli"] * 4), (8, 4, ["squad", "nli"] * 4), (2, 8, ["squad", "nli"]),
          (4, 20, ["squad", "nli"] * 2), (8, 40, ["squad", "nli"] * 4), (1, 200, ["squad"]), (1, 200, [None]))
models = {}
for name in ("separate", "fused"):
    model, _ = load_base(Settings(device="cpu"))
    with mock.patch.object(lora_layers, "fuse", lora_layers.fuse if name == "fused" else lambda layers: None):
        registry = AdapterRegistry(model, roots=[ROOT], max_resident=4, max_rank=64)
    for adapter in ("squad", "nli"):
        registry.register(adapter, ROOT / adapter)
    models[name] = (model, registry)
with torch.no_grad():
    for rows, tokens, names in SHAPES:
        ids = torch.randint(0, 1000, (rows, tokens))
        times, outputs = {name: [] for name in models}, {}
        for _ in range(9):
            for name, (model, registry) in models.items():
                activate(registry, names)
                outputs[name] = model.model(input_ids=ids).last_hidden_state
                start = time.perf_counter()
                for _ in range(3):
                    model.model(input_ids=ids)
                times[name].append((time.perf_counter() - start) / 3 * 1000)
        ratio = statistics.median(f / s for f, s in zip(times["fused"], times["separate"]))
        print(f"{rows} x {tokens} tokens, adapters {sorted(set(map(str, names)))}: ms a forward, median: "
              + ", ".join(f"{name} {statistics.median(t):.1f}" for name, t in times.items())
              + f"; fused / separate, median of the rounds' ratios {ratio:.3f}; outputs equal: "
              + str(torch.equal(outputs["fused"], outputs["separate"])))

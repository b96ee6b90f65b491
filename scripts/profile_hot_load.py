"""Where the time of a hot-load goes: each phase of registering (file to host) and of activating (host to a device
slot) an r=16 all-linear SmolLM2 adapter, timed alone, beside the alternatives tried for reading the file, packing
B, the transfer and the copies into the slot; the last line is a whole hot-load and unload through the registry.

    python scripts/profile_hot_load.py --device cuda   # prints p50 per phase (ms)
"""
import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load

from loadtest.bench import TARGET_SETS, random_adapters, sync
from service import adapter_files
from service.base_model import load_base
from service.registry import AdapterRegistry
from service.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loads", type=int, default=30)
    args = parser.parse_args()
    model, _ = load_base(Settings(device=args.device))
    work = Path(tempfile.mkdtemp())
    random_adapters(copy.deepcopy(model), ["hot"], 16, TARGET_SETS["all_linear"], work, seed=1)
    registry = AdapterRegistry(model, [work], 16, 64)
    device, dtype = registry.device, registry.dtype
    folder = work / "hot"
    adapter = adapter_files.load_adapter("hot", folder, registry.shapes, 64, dtype)
    registry.register("resident", folder)
    registry.activate(["resident"])  # keeps the banks (r=16, all modules) allocated; it sits in slot 0
    times: dict[str, list[float]] = {}

    def phase(label, fn):
        sync(device)
        started = time.perf_counter()
        result = fn()
        sync(device)
        times.setdefault(label, []).append((time.perf_counter() - started) * 1000)
        return result

    slot, size = 1, adapter.packed.numel()
    bank = [view[:16] for module in adapter.layout for view in registry.layers[module].slot(slot)]
    for _ in range(args.loads):
        weights = phase("register: read the file (now: views of its bytes)", lambda: adapter_files.read_weights(folder))
        phase("register: read the file (before: safetensors load)",
              lambda: load((folder / adapter_files.WEIGHTS_FILE).read_bytes()))
        a_parts = [weights[f"base_model.model.{module}.lora_A.weight"] for module in adapter.layout]
        b_parts = [weights[f"base_model.model.{module}.lora_B.weight"] for module in adapter.layout]
        packed = adapter_files.host_buffer(size, dtype)
        views = [view for pair in adapter.views(packed).values() for view in pair]  # A, B^T, ...
        phase("register: pack A, B^T, one thread (before)", lambda: (
            torch._foreach_copy_(views, [t for pair in zip(a_parts, [b.t() for b in b_parts]) for t in pair]),
            torch._foreach_mul_(views[1::2], 2.0)))
        untransposed = [view for pair in adapter.views(adapter_files.host_buffer(size, dtype)).values() for view in pair]
        untransposed[1::2] = [view.view(view.shape[::-1]) for view in untransposed[1::2]]  # B [out, r] in B^T's place
        phase("register: pack A, B as stored (tried)", lambda: (
            torch._foreach_copy_(untransposed, [t for pair in zip(a_parts, b_parts) for t in pair]),
            torch._foreach_mul_(untransposed[::2], 2.0)))
        phase("register: finite check", lambda: torch.isfinite(torch.stack(torch.aminmax(packed))).all())
        phase("register: all (load_adapter)", lambda: adapter_files.load_adapter("hot", folder, registry.shapes, 64, dtype))
        on_device = phase("activate: transfer (pageable, now)", lambda: packed.to(device, non_blocking=True))
        if device.type == "cuda":
            pinned = phase("activate: pin a copy (tried, host)", lambda: packed.pin_memory())
            phase("activate: transfer (pinned, tried)", lambda: pinned.to(device, non_blocking=True))
        modules = tuple(adapter.layout)
        phase("activate: copy into the slot (now: kept flat views)", lambda: torch._foreach_copy_(
            registry._flat_views(slot, 16, modules), adapter.segments(on_device)))

        def per_module_views():  # what activation built every time before
            sources = [view for pair in adapter.views(on_device).values() for view in pair]
            torch._foreach_copy_([view[:16] for module in adapter.layout for view in registry.layers[module].slot(slot)],
                                 sources)
            return sources
        sources = phase("activate: copy into the slot (before: views made per module)", per_module_views)
        transposing = [view if i % 2 == 0 else view.view(view.shape[::-1]).t() for i, view in enumerate(sources)]
        phase("activate: copy A, B transposed on the device (tried)", lambda: torch._foreach_copy_(bank, transposing))
        phase("hot-load and unload through the registry (now)", lambda: (
            registry.register("timed", folder), registry.activate(["timed"]),
            registry.unregister("timed"), registry.activate([])))
    for label, values in times.items():
        print(f"{label:50s} p50 {statistics.median(values):7.2f} ms")


if __name__ == "__main__":
    main()

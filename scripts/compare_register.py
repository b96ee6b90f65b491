"""Register time of an r=16 all-linear SmolLM2 adapter: the reader before commit "Registering an adapter reads
its file in one go" (``load_file`` into a pre-faulted map) against the current one, interleaved in one process.

    python scripts/compare_register.py   # CPU; prints p50/p95 per reader
"""
import copy
import mmap
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from loadtest.bench import TARGET_SETS, random_adapters
from service import adapter_files
from service.base_model import load_base
from service.registry import AdapterRegistry
from service.settings import Settings


def prefaulted_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return torch.frombuffer(mmap.mmap(-1, numel * dtype.itemsize, flags=flags), dtype=dtype)


def per_tensor_read(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / adapter_files.WEIGHTS_FILE)


def main(loads: int = 40) -> None:
    readers = {"before": (prefaulted_buffer, per_tensor_read),
               "now": (adapter_files.host_buffer, adapter_files.read_weights)}
    model, _ = load_base(Settings(device="cpu"))
    work = Path(tempfile.mkdtemp())
    random_adapters(copy.deepcopy(model), ["hot"], 16, TARGET_SETS["all_linear"], work, seed=1)
    registry = AdapterRegistry(model, [work], 16, 64)
    times = {label: [] for label in readers}
    for i in range(loads):
        for label, (buffer, read) in readers.items():
            adapter_files.host_buffer, adapter_files.read_weights = buffer, read
            started = time.perf_counter()
            registry.register(f"{label}{i}", work / "hot")
            times[label].append((time.perf_counter() - started) * 1000)
            registry.unregister(f"{label}{i}")
    for label, values in times.items():
        values.sort()
        print(f"{label}: register p50 {values[len(values) // 2]:.1f} ms, p95 {values[int(len(values) * 0.95)]:.1f} ms")


if __name__ == "__main__":
    main()

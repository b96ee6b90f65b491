"""Reading and checking one PEFT LoRA adapter folder on the host, before any device memory is touched."""
from __future__ import annotations

import json
import math
import mmap
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
BASE_MODEL_ID = "base"  # the bare base model's OpenAI model id
BASE_LABEL = "none"  # the bare base model's metric label (and `loraswap eval --adapter none`)
RESERVED_NAMES = (BASE_MODEL_ID, BASE_LABEL)
KEY_PATTERN = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
PACKING_THREADS = 4  # packing an adapter is a few MB of small copies; torch ops release the GIL
PACKERS = ThreadPoolExecutor(PACKING_THREADS, thread_name_prefix="loraswap-pack")


class AdapterError(Exception):
    """A request about an adapter that cannot be honoured; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def host_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor in an anonymous memory map of its own, returned to the OS when freed; backed by
    huge pages where the kernel allows it (filling 20 MB faults 10 pages instead of 5,000)."""
    memory = mmap.mmap(-1, numel * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype)


@dataclass
class AdapterWeights:
    """A validated adapter held on the host in one packed buffer, in the dtype the device banks use.

    Per base module the buffer holds A [r, in], then B transposed, B^T [r, out], with the LoRA scale folded
    in: the layout of a device bank's slot, so making an adapter resident is one transfer and contiguous
    copies.
    """

    name: str
    path: Path
    rank: int
    alpha: float
    target_modules: list[str]
    packed: torch.Tensor = field(repr=False)
    layout: dict[str, tuple[int, int, int]] = field(repr=False)  # module -> (offset, in, out)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def views(self, buffer: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module (A [r, in], B^T [r, out]) as views of ``buffer`` (the packed buffer or a copy of it)."""
        buffer = self.packed if buffer is None else buffer
        r, views = self.rank, {}
        for module, (offset, fan_in, fan_out) in self.layout.items():
            a_end = offset + fan_in * r
            views[module] = (buffer[offset:a_end].view(r, fan_in), buffer[a_end:a_end + r * fan_out].view(r, fan_out))
        return views

    def segments(self, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The flat A, B^T, A, B^T, ... of ``buffer`` (a copy of the packed buffer), in ``layout`` order: one call,
        not a view per tensor."""
        r = self.rank
        return buffer.split([r * size for _, fan_in, fan_out in self.layout.values() for size in (fan_in, fan_out)])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": self.target_modules,
            "size_bytes": self.nbytes,
        }


def check_name(name: str) -> str:
    """Adapter names are plain identifiers (they become metric labels and URL parts), and not a reserved one."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AdapterError(f"adapter name {name!r} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*, at most 64)")
    if name in RESERVED_NAMES:
        raise AdapterError(f"{name!r} names the bare base model (OpenAI model id, metric label); choose another name")
    return name


def check_path(path: str | Path, roots: list[Path]) -> Path:
    """Resolve ``path`` and refuse it unless it lies inside one of the configured adapter roots."""
    try:
        resolved = Path(path).resolve()
        inside = any(resolved.is_relative_to(Path(root).resolve()) for root in roots)
        is_folder = inside and resolved.is_dir()
    except (ValueError, OSError) as exc:  # a NUL byte, a name too long for the file system, a symlink loop
        raise AdapterError(f"adapter path {path!r} is not a usable path: {exc}") from None
    if not inside:
        raise AdapterError(f"adapter path {path} is outside the configured adapter roots", status=403)
    if not is_folder:
        raise AdapterError(f"adapter path {path} is not a folder", status=404)
    return resolved


def read_config(folder: Path, max_rank: int) -> dict:
    """Load ``adapter_config.json`` and refuse what the batched engine cannot serve exactly."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise AdapterError(f"{folder} has no {CONFIG_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{folder / CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{folder} is not a LoRA adapter (peft_type must be LORA)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if type(rank) is not int or not 1 <= rank <= max_rank:  # JSON true is not a rank
        raise AdapterError(f"adapter rank {rank!r} must be an integer in 1..{max_rank}")
    if type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise AdapterError(f"adapter lora_alpha {alpha!r} must be a finite number")
    if type(config.get("use_rslora", False)) is not bool:
        raise AdapterError(f"adapter use_rslora {config['use_rslora']!r} must be true or false")
    unsupported = [key for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise AdapterError(f"adapter uses options the engine does not serve: {', '.join(unsupported)}")
    return config


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The safetensors weights, as views of the file's bytes read in one go: the library checks the file (header,
    offsets, sizes), and the tensors are made over the bytes read instead of copied out once more (the library's
    loaders copy, which cost as much as packing). Pickled weight files are never read."""
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        pickled = [name for name in PICKLED_FILES if (folder / name).exists()]
        reason = f"pickled weights ({pickled[0]}) are refused; save with safetensors" if pickled else f"no {WEIGHTS_FILE}"
        raise AdapterError(f"{folder}: {reason}")
    try:
        with safe_open(weights_file, framework="pt"):
            pass
        with weights_file.open("rb") as file:
            data = bytearray(os.fstat(file.fileno()).st_size)
            file.readinto(data)
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_size])
        header.pop("__metadata__", None)
        weights = {}
        for key, entry in header.items():
            dtype = FLOAT_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise AdapterError(f"{weights_file}: tensor {key!r} holds {entry['dtype']}, not floating point")
            begin, end = entry["data_offsets"]
            weights[key] = torch.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                            offset=8 + header_size + begin).view(entry["shape"])
        return weights
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # the file changed under us, too
        raise AdapterError(f"{weights_file} is not a readable safetensors file: {exc}") from None


def pack(targets: list[torch.Tensor], sources: list[torch.Tensor], scale: float, span: torch.Tensor) -> bool:
    """Copy ``sources`` (A, B^T, A, B^T, ...) into their views of a packed buffer, fold ``scale`` into the B^Ts, and
    say whether ``span`` (the part of the buffer they fill) is all finite. Runs on a packing thread, in inference
    mode: the buffer is writable whichever mode made it."""
    with torch.inference_mode():
        torch._foreach_copy_(targets, sources)
        torch._foreach_mul_(targets[1::2], scale)
        return bool(torch.isfinite(torch.stack(torch.aminmax(span))).all())  # one pass; NaN and inf propagate


def load_adapter(
    name: str, folder: Path, module_shapes: dict[str, tuple[int, int]], max_rank: int, dtype: torch.dtype
) -> AdapterWeights:
    """Read and check an adapter against the base's LoRA-able modules ``{name: (in, out)}``; its weights are
    kept in ``dtype`` (the banks'), so making it resident moves no more bytes than the banks hold."""
    config = read_config(folder, max_rank)
    rank, alpha = config["r"], float(config["lora_alpha"])
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sorted(read_weights(folder).items()):  # the first problem reported is the same every time
        match = KEY_PATTERN.fullmatch(key)
        if match is None:
            raise AdapterError(f"unexpected tensor {key!r} in the adapter (only lora_A/lora_B weights are served)")
        module = match["module"]
        if module not in module_shapes:
            raise AdapterError(f"adapter targets {module!r}, which this base model does not have")
        parts.setdefault(module, {})[match["part"]] = tensor
    if not parts:
        raise AdapterError(f"{folder} holds no LoRA weights")
    layout, offset = {}, 0
    for module, pair in sorted(parts.items()):
        fan_in, fan_out = module_shapes[module]
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None:
            raise AdapterError(f"adapter module {module!r} lacks lora_A or lora_B")
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise AdapterError(
                f"adapter module {module!r} has A{tuple(a.shape)} B{tuple(b.shape)}; "
                f"this base needs A{(rank, fan_in)} B{(fan_out, rank)}"
            )
        layout[module] = (offset, fan_in, fan_out)
        offset += rank * (fan_in + fan_out)
    targets = config.get("target_modules") or []
    targets = sorted(targets) if isinstance(targets, list) else [str(targets)]
    adapter = AdapterWeights(name, folder, rank, alpha, targets, host_buffer(offset, dtype), layout)
    views, modules, jobs = adapter.views(), list(layout), []
    size = -(-len(modules) // PACKING_THREADS)
    for group in (modules[i:i + size] for i in range(0, len(modules), size)):  # consecutive modules, one span
        begin, (last, fan_in, fan_out) = layout[group[0]][0], layout[group[-1]]
        jobs.append(([view for module in group for view in views[module]],
                     [tensor for module in group for tensor in (parts[module]["A"], parts[module]["B"].t())],
                     scale, adapter.packed[begin:last + rank * (fan_in + fan_out)]))
    if not all(PACKERS.map(lambda job: pack(*job), jobs)):
        raise AdapterError(f"{folder} holds non-finite weights")
    return adapter

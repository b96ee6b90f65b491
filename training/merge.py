"""``loraswap merge``: fold one adapter into the base weights and save a plain transformers model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.errors import AdapterError
from training.named_adapter import adapter_folder, adapter_identity
from training.output_folder import written_whole

if TYPE_CHECKING:
    from service.lora.adapter_files import AdapterWeights

MERGE_CARD = "merge_card.json"  # beside the merged model: what it was made of (``merge_card``)


def adapter_dir(args: argparse.Namespace) -> Path:
    """The adapter folder ``--adapter`` names (``named_adapter.adapter_folder``: UsageError where it names none, or
    two). Raises FileNotFoundError naming ``--adapter`` where that folder holds no ``adapter_model.safetensors``
    (pickled weights are refused)."""
    path = adapter_folder(args)
    if not (path / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"--adapter {args.adapter}: {path} holds no adapter_model.safetensors (pickled weights "
                                "are refused)")
    return path


def check_servable(model: nn.Module, adapter: Path, config: LoraConfig) -> AdapterWeights:
    """The adapter as the server would load it (``adapter_files.load_adapter``, at the server's default largest
    rank), its config ``config`` (``adapter_files.read_config``, which refuses a key named twice, NaN ``lora_alpha``,
    options the engine does not serve); AdapterError for one the server would refuse: its weights (shapes,
    non-finite values), the modules its config selects, its card or its chat template. What ``merge`` writes is then
    the merged twin of what the server serves."""
    from service.lora.adapter_files import load_adapter
    from service.lora.layers import lora_targets, module_shape
    from service.settings import setting

    shapes = {name: module_shape(module) for name, module in lora_targets(model).items()}
    return load_adapter(adapter.name, adapter, shapes, setting("max_rank"), torch.float32,
                        [name for name, _ in model.named_modules() if name], config)


def file_identity(path: Path) -> dict:
    """``{"file": path (absolute, links resolved), "sha256": its sha256}``: what ``sha256sum FILE`` checks."""
    from service.model.base_model import sha256_of

    return {"file": str(path.resolve()), "sha256": sha256_of(path)}


def base_identity(base_model: str, base_dir: Path) -> dict:
    """The base a merge was made from: ``model``, as named; ``dir``, the folder whose weights the adapter was merged
    into (absolute; for the embedded base, the safetensors cache converted from its GGUF); ``weights``, each of that
    folder's weight files (``file_identity``, in name order); and, for the embedded base, ``converted_from``, the
    GGUF file (``file_identity``: the file and sha256 an adapter's card names as ``base_file`` and ``base_sha256``)."""
    from service.model.base_model import EMBEDDED, embedded_gguf

    identity = {"model": base_model, "dir": str(base_dir.resolve()),
                "weights": [file_identity(path) for path in sorted(base_dir.glob("*.safetensors"))]}
    if base_model == EMBEDDED:
        identity["converted_from"] = file_identity(embedded_gguf())
    return identity


def merge_card(adapter: Path, base_model: str, base_dir: Path, command: str) -> dict:
    """What a merged model was made of (``MERGE_CARD``): the adapter (``named_adapter.adapter_identity``: AdapterError
    for a card the server would refuse, as ``check_servable`` found none), the base (``base_identity``) and
    ``command``, the command line (``loraswap merge ...``)."""
    return {
        "adapter": adapter_identity(adapter),
        "base": base_identity(base_model, base_dir),
        "command": command,
    }


def named_base(label: str | None) -> str:
    """The base an adapter's config names (``base_model_name_or_path``), as ``--base-model`` takes it: the label where
    it is a model folder here; else the embedded base where the label names it as the server takes it
    (``base_model.names_the_base``: none, ``smollm2``, or the Hugging Face model its GGUF quantizes, so that an adapter
    trained on that one is merged as the server serves it; a review: merge refused it, "no Hugging Face model directory
    there"); else the label."""
    from service.model.base_model import EMBEDDED, names_the_base

    if label and (Path(label) / "config.json").is_file():
        return label
    return EMBEDDED if names_the_base(label, EMBEDDED) else str(label)


def merge_adapter(args: argparse.Namespace) -> Path:
    """Write ``base + adapter`` with the LoRA product added into the base weights (in float32), the base's
    tokenizer with the chat template the adapter's folder ships, if any (the one the server renders its chats with),
    and ``MERGE_CARD`` (``merge_card``) to ``--out``; returns that folder. Raises FileNotFoundError for an adapter
    folder without safetensors weights or a base that is no model directory, AdapterError for an adapter the server
    would refuse (``check_servable``)."""
    from service.lora.adapter_files import read_config
    from service.model.base_model import resolve_base_dir
    from service.settings import setting

    adapter = adapter_dir(args)
    try:  # AdapterError: a config or weights the server would refuse, named by the option (a review: it named none)
        config = read_config(adapter, setting("max_rank"))
        base_model = str(args.base_model or named_base(config.base_model_name_or_path))
        base_dir = resolve_base_dir(base_model, setting("cache_dir"))
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)  # merge in full precision
        template = check_servable(model, adapter, config).chat_template
    except AdapterError as exc:
        raise AdapterError(f"--adapter {args.adapter}: {exc}") from None
    merged = PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()  # the config checked
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = template or tokenizer.chat_template
    card = merge_card(adapter, base_model, base_dir, args.command_line)
    with written_whole(Path(args.out)) as partial:  # UsageError: --out filled meanwhile
        merged.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / MERGE_CARD).write_text(json.dumps(card, indent=2) + "\n")
    return Path(args.out)


def run(args: argparse.Namespace) -> None:
    """``loraswap merge``: merge (see ``merge_adapter``) and print where the model was saved."""
    print(f"merged model saved to {merge_adapter(args)}")

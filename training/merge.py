"""``loraswap merge``: fold one adapter into the base weights and save a plain transformers model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def adapter_dir(name_or_path: str) -> Path:
    """A folder as given, else the adapter of that name in the configured adapters dir. Raises FileNotFoundError
    when that folder holds no ``adapter_model.safetensors`` (pickled weights are refused)."""
    path = Path(name_or_path)
    if not path.is_dir():
        from service.settings import Settings

        path = Settings().adapters_dir / name_or_path
    if not (path / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{name_or_path}: no adapter_model.safetensors there (pickled weights are refused)")
    return path


def merge_adapter(args: argparse.Namespace) -> Path:
    """Write ``base + adapter`` with the LoRA product added into the base weights (in float32), and the base's
    tokenizer, to ``--out``; returns that folder. Raises FileNotFoundError for an adapter folder without
    safetensors weights or a base that is no model directory."""
    from service.model.base_model import resolve_base_dir
    from service.settings import Settings

    adapter = adapter_dir(args.adapter)
    base = args.base_model or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base_dir = resolve_base_dir(base or "smollm2", Settings().cache_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)  # merge in full precision
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(args.out)
    return Path(args.out)


def run(args: argparse.Namespace) -> None:
    """``loraswap merge``: merge (see ``merge_adapter``) and print where the model was saved."""
    print(f"merged model saved to {merge_adapter(args)}")

"""Helpers shared by the LoRA layer, registry and engine tests: adapters of three ranks on the tiny
bases, the base loaded as the service loads it, and stock peft's logits as the reference.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from service.engine.row_mapping import map_rows
from service.errors import UnknownAdapter
from service.lora.registry import AdapterRegistry
from service.model.base_model import load_base
from service.settings import Settings
from tests.tiny_models import make_adapter

BASES = {"gpt2": "tiny_gpt2_dir", "llama": "tiny_llama_dir"}
# three adapters per architecture, of different ranks and different (overlapping) target sets
RANKED = {
    "gpt2": {"r2": (2, ["c_attn"]), "r4": (4, ["c_fc"]), "r8": (8, ["c_attn", "c_proj", "c_fc"])},
    "llama": {
        "r2": (2, ["q_proj", "v_proj"]),
        "r4": (4, ["gate_proj", "down_proj"]),
        "r8": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    },
}
FP32_TOLERANCE = 1e-5
# |ours - peft| over logits, relative to the logits' scale (max |logit| of peft's), by how the base computes:
# - "none" (fp32): the same products summed in another order (batched products against peft's per-module ones):
#   seen up to 7e-7 relative on the tiny bases; 1.5e-5 is ~250 fp32 unit roundoffs (2^-24), and 1/50,000 of what
#   an adapter changes (0.7-1.0 at a scale of 0.6-1.0).
# - "nf4": bitsandbytes 0.50 computes its 4-bit products on the CPU in bf16 where the CPU has AVX512-BF16 (the
#   activations are rounded to 8 mantissa bits: 3.5e-3 relative against fp32 products of the same 4-bit weights).
#   Activations that differ by one fp32 ulp (see above) can round to neighbouring bf16 values, so two correct
#   implementations differ by a bf16 rounding of some activations: seen 3.5e-4 relative (2.1e-4 at a scale of 0.6,
#   transformers 5.24, peft 0.21.2); the bound is one bf16 unit roundoff (2^-8), still 1/250 of an adapter's change.
# - "bfloat16" (a bf16 base, not quantized): every product and activation rounded to 8 mantissa bits, in another
#   order than peft's, through layers that amplify it: seen up to 2.9e-2 relative between ours and peft's bf16 on the
#   tiny bases, where peft's bf16 itself lies up to 2.8e-2 from its fp32 (and ours up to 2.6e-2); the bound 2^-4 is
#   still 1/17 of an adapter's change (1.1-1.7 at these scales).
RELATIVE_TOLERANCE = {"none": 1.5e-5, "nf4": 2.0**-8, "bfloat16": 2.0**-4}


def logits_tolerance(reference: torch.Tensor, quantize: str = "none", dtype: str = "float32") -> float:
    """The largest |ours - peft| two correct implementations show on ``reference`` logits (see RELATIVE_TOLERANCE):
    of a ``quantize``d base, or a full one in ``dtype``."""
    return RELATIVE_TOLERANCE[quantize if dtype == "float32" else dtype] * reference.abs().max().item()


def make_ranked_adapters(base_dir: Path, root: Path, arch: str) -> dict[str, Path]:
    """The three adapters of ``RANKED[arch]`` saved by stock peft under ``root``.

    Weights of N(0, 0.2^2) move the logits by ~1 while keeping the hidden states well conditioned
    (at make_adapter's default 0.5, the r=8 adapter blows the activations up so much that fp32
    rounding alone makes peft and any other correct implementation differ by ~1e-4).
    """
    return {
        name: make_adapter(
            base_dir, root / name, r=rank, alpha=2 * rank, target_modules=targets, seed=seed + 1, scale=0.2
        )
        for seed, (name, (rank, targets)) in enumerate(RANKED[arch].items())
    }


def load_model(base_dir: Path, quantize: str = "none", device: str = "cpu", dtype: str = "float32"):
    """The base as the service loads it (fp32 unless ``dtype`` says, optionally NF4)."""
    model, _ = load_base(Settings(base_model=str(base_dir), device=device, dtype=dtype, quantize=quantize))
    return model


def load_nf4_or_skip(base_dir: Path):
    """A 4-bit base on the CPU, or a skip that says why bitsandbytes could not provide one."""
    try:
        model = load_model(base_dir, "nf4")
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    except Exception as exc:  # bitsandbytes without CPU 4-bit support raises various errors
        pytest.skip(f"bitsandbytes cannot run an NF4 base on the CPU here: {type(exc).__name__}: {exc}")
    return model


def engine_model(base_dir: Path, adapters: dict[str, Path], *, max_resident: int = 4, quantize: str = "none",
                 device: str = "cpu", dtype: str = "float32"):
    """(model, registry) with our batched LoRA layers and every adapter registered."""
    model = load_model(base_dir, quantize, device, dtype) if quantize == "none" else load_nf4_or_skip(base_dir)
    roots = sorted({path.parent for path in adapters.values()})
    registry = AdapterRegistry(model, roots=roots, max_resident=max_resident, max_rank=64)
    for name, path in adapters.items():
        registry.register(name, path)
    return model, registry


def activate(registry: AdapterRegistry, names: list[str | None]) -> list[int]:
    """What the engine does before a pass over rows asking for ``names`` (None: no adapter): the weights registered
    under them made resident and the mapping pointed at the rows. Returns the rows whose name is not registered
    (they get no adapter)."""
    adapters, missing = [], []
    for row, name in enumerate(names):
        try:
            adapters.append(registry.lookup(name))
        except UnknownAdapter:
            adapters.append(None)
            missing.append(row)
    map_rows(registry, adapters)
    return missing


@torch.no_grad()
def batched_logits(model, registry: AdapterRegistry, rows: list[str | None], ids: torch.Tensor) -> torch.Tensor:
    """Logits of one mixed batch through our engine path: activate the rows' adapters, then forward."""
    assert activate(registry, rows) == []
    return model(input_ids=ids).logits


@torch.no_grad()
def peft_logits(base_dir: Path, adapter: Path | None, ids: torch.Tensor, quantize: str = "none",
                dtype: str = "float32") -> torch.Tensor:
    """Stock peft's logits for ``ids`` with one adapter (None: the bare base) on a fresh base."""
    model = load_model(base_dir, quantize, dtype=dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return model(input_ids=ids).logits


def random_ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 1000, (rows, length), generator=torch.Generator().manual_seed(seed))

"""Llama's MLP with its activation and product in place gives the very logits transformers' own forward gives, through
the batched LoRA layers (rows with different adapters, or none), in prompt passes and one-token steps."""
from __future__ import annotations

import torch

from service.engine.mlp import use_in_place_mlp
from tests.lora_helpers import activate, engine_model, random_ids

ROWS = ["r2", None, "r8", "r4"]


@torch.inference_mode()
def test_the_in_place_mlp_gives_the_same_logits_bit_for_bit(arch, base_dir, ranked):
    model, registry = engine_model(base_dir, ranked)
    activate(registry, ROWS)
    inputs = [random_ids(len(ROWS), 9, 5), random_ids(len(ROWS), 1, 6)]
    before = [model(input_ids=ids).logits for ids in inputs]
    changed = use_in_place_mlp(model)
    after = [model(input_ids=ids).logits for ids in inputs]
    assert changed == (model.config.num_hidden_layers if arch == "llama" else 0)
    for ours, theirs in zip(after, before):
        assert torch.equal(ours, theirs)

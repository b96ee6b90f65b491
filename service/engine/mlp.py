"""Llama's MLP with its activation and product written in place, for the engine's passes.

transformers' ``LlamaMLP`` computes down(act(gate(x)) * up(x)), three tensors of [tokens, intermediate] at once (9.4
MiB each for SmolLM2 over 1,600 prompt tokens): the gate's output, the up projection's, and the activation or the
product, each a new tensor. Written over the gate's output, the same values take two. On the CPU, fewer big tensors
also leave malloc's arena less fragmented. Its share of the peak RSS the engine saves with the other measures
(docs/benchmarks.md, "Peak memory on the CPU") was not measured alone. Inference only: autograd needs the tensors
these ops overwrite.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP


def in_place_forward(self: LlamaMLP, x: torch.Tensor) -> torch.Tensor:
    """``LlamaMLP.forward``'s values [..., hidden], the activation (SiLU in place; another as the module has it) and
    the product written over the gate projection's output."""
    hidden = self.gate_proj(x)
    silu = isinstance(self.act_fn, (SiLUActivation, nn.SiLU))
    hidden = nn.functional.silu(hidden, inplace=True) if silu else self.act_fn(hidden)
    return self.down_proj(hidden.mul_(self.up_proj(x)))


def use_in_place_mlp(model: nn.Module) -> int:
    """Give every ``LlamaMLP`` of ``model`` (that class exactly, whose forward this one reproduces) the in-place
    forward; returns how many it changed."""
    mlps = [module for module in model.modules() if type(module) is LlamaMLP]
    for module in mlps:
        module.forward = types.MethodType(in_place_forward, module)
    return len(mlps)

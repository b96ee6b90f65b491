"""Attention over a masked KV cache with grouped key/value heads, registered with transformers.

The engine's passes read a KV cache through a mask (a decoding step's cache is wider than most rows, a prompt may
follow a cached prefix), and with a mask PyTorch's SDPA on the CPU cannot take grouped key/value heads natively:
transformers then copies every key and value once per query head (``repeat_kv``; for one-token queries it packs them
instead). The copy took 62-64% of attention's time in prompts and in decoding steps with draft tokens (py-spy, one
client, new SQuAD questions: docs/benchmarks.md, "Drafts in the padding, grouped heads packed"), and at batch 256 it
moves more memory per step than the model's weights. Instead the query heads of a group stand in the query-length
axis of their key/value head, and the mask is repeated to match, so no key or value is copied. Everything else goes
to transformers' ``sdpa``.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "loraswap_sdpa"


def packed_gqa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs):
    """``sdpa``, except queries with a mask over grouped heads: query [B, heads, q, D] packed to [B, kv heads,
    groups x q, D] (a query head h reads key/value head h // groups, as ``repeat_kv`` pairs them), the mask
    [B, 1, q or 1, S] to [B, 1, groups x q or 1, S]; returns [B, q, heads, D] as ``sdpa`` does. Dropout, softcap and
    a position bias go to ``sdpa``."""
    groups = getattr(module, "num_key_value_groups", 1)
    extras = kwargs.get("dropout", 0.0) or any(kwargs.get(name) is not None for name in ("softcap", "position_bias"))
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or groups == 1 or extras:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    batch, heads, length, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups * length, dim)
    mask = attention_mask  # packed row g x q + t is query t of its group's head g (a mask of one row broadcasts)
    if mask.shape[2] > 1:
        mask = mask.repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None  # [B, q, heads, D]


def use_packed_gqa_attention(model) -> None:
    """Switch a model that uses ``sdpa`` to the packed variant (masks are built exactly as for ``sdpa``)."""
    if model.config._attn_implementation != "sdpa":
        return
    AttentionInterface.register(NAME, packed_gqa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)

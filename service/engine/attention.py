"""Attention for one-token decoding steps over a static KV cache, registered with transformers.

A decoding step reads a cache wider than most rows (its columns are bucketed so a CUDA graph can be
reused), so it needs a padding mask, and with a mask PyTorch's SDPA cannot take grouped key/value heads
natively: transformers then copies every key and value once per query head (``repeat_kv``), which at
batch 256 moves more memory per step than the model's weights. For a single query token the grouped
query heads can instead stand in the query-length axis of their key/value head, so nothing is copied
(newer transformers do the same inside ``sdpa``). Everything else goes to transformers' own ``sdpa``.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "loraswap_sdpa"


def packed_gqa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs):
    """``sdpa``, except one-token queries with a mask and grouped heads: heads packed, not repeated."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or attention_mask is None or groups == 1 or attention_mask.shape[1] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups, dim)  # [B, kv heads, groups, D]
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None  # [B, 1, heads, D]


def use_packed_gqa_attention(model) -> None:
    """Switch a model that uses ``sdpa`` to the packed variant (masks are built exactly as for ``sdpa``)."""
    if model.config._attn_implementation != "sdpa":
        return
    AttentionInterface.register(NAME, packed_gqa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)

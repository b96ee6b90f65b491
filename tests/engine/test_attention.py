"""Grouped query heads packed over their key/value head (``attention.packed_gqa_attention``) against transformers'
``sdpa``, which copies each key and value once per query head under a mask (``repeat_kv``)."""
from __future__ import annotations

import types

import pytest
import torch
from transformers.integrations import sdpa_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from service.engine.attention import packed_gqa_attention

KV_HEADS, GROUPS, DIM = 3, 3, 16


def masks(batch: int, length: int, columns: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A mask [batch, 1, length, columns] hiding a random half of each row's columns but its first: bool (True
    reads) or float (0 or the dtype's min)."""
    hidden = torch.rand(batch, 1, length, columns, generator=generator) < 0.5
    hidden[..., 0] = False
    if kind == "bool":
        return ~hidden
    return torch.zeros(hidden.shape).masked_fill_(hidden, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize(("batch", "length", "columns"), [(1, 1, 7), (3, 1, 40), (1, 5, 40), (2, 8, 33), (3, 20, 64),
                                                          (1, 150, 150)])
def test_packed_heads_give_what_repeated_keys_give(batch, length, columns, kind):
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    module = types.SimpleNamespace(num_key_value_groups=GROUPS, is_causal=True)
    query = torch.randn(batch, length, KV_HEADS * GROUPS, DIM, generator=generator).transpose(1, 2)  # as Llama's
    key, value = (torch.randn(batch, KV_HEADS, columns, DIM, generator=generator) for _ in range(2))
    mask = masks(batch, length, columns, kind, generator)
    packed, _ = packed_gqa_attention(module, query, key, value, mask, scaling=0.25)
    repeated, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert packed.shape == repeated.shape == (batch, length, KV_HEADS * GROUPS, DIM)
    torch.testing.assert_close(packed, repeated, rtol=1e-5, atol=1e-6)


def test_a_one_row_mask_reads_the_same_columns_for_every_query():
    generator = torch.Generator().manual_seed(7)
    module = types.SimpleNamespace(num_key_value_groups=GROUPS, is_causal=True)
    query = torch.randn(2, KV_HEADS * GROUPS, 6, DIM, generator=generator)
    key, value = (torch.randn(2, KV_HEADS, 30, DIM, generator=generator) for _ in range(2))
    mask = masks(2, 1, 30, "bool", generator)
    packed, _ = packed_gqa_attention(module, query, key, value, mask)
    torch.testing.assert_close(packed, sdpa_attention_forward(module, query, key, value, mask)[0])


def test_no_key_or_value_is_copied_per_query_head(monkeypatch):
    """transformers' ``repeat_kv`` is never called for a masked query of any length."""
    def refuse(*args):
        raise AssertionError("repeat_kv called")
    monkeypatch.setattr(sdpa_attention, "repeat_kv", refuse)
    module = types.SimpleNamespace(num_key_value_groups=GROUPS, is_causal=True)
    for length in (1, 4, 32):
        query = torch.randn(1, KV_HEADS * GROUPS, length, DIM)
        key = value = torch.randn(1, KV_HEADS, 40, DIM)
        packed_gqa_attention(module, query, key, value, torch.ones(1, 1, length, 40, dtype=torch.bool))


def test_what_packing_cannot_do_goes_to_sdpa():
    """A softcap (which ``sdpa`` refuses) is refused, not dropped; a mask of other than 4 dimensions is left to it."""
    module = types.SimpleNamespace(num_key_value_groups=GROUPS, is_causal=True)
    query, key = torch.randn(1, KV_HEADS * GROUPS, 4, DIM), torch.randn(1, KV_HEADS, 10, DIM)
    mask = torch.ones(1, 1, 4, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="softcap"):
        packed_gqa_attention(module, query, key, key, mask, softcap=30.0)
    flat = torch.ones(4, 10, dtype=torch.bool)
    torch.testing.assert_close(packed_gqa_attention(module, query, key, key, flat)[0],
                               sdpa_attention_forward(module, query, key, key, flat)[0])

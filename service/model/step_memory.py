"""The memory one engine step holds while it runs, beside what stays allocated (the weights, the KV cache, the prefix
cache, the LoRA banks: ``device_room``): its activations, found from the base model's config and the step budget, for
the memory check before the model loads. vLLM measures the same by a profile run, a forward pass of
``max_num_batched_tokens`` dummy tokens whose peak it takes (``Worker.determine_available_memory``); here it is a
formula, held against the engine's own steps measured (SmolLM2 and the tiny test models, float32 and bfloat16, the
process's resident set at its peak over its size before the step: tests/engine/test_step_memory.py).

A prefill pass runs at most ``prefill_tokens`` tokens (rows x its longest prompt, the longest of which may go alone:
``Engine._take``), each of its rows at most the longest prompt a request may have. It holds, at its peak:

- per token, ``LAYER_VALUES`` x (hidden size + intermediate size) float32 values: a layer's residual, normed input,
  queries, attention output, the MLP's gate and up projections (``mlp.in_place_forward``), the float32 norms and
  rotary embeddings of a bfloat16 model, and what glibc's arena keeps of the layers before (measured: SmolLM2's
  whole passes of 2,048 tokens, 16 x 128 and 2 x 1,024, rose 186-221 MB in float32, 109-112 MB in bfloat16, its
  KV cache's 94 MB (47 MB) and the mask's share below taken off, about 5.2 of these values in float32, 2.3-3.4 in
  bfloat16; counted: 249 MB (198 MB));
- the attention's mask: for each token, the columns of its row (its prompt: the longest) x the query heads a key
  head serves (``attention.packed_gqa_attention`` repeats the mask so), a boolean, its repeat and SDPA's float32 copy,
  6 bytes each (SDPA alone: 30 MB for two rows of 1,024 tokens of SmolLM2);
- the pass's own keys and values (``kv_bytes_per_token`` each): a pass run a chunk at a time, or whose prompts go to
  the prefix cache without joining a batch, keeps them in a cache of its own until it ends;
- the logits of each row's last token ([rows, vocab], in the dtype and in float32), up to ``max_batch`` rows.

Not counted: a decoding step's activations: it feeds ``MOST_FED`` tokens in all at most, or one a row, each its
activations and logits (SmolLM2: under 0.5 MB a token), a small share of the KV cache that ``max_batch`` counts for
its rows (SmolLM2: 59 MB a row at the defaults; measured, 32 rows fed 47 tokens over 1,001 columns rose 0.2 MB past
the passes before them); a model whose attention is not SDPA (transformers' eager attention holds the scores,
[rows, heads, tokens, columns]). The formula is the CPU's: a GPU's allocator holds no arena, and is counted alike.
"""
from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig

from service.settings import CPU_PREFILL_TOKENS, Settings

LAYER_VALUES = 6  # float32 values a token's activations hold per hidden and intermediate unit, at the most
MASK_BYTES = 6  # bytes a step's attention mask takes per token, column and query head of a key head


def prefill_budget(settings: Settings, device: torch.device) -> float:
    """Prompt tokens one prefill pass takes from the queue: ``max_prefill_tokens``, unset ``CPU_PREFILL_TOKENS`` on
    the CPU and no bound (inf) elsewhere (``Engine.prefill_tokens``)."""
    return settings.max_prefill_tokens or (CPU_PREFILL_TOKENS if device.type == "cpu" else math.inf)


def prefill_tokens(settings: Settings, device: torch.device, prompt: int) -> int:
    """The most tokens one prefill pass runs where a prompt has at most ``prompt`` tokens: the budget
    (``prefill_budget``), or one prompt alone past it, and no more than ``max_batch`` rows of it."""
    return int(min(max(prefill_budget(settings, device), prompt), settings.max_batch * prompt))


def why_tokens(settings: Settings, device: torch.device, prompt: int) -> str:
    """Why a prefill pass runs ``prefill_tokens`` tokens, in words, where they are not ``prefill_budget``'s: one
    prompt alone past the budget, or ``max_batch`` rows of the longest (``prompt`` tokens) below it; "" where they
    are (a review: ``--max-prefill-tokens 512`` was counted as 1024 tokens, saying nothing of why)."""
    budget, tokens = prefill_budget(settings, device), prefill_tokens(settings, device, prompt)
    if tokens > budget:
        return (f"; {tokens} tokens, not {budget:.0f}: one prompt alone may run past max_prefill_tokens, up to the "
                f"longest prompt ({prompt} tokens)")
    row = "row" if settings.max_batch == 1 else "rows"
    rows = f"max_batch {settings.max_batch} {row} of the longest prompt ({prompt} tokens)"
    if budget == math.inf:  # unset on a GPU
        return f"; {tokens} tokens: {rows}, max_prefill_tokens unset bounding a pass by nothing else on a GPU"
    return f"; {tokens} tokens, fewer than {budget:.0f}: {rows}" if tokens < budget else ""


def prefill_bytes(settings: Settings, config: PretrainedConfig, dtype: torch.dtype, device: torch.device,
                  prompt: int, kv_per_token: int) -> tuple[int, str]:
    """The bytes a prefill pass's activations take at the most, with the formula in words (see the module's
    docstring): its tokens (``prefill_tokens``, and ``why_tokens`` so many) of at most ``prompt`` tokens a row,
    ``kv_per_token`` bytes of keys and values a token (``device_room.kv_bytes_per_token``)."""
    tokens = prefill_tokens(settings, device, prompt)
    width = config.hidden_size + intermediate_size(config)
    heads = config.num_attention_heads
    groups = heads // (getattr(config, "num_key_value_heads", None) or heads)
    rows = min(settings.max_batch, tokens)
    per_token = LAYER_VALUES * width * 4 + prompt * groups * MASK_BYTES + kv_per_token
    logits = rows * config.vocab_size * (dtype.itemsize + 4)
    whose = "row's" if rows == 1 else "rows'"
    return tokens * per_token + logits, (
        f"a prefill step's activations, {tokens} tokens x ({LAYER_VALUES} x (hidden {config.hidden_size} + "
        f"intermediate {intermediate_size(config)}) x 4 bytes + a mask of {prompt} columns x {groups} heads x "
        f"{MASK_BYTES} bytes + {kv_per_token} bytes of keys and values), and {rows} {whose} logits x vocab "
        f"{config.vocab_size} x {dtype.itemsize + 4} bytes{why_tokens(settings, device, prompt)}")


def intermediate_size(config: PretrainedConfig) -> int:
    """The MLP's inner width: ``intermediate_size`` (Llama, GPT-NeoX), GPT-2's ``n_inner``, else 4 x hidden (GPT-2's
    default)."""
    return getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size

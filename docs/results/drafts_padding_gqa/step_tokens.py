"""Milliseconds a decoding step of one row over a 200-token KV cache takes, by the tokens it is fed (its last token
and drafts: 1-6 and 8), on SmolLM2 through loraswap's DecodeStep with the server's defaults (oneDNN linears, which
pad 3 tokens to 4 and 5-8 to 8); 10 steps each, ROUNDS rounds (default 2).

    HF_HUB_OFFLINE=1 python docs/results/drafts_padding_gqa/step_tokens.py [ROUNDS]
"""
import sys
import time

import torch

from service.engine.decode_step import DecodeStep
from service.lora.layers import LoraLayers
from service.model.base_model import load_base
from service.settings import Settings

STEPS, FED = 10, (1, 2, 3, 4, 5, 6, 8)
model, _ = load_base(Settings())
step = DecodeStep(model, LoraLayers(model, 4), False, 8)
config = model.config
kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
step.cache.reserve(1, 512, used=(0, 0))
for layer in range(config.num_hidden_layers):
    keys = torch.randn(1, kv_heads, 200, head_dim)
    step.cache.write_layer(layer, 0, keys, keys.clone(), torch.arange(200)[None])
with torch.inference_mode():
    for fed in FED:  # each kernel made once, outside the timing
        step([[5] * fed], [200])
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
        cells = []
        for fed in FED:
            start = time.perf_counter()
            for _ in range(STEPS):
                step([[5] * fed], [200])
            cells.append(f"{fed}:{(time.perf_counter() - start) / STEPS * 1000:.1f}")
        print(" ".join(cells))

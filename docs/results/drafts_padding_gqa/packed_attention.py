"""A decoding step of one row fed 1, 8 or 20 tokens, or of 8 rows fed 1 or 5, over a 200-token KV cache (SmolLM2,
loraswap's DecodeStep), with the attention of the tree at OLD_TREE (repeat_kv for queries longer than one token) and
of this tree (packed heads), alternated in one process: median ms of each over ROUNDS rounds of STEPS steps.

    HF_HUB_OFFLINE=1 python docs/results/drafts_padding_gqa/packed_attention.py OLD_TREE [ROUNDS]
"""
import importlib.util
import statistics
import sys
import time

import torch
from transformers import AttentionInterface

from service.engine import attention
from service.engine.decode_step import DecodeStep
from service.lora.layers import LoraLayers
from service.model.base_model import load_base
from service.settings import Settings

STEPS = 10
spec = importlib.util.spec_from_file_location("old_attention", f"{sys.argv[1]}/service/engine/attention.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
model, _ = load_base(Settings())
step = DecodeStep(model, LoraLayers(model, 4), False, 8)
ROWS = 8
config = model.config
kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
step.cache.reserve(ROWS, 512, used=(0, 0))
for layer in range(config.num_hidden_layers):
    keys = torch.randn(ROWS, kv_heads, 200, head_dim)
    step.cache.write_layer(layer, 0, keys, keys.clone(), torch.arange(200).expand(ROWS, -1))
times = {}
with torch.inference_mode():
    for rows, fed in ((1, 1), (1, 8), (1, 20), (8, 1), (8, 5)):
        outputs = {}
        for name, function in (("old", old.packed_gqa_attention), ("new", attention.packed_gqa_attention)):
            AttentionInterface.register(attention.NAME, function)
            outputs[name] = step([[5] * fed] * rows, [200] * rows)
        difference = (outputs["old"] - outputs["new"]).abs().max().item()
        for _ in range(rounds):
            for name, function in (("old", old.packed_gqa_attention), ("new", attention.packed_gqa_attention)):
                AttentionInterface.register(attention.NAME, function)
                start = time.perf_counter()
                for _ in range(STEPS):
                    step([[5] * fed] * rows, [200] * rows)
                times.setdefault((rows, fed, name), []).append((time.perf_counter() - start) / STEPS * 1000)
        old_ms, new_ms = (statistics.median(times[rows, fed, name]) for name in ("old", "new"))
        print(f"{rows} row(s) x {fed} token(s): old {old_ms:.1f} ms, new {new_ms:.1f} ms a step (median of "
              f"{rounds}); logits differ by at most {difference:.2e}")

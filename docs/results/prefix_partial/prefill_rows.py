"""One row's prefill of m tokens past 180 cached positions: SmolLM2 loaded by loraswap's load_base (oneDNN linears),
transformers' forward, best of 5 per m, three rounds. Run: CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1 python
prefill_rows.py (output: prefill_rows.txt)."""
import time

import torch
from transformers import DynamicCache

from service.model.base_model import load_base
from service.settings import Settings


def main() -> None:
    model, _ = load_base(Settings())
    torch.manual_seed(0)
    with torch.inference_mode():
        context = DynamicCache()
        model(input_ids=torch.randint(100, 40000, (1, 180)), past_key_values=context, use_cache=True, logits_to_keep=1)
        for round_ in range(3):
            for m in (1, 4, 8, 14, 16, 17, 22, 32):
                best = float("inf")
                for _ in range(5):
                    cache = DynamicCache(ddp_cache_data=[(layer.keys.clone(), layer.values.clone())
                                                         for layer in context.layers])
                    ids = torch.randint(100, 40000, (1, m))
                    start = time.perf_counter()
                    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    best = min(best, time.perf_counter() - start)
                print(round_, m, f"{best * 1000:.1f} ms", flush=True)


if __name__ == "__main__":
    main()

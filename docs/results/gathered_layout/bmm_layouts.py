"""x A^T B^T per row, as the gathered LoRA form computes it, in two layouts of A (CPU, fp32, r=8, the SmolLM2 shapes):
before commit c67e485, bmm(x [B,T,in], A^T [B,in,r]); since, bmm(A [B,r,in], x^T)^T. Milliseconds per call.

    python docs/results/gathered_layout/bmm_layouts.py
"""
import time

import torch


def per_call(fn, calls: int = 50) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1000


for rows, tokens in ((16, 192), (64, 64), (16, 1), (64, 1)):
    for fan_in, fan_out in ((576, 576), (576, 192), (576, 1536), (1536, 576)):
        x, a = torch.randn(rows, tokens, fan_in), torch.randn(rows, 8, fan_in)
        a_t, b_t, out = a.transpose(1, 2).contiguous(), torch.randn(rows, 8, fan_out), torch.randn(rows, tokens, fan_out)
        before = per_call(lambda: torch.baddbmm(out, torch.bmm(x, a_t), b_t))
        since = per_call(lambda: torch.baddbmm(out, torch.bmm(a, x.transpose(1, 2)).transpose(1, 2), b_t))
        print(f"rows {rows} tokens {tokens} in {fan_in} out {fan_out}: before {before:.3f} ms, since {since:.3f} ms, "
              f"since / before {since / before:.2f}")

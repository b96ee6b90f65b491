"""How often a seeded draw changes when SmolLM2-135M-Instruct's logits change by float rounding alone: each prompt's
next-token logits computed whole (one prefill) and from its cached prefix (the prefill of all but the last token,
then a one-row step), as the prefix cache serves a prompt the second time. For 400 seeds per prompt and step (5 steps
each), counts the draws that differ between the two, for the exponential race (this commit) and for the inversion of
the cumulative distribution in token-id order (the sampler up to b061d1d, copied below). Each line prints the Decoding's
fields, top_k and top_p included where its strategy reads neither. Output: real_flips.txt."""
import torch

from service.engine.sampling import MASK32, Decoding, Sampler, _mix32, keep_heads, tempered_weights
from service.model.base_model import load_base
from service.settings import Settings

PROMPTS = ["The history of the Normans", "Super Bowl 50 was", "In a small village there lived",
           "The theory of relativity", "Question: What is the capital of France?\nAnswer:", "Once upon a time"]
SEEDS = 400


def old_pick(logits: torch.Tensor, decoding: Decoding, step: int) -> torch.Tensor:
    """The sampler at b061d1d: row_uniforms and invert_cdf."""
    temperature, top_k, top_p = decoding.row_params()
    rows = len(logits)
    weights = keep_heads(tempered_weights(logits, torch.full((rows,), temperature, dtype=torch.float64)),
                         torch.full((rows,), top_k), torch.full((rows,), top_p, dtype=torch.float64))
    seeds = torch.arange(rows)
    low, high = seeds & MASK32, (seeds >> 32) & MASK32
    mixed = _mix32(_mix32(low ^ _mix32(high + 0x9E3779B9)) ^ ((step * 0x632BE5AB) & MASK32))
    uniforms = (mixed.double() + 0.5) / 2.0**32
    cdf = weights.cumsum(dim=-1)
    positive = weights > 0
    total = cdf.masked_fill(~positive, 0.0).amax(dim=-1, keepdim=True)
    return (positive & (cdf >= uniforms[:, None] * total)).to(torch.uint8).argmax(dim=-1)


def new_pick(logits: torch.Tensor, decoding: Decoding, step: int) -> torch.Tensor:
    sampler = Sampler([Decoding(decoding.strategy, decoding.temperature, decoding.top_k, decoding.top_p, seed=s)
                       for s in range(len(logits))], torch.device("cpu"))
    return sampler(logits, step)


def logits_two_ways(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        whole = model(ids).logits[0, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        cached = model(ids[:, -1:], past_key_values=prefix.past_key_values).logits[0, -1]
    return whole, cached


def main() -> None:
    model, tokenizer = load_base(Settings())
    decodings = [Decoding("temperature", 1.0), Decoding("temperature", 0.7), Decoding("nucleus", 1.0, top_p=0.95),
                 Decoding("top_k", 1.0, top_k=50)]
    changed = {(d, which): 0 for d in decodings for which in ("old", "new")}
    deltas, draws = [], 0
    generator = torch.Generator().manual_seed(0)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        for step in range(5):
            whole, cached = logits_two_ways(model, ids)
            deltas.append(((whole - cached).abs().max() / whole.abs().max()).item())
            for decoding in decodings:
                for which, pick in (("old", old_pick), ("new", new_pick)):
                    first = pick(whole.expand(SEEDS, -1), decoding, step)
                    second = pick(cached.expand(SEEDS, -1), decoding, step)
                    changed[decoding, which] += (first != second).sum().item()
            draws += SEEDS
            token = torch.multinomial(whole.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, token[None]], dim=1)
    print(f"{len(deltas)} positions, logits whole vs from the cached prefix: max |difference| / max |logit| "
          f"median {sorted(deltas)[len(deltas) // 2]:.1e}, max {max(deltas):.1e}")
    for decoding in decodings:
        print(f"{decoding.strategy} T={decoding.temperature} top_k={decoding.top_k} top_p={decoding.top_p}: "
              f"changed draws, of {draws}: cumulative distribution {changed[decoding, 'old']}, "
              f"exponential race {changed[decoding, 'new']}")


if __name__ == "__main__":
    main()

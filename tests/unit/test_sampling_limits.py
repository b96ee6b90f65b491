"""The sampler at the edges: tiny and subnormal temperatures, masked, infinite and huge logits, extreme top-k / top-p,
half-precision logits, the extreme draws, cuts reaching past the heaviest tokens, and parameters no sampler can honour.

In every limit the answer is the mathematical one: as T -> 0 all the mass goes to the maxima (the greedy token);
a token of probability 0 (masked, or cut by top-k / nucleus) is never picked.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from service.engine.sampling import (
    MASK32,
    Decoding,
    Sampler,
    _mix32,
    _token_hashes,
    exponential_race,
    keep_heads,
    token_uniforms,
)
from tests.unit.test_decoding import (
    N,
    expected_distribution,
    frequencies,
    pick,
    random_logits,
)

TINY_TEMPERATURES = [1e-6, 1e-20, 1e-38, 1e-40, 1e-44, 1e-45, 1e-300, 5e-324]  # down to float64's least subnormal
STRATEGIES = [Decoding("temperature"), Decoding("top_k", top_k=50), Decoding("top_k", top_k=1),
              Decoding("top_k", top_k=10**5), Decoding("nucleus", top_p=0.9), Decoding("nucleus", top_p=1.0),
              Decoding("nucleus", top_p=1e-30)]
STRATEGY_IDS = ["temperature", "top_k-50", "top_k-1", "top_k-above-vocab", "nucleus-0.9", "nucleus-1", "nucleus-1e-30"]


def picked_logits(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, chosen[:, None]).squeeze(-1)


def is_a_maximum(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Per row: the chosen token's logit is the row's largest (the greedy token, or one tied with it)."""
    return picked_logits(logits, chosen) == logits.amax(-1)


def hard_logits(dtype: torch.dtype) -> torch.Tensor:
    """[6, 64] rows of one dtype: ordinary, half masked (-inf), all but one masked, huge (+-3e38, float32 only),
    one +inf, near-equal. Each row has a unique maximum."""
    rows = random_logits(6, 64, seed=20)
    rows[1, ::2] = -math.inf
    rows[2, 1:] = -math.inf
    rows[3] = rows[3] * 1e37 if dtype == torch.float32 else rows[3] * 1e3
    rows[4, 7] = math.inf
    rows[5] = rows[5] * 1e-2
    rows = rows.to(dtype)
    assert ((rows == rows.amax(-1, keepdim=True)).sum(-1) == 1).all(), "the fixture needs a unique max per row"
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("params", STRATEGIES, ids=STRATEGY_IDS)
def test_a_tiny_temperature_picks_the_greedy_token_for_every_strategy(params, dtype):
    logits = hard_logits(dtype)
    for temperature in TINY_TEMPERATURES:
        for step in range(3):
            decodings = [replace(params, temperature=temperature, seed=seed) for seed in range(len(logits))]
            chosen = pick(decodings, logits, step)
            assert torch.equal(chosen, logits.argmax(-1)), f"T={temperature}, step {step}: {chosen.tolist()}"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
def test_huge_and_infinite_logits_keep_their_limit_at_any_temperature(temperature):
    """A logit 1e37 above the rest holds all the mass; +inf logits share it; -inf ones never win."""
    rows = torch.tensor([[3e38, -3e38, 2.9e38, 0.0], [-math.inf, math.inf, 5.0, math.inf],
                         [-math.inf, -math.inf, 1e38, -math.inf]]).repeat_interleave(200, dim=0)
    for params in STRATEGIES:
        decodings = [replace(params, temperature=temperature, seed=seed) for seed in range(len(rows))]
        chosen = pick(decodings, rows, step=1)
        assert is_a_maximum(rows, chosen).all(), f"{params}: {chosen.tolist()}"
    both = pick([Decoding("temperature", temperature=temperature, seed=s) for s in range(200)], rows[200:400])
    assert set(both.tolist()) == {1, 3}, "two +inf logits share the mass"


def test_a_tiny_temperature_among_tied_maxima_picks_only_the_maxima():
    """The T -> 0 limit of a tie is uniform over the tied tokens: both are reachable, nothing else is."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0, 1.999]]).repeat(400, 1)
    chosen = pick([Decoding("temperature", temperature=1e-40, seed=s) for s in range(400)], logits)
    assert set(chosen.tolist()) == {1, 3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoding", [Decoding("temperature", temperature=10.0), Decoding("top_k", 0.7, top_k=4),
                                      Decoding("nucleus", 1.3, top_p=0.7)], ids=["temperature-10", "top_k", "nucleus"])
def test_half_precision_and_masked_logits_sample_the_tempered_softmax(decoding, dtype):
    logits = torch.tensor([2.0, -math.inf, 1.0, 0.5, -math.inf, 0.0, -1.0, -2.5]).to(dtype)
    decodings = [Decoding(decoding.strategy, decoding.temperature, decoding.top_k, decoding.top_p, seed=s)
                 for s in range(N)]
    observed = frequencies(pick(decodings, logits.repeat(N, 1), step=2), len(logits))
    expected = expected_distribution(logits.double(), decoding)
    assert (observed - expected).abs().max().item() < 0.015, (observed.tolist(), expected.tolist())
    assert (observed[expected == 0] == 0).all()


@pytest.mark.parametrize(("too_wide", "same"), [(Decoding("top_k", 1.5, top_k=10**5), Decoding("temperature", 1.5)),
                                                (Decoding("nucleus", 1.5, top_p=1.0), Decoding("temperature", 1.5))])
def test_cuts_that_cut_nothing_draw_exactly_as_plain_temperature(too_wide, same):
    logits = random_logits(4, 1000, seed=21).repeat_interleave(250, dim=0)
    wide = pick([Decoding(too_wide.strategy, 1.5, too_wide.top_k, too_wide.top_p, seed=s) for s in range(1000)], logits)
    plain = pick([Decoding(same.strategy, 1.5, seed=s) for s in range(1000)], logits)
    assert torch.equal(wide, plain)


def unmix32(x: int) -> int:
    """The inverse of murmur3's 32-bit finalizer (``_mix32``)."""
    x ^= x >> 16
    x = (x * pow(0xC2B2AE35, -1, 2**32)) & MASK32
    x ^= (x >> 13) ^ (x >> 26)
    x = (x * pow(0x85EBCA6B, -1, 2**32)) & MASK32
    return x ^ (x >> 16)


def seed_drawing(mixed: int, token: int, vocab: int) -> int:
    """A seed below 2**32 whose step-0 hash for ``token`` is ``mixed``, so its uniform is (mixed + 0.5) / 2**32."""
    row_hash = unmix32(mixed) ^ int(_token_hashes(vocab, torch.device("cpu"))[token])
    return unmix32(unmix32(row_hash)) ^ int(_mix32(torch.tensor(0x9E3779B9)))


def test_the_extreme_hashes_give_uniforms_strictly_inside_0_1():
    seeds = torch.tensor([seed_drawing(0, token=3, vocab=10), seed_drawing(MASK32, token=3, vocab=10)])
    draws = token_uniforms(seeds, 0, vocab=10)[:, 3]
    assert draws.tolist() == [0.5 / 2**32, (2**32 - 0.5) / 2**32]
    exponentials = -draws.log()
    assert (exponentials > 0).all() and exponentials.isfinite().all()


def test_a_token_of_weight_zero_never_wins_even_with_the_best_draw():
    """The best draw (the smallest exponential) goes to a token of weight 0, beside tokens whose weight over any
    exponential rounds to 0 (subnormal) or nearly."""
    cases = [[0.0, 5e-324, 0.0], [5e-324, 0.0, 5e-324], [1e-300, 0.0, 1.0], [0.0, 0.0, 1e-20]]
    for weights in cases:
        zero = weights.index(0.0)
        seeds = torch.tensor([seed_drawing(MASK32, zero, vocab=3)])
        chosen = exponential_race(torch.tensor([weights], dtype=torch.float64), token_uniforms(seeds, 0, vocab=3))
        assert weights[chosen.item()] > 0, weights


def test_no_draw_picks_a_token_of_weight_zero():
    """2,000 seeds x 8 steps on sparse weights spread over 300 orders of magnitude."""
    generator = torch.Generator().manual_seed(23)
    weights = torch.exp(-690 * torch.rand(8, 500, generator=generator, dtype=torch.float64))
    weights[torch.rand(8, 500, generator=generator) < 0.9] = 0.0
    weights[:, 0] = 0.0
    weights[:, -1] = 0.0
    seeds = torch.arange(2000)
    for step in range(8):
        rows = weights[step].repeat(len(seeds), 1)
        chosen = exponential_race(rows, token_uniforms(seeds, step, vocab=500))
        assert (rows.gather(-1, chosen[:, None]) > 0).all()


@pytest.mark.parametrize("params", STRATEGIES[1:], ids=STRATEGY_IDS[1:])
def test_the_token_a_cut_drops_never_wins_even_with_the_best_draw(params):
    logits = random_logits(1, 300, seed=22)[0]
    reference = replace(params, temperature=1.0, top_k=min(params.top_k, 300))
    dropped = (expected_distribution(logits, reference) == 0).nonzero().squeeze(-1)
    for token in dropped[logits[dropped].argsort(descending=True)[:3]].tolist():  # the likeliest dropped ones
        chosen = pick([replace(params, temperature=1.0, seed=seed_drawing(MASK32, token, vocab=300))], logits[None])
        assert chosen.item() != token


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99, 0.999999, 1.0])
@pytest.mark.parametrize("top_k", [0, 1, 1024, 1025, 9000])
def test_cuts_reaching_past_the_heaviest_tokens_keep_what_a_full_sort_keeps(top_k, top_p):
    """Rows flat enough that the nucleus holds more than 1,024 or 8,192 of 49,152 tokens, beside peaked ones: the
    tokens kept are those of the smallest head, by a full sort, whose mass reaches top_p, cut to the top k."""
    generator = torch.Generator().manual_seed(25)
    scales = torch.tensor([0.05, 0.5, 1.0, 2.0, 6.0], dtype=torch.float64)[:, None]
    weights = (torch.randn(5, 49_152, generator=generator, dtype=torch.float64) * scales).exp()
    kept = keep_heads(weights, torch.full((5,), top_k), torch.full((5,), top_p, dtype=torch.float64)) > 0
    ordered, order = weights.sort(dim=-1, descending=True)
    before = ordered.cumsum(-1) - ordered
    expected = (before < top_p * weights.sum(-1, keepdim=True)) if top_p < 1 else torch.ones_like(kept)
    if top_k:
        expected[:, top_k:] = False
    expected[:, 0] = True
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, order, expected))


@pytest.mark.parametrize(("field", "value"), [("temperature", -1.0), ("temperature", math.nan),
                                              ("temperature", math.inf), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
                                              ("top_p", math.nan)])
def test_parameters_no_sampler_can_honour_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        Decoding("temperature", **{field: value})


def test_greedy_rows_beside_sampling_rows_of_infinite_logits_stay_greedy_and_finite():
    """Greedy rows (T = 0) share the batch's arithmetic with sampling rows: neither gets a NaN-made pick."""
    logits = hard_logits(torch.float32)
    decodings = [Decoding("temperature", temperature=0.0 if row % 2 else 2.0, seed=row) for row in range(len(logits))]
    sampler = Sampler(decodings, torch.device("cpu"))
    for step in range(20):
        chosen = sampler(logits, step)
        assert torch.equal(chosen[1::2], logits[1::2].argmax(-1))
        assert (picked_logits(logits, chosen) > -math.inf).all(), "a masked token was picked"
        assert chosen[4] == 7, "the +inf token holds all the mass"

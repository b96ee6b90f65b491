"""Per-row decoding: each row follows its own strategy, and a seeded row draws the same token however it is batched.

Statistical checks use fixed seeds (0..N-1), so they are deterministic; their bounds are loose (several
standard deviations) so a correct sampler passes them with a wide margin.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from service.engine.sampling import Decoding, Sampler, token_uniforms

CPU = torch.device("cpu")
N = 20_000  # rows (one seed each) in the statistical checks


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def pick(decodings: list[Decoding], logits: torch.Tensor, step: int = 0) -> torch.Tensor:
    return Sampler(decodings, CPU)(logits, step)


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / len(tokens)


def test_greedy_rows_take_the_argmax_even_beside_sampling_rows():
    logits = random_logits(8, 50, seed=0)
    strategies = ["greedy", "temperature", "greedy", "top_k", "greedy", "nucleus", "greedy", "temperature"]
    decodings = [Decoding(strategy, temperature=1.5, seed=row) for row, strategy in enumerate(strategies)]
    greedy_rows = [row for row, strategy in enumerate(strategies) if strategy == "greedy"]
    for step in range(20):
        chosen = pick(decodings, logits, step)
        assert torch.equal(chosen[greedy_rows], logits[greedy_rows].argmax(-1))
    all_greedy = pick([Decoding()] * 8, logits)
    assert torch.equal(all_greedy, logits.argmax(-1))
    zero_temperature = pick([Decoding("temperature", temperature=0.0, seed=s) for s in range(8)], logits)
    assert torch.equal(zero_temperature, logits.argmax(-1))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_rows_pick_only_among_the_k_most_likely(k):
    vocab = 40
    logits = random_logits(4, vocab, seed=1).repeat_interleave(500, dim=0)  # 4 distributions x 500 seeds
    decodings = [Decoding("top_k", top_k=k, temperature=2.0, seed=seed) for seed in range(len(logits))]
    chosen = pick(decodings, logits, step=3)
    top = logits.topk(k, dim=-1).indices
    assert (chosen[:, None] == top).any(-1).all(), "a top_k row picked a token outside its top k"
    for row in range(0, len(logits), 500):  # and every one of the k is actually reachable
        assert set(chosen[row:row + 500].tolist()) == set(top[row].tolist())


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches ``top_p`` (computed in float64)."""
    probs = (logits.double() / temperature).softmax(-1)
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(-1) - ordered  # mass of the strictly more likely tokens
    return set(order[before < top_p].tolist())


def test_nucleus_rows_pick_only_from_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    logits = probs.log().repeat(2000, 1)
    chosen = pick([Decoding("nucleus", top_p=0.9, temperature=1.0, seed=s) for s in range(2000)], logits)
    assert set(chosen.tolist()) == {0, 1, 2} == nucleus(logits[0], 1.0, 0.9)
    # random distributions, with temperatures that reshape them before the cut
    for case, (temperature, top_p) in enumerate([(1.0, 0.5), (0.7, 0.9), (1.8, 0.3)]):
        rows = random_logits(3, 30, seed=10 + case).repeat_interleave(400, dim=0)
        decodings = [Decoding("nucleus", top_p=top_p, temperature=temperature, seed=s) for s in range(len(rows))]
        chosen = pick(decodings, rows, step=case)
        for start in range(0, len(rows), 400):
            allowed = nucleus(rows[start], temperature, top_p)
            assert set(chosen[start:start + 400].tolist()) == allowed


def test_a_seeded_row_draws_the_same_token_whatever_else_is_in_the_batch():
    vocab = 64
    target_logits = random_logits(1, vocab, seed=2)[0]
    targets = [Decoding("temperature", temperature=3.0, seed=1234), Decoding("top_k", top_k=20, temperature=3.0,
               seed=-7), Decoding("nucleus", top_p=0.95, temperature=3.0, seed=2**62 + 5)]
    for target in targets:
        alone = [pick([target], target_logits[None], step).item() for step in range(12)]
        assert len(set(alone)) > 1, "the draws do not depend on the step"
        for layout in range(4):  # other rows of every strategy, the target at another position each time
            others = [Decoding(s, temperature=0.8, top_k=5, top_p=0.5, seed=layout * 10 + i)
                      for i, s in enumerate(["greedy", "temperature", "top_k", "nucleus"][:layout + 1])]
            position = layout % (len(others) + 1)
            decodings = [*others[:position], target, *others[position:]]
            logits = random_logits(len(decodings), vocab, seed=100 + layout)
            logits[position] = target_logits
            batched = [pick(decodings, logits, step)[position].item() for step in range(12)]
            assert batched == alone, f"layout {layout}: the draw depends on the other rows"


def test_select_rows_keeps_each_rows_own_parameters_and_seed():
    decodings = [Decoding("temperature", temperature=2.0, seed=s) for s in (11, 22, 33)] + [Decoding()]
    logits = random_logits(4, 64, seed=3)
    sampler = Sampler(decodings, CPU)
    keep = torch.tensor([1, 3])
    sampler.select_rows(keep)
    for step in range(10):
        assert torch.equal(sampler(logits[keep], step), pick([decodings[1], decodings[3]], logits[keep], step))


def chi_square_of_uniforms(draws: torch.Tensor) -> float:
    """Pearson's chi-square of ``draws`` in 20 equal buckets of [0, 1) (19 degrees of freedom)."""
    counts = torch.bincount((draws * 20).long(), minlength=20).double()
    expected = len(draws) / 20
    return ((counts - expected) ** 2 / expected).sum().item()


def correlation(first: torch.Tensor, second: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([first, second]))[0, 1].item()


def test_token_uniforms_are_uniform_and_independent_across_seeds_steps_and_tokens():
    seeds = torch.arange(N)
    by_seed = token_uniforms(seeds, 0, vocab=2)  # [N, 2]
    by_token = token_uniforms(torch.tensor([42]), 7, vocab=N)[0]
    by_step = token_uniforms(torch.full((N,), 42), torch.arange(N), vocab=2)
    for draws in (by_seed[:, 0], by_seed[:, 1], by_token, by_step[:, 0]):
        assert ((draws > 0) & (draws < 1)).all()
        assert abs(draws.mean().item() - 0.5) < 0.02
        assert chi_square_of_uniforms(draws) < 60, "chi-square over 20 buckets (19 degrees of freedom)"
    pairs = [(by_seed[:-1, 0], by_seed[1:, 0]), (by_seed[:, 0], by_seed[:, 1]), (by_token[:-1], by_token[1:]),
             (by_step[:-1, 0], by_step[1:, 0]), (by_seed[:, 0], token_uniforms(seeds, 1, vocab=1)[:, 0])]
    for first, second in pairs:  # seed s vs s + 1, token i vs i + 1, step t vs t + 1
        assert abs(correlation(first, second)) < 0.05
    extreme = token_uniforms(torch.tensor([0, 2**63 - 1, 2**32, 2**32 - 1]), 10**6, vocab=1000)
    assert ((extreme > 0) & (extreme < 1)).all()


def expected_distribution(logits: torch.Tensor, decoding: Decoding) -> torch.Tensor:
    """What a row should sample from, computed here independently of the sampler."""
    probs = (logits.double() / decoding.temperature).softmax(-1)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    if decoding.strategy == "top_k":
        keep[probs.topk(decoding.top_k).indices] = True
    elif decoding.strategy == "nucleus":
        keep[list(nucleus(logits, decoding.temperature, decoding.top_p))] = True
    else:
        keep[:] = True
    probs = probs * keep
    return probs / probs.sum()


@pytest.mark.parametrize(
    "decoding",
    [Decoding("temperature", temperature=0.7), Decoding("temperature", temperature=2.0),
     Decoding("top_k", top_k=3, temperature=1.3), Decoding("nucleus", top_p=0.8, temperature=1.0)],
    ids=["temperature-0.7", "temperature-2.0", "top_k-3", "nucleus-0.8"],
)
def test_sampling_frequencies_follow_the_tempered_softmax(decoding):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.5])
    decodings = [Decoding(decoding.strategy, decoding.temperature, decoding.top_k, decoding.top_p, seed=s)
                 for s in range(N)]
    chosen = pick(decodings, logits.repeat(N, 1), step=5)
    observed = frequencies(chosen, len(logits))
    expected = expected_distribution(logits, decoding)
    # a frequency's standard deviation is at most 0.5 / sqrt(N) = 0.0035; allow about four of them
    assert (observed - expected).abs().max().item() < 0.015, (observed.tolist(), expected.tolist())
    assert (observed[expected == 0] == 0).all()


@pytest.mark.parametrize("decoding", [Decoding("temperature", temperature=1.0), Decoding("top_k", 1.0, top_k=50),
                                      Decoding("nucleus", 1.0, top_p=0.95)], ids=["temperature", "top_k", "nucleus"])
def test_logits_perturbed_by_rounding_keep_almost_every_draw(decoding):
    """Batching changes logits by float32 rounding (7.6e-5 measured on the tiny Llama). The draw is an exponential
    race (``exponential_race``): it changes only where the two best ratios of weight to exponential lie within the
    perturbation of each other, however large the vocabulary. Here 4,096 tokens, perturbed by 1e-3 (larger than
    rounding, so that a vocabulary this small shows it): 1-2 of 4,000 draws changed; inverting the cumulative
    distribution in token-id order, as the sampler did before, changed 275 (temperature), 19 (top-k 50) and 138
    (nucleus 0.95): each of its boundaries moves by the perturbation of every weight before it."""
    generator = torch.Generator().manual_seed(24)
    logits = torch.randn(1, 4096, generator=generator) * 2.5
    perturbed = logits + 1e-3 * torch.randn(1, 4096, generator=generator)
    sampler = Sampler([replace(decoding, seed=seed) for seed in range(2000)], CPU)
    changed = sum((sampler(logits.expand(2000, -1), step) != sampler(perturbed.expand(2000, -1), step)).sum().item()
                  for step in (0, 5))
    assert changed <= 5, f"{changed} of 4,000 draws changed"

"""Per-row decoding: each row follows its own strategy, and a seeded row draws the same token however it is batched.

Statistical checks use fixed seeds (0..N-1), so they are deterministic; their bounds are loose (several
standard deviations) so a correct sampler passes them with a wide margin.
"""
from __future__ import annotations

import pytest
import torch

from service.engine.sampling import Decoding, Sampler, row_uniforms

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


def test_row_uniforms_are_uniform_and_independent_of_neighbouring_seeds():
    seeds = torch.arange(N)
    for draws in (row_uniforms(seeds, step=0), row_uniforms(seeds, step=7),
                  torch.cat([row_uniforms(torch.tensor([42]), step) for step in range(2000)])):
        assert ((draws > 0) & (draws < 1)).all()
        assert abs(draws.mean().item() - 0.5) < 0.02
        counts = torch.bincount((draws * 20).long(), minlength=20).double()
        expected = len(draws) / 20
        chi_square = ((counts - expected) ** 2 / expected).sum().item()
        assert chi_square < 60, f"chi-square {chi_square:.1f} over 20 buckets (19 degrees of freedom)"
    first, second = row_uniforms(seeds, step=0), row_uniforms(seeds, step=1)
    assert abs(torch.corrcoef(torch.stack([first[:-1], first[1:]]))[0, 1].item()) < 0.05  # seed s vs s + 1
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.05  # step t vs t + 1
    extreme = row_uniforms(torch.tensor([0, 2**63 - 1, 2**32, 2**32 - 1]), step=10**6)
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


@pytest.mark.parametrize("decoding", [Decoding("temperature", temperature=1.5), Decoding("top_k", 1.5, top_k=20),
                                      Decoding("nucleus", 1.5, top_p=0.95)], ids=["temperature", "top_k", "nucleus"])
def test_logits_perturbed_by_batching_rounding_keep_almost_every_draw(decoding):
    """Batching changes logits by float32 rounding (7.6e-5 measured on the tiny Llama, whose logits have a standard
    deviation of about 0.17 over 1,000 tokens, so many are within 1e-4 of another). The draw is continuous in the
    logits: it changes only when it falls within O(1e-4) of a CDF boundary, about 3 of 2,000 seeds here (an
    inversion in sorted order changes about 300, wherever near-tied tokens swap places)."""
    generator = torch.Generator().manual_seed(24)
    logits = torch.randn(1, 1000, generator=generator) * 0.17
    perturbed = logits + 1e-4 * torch.randn(1, 1000, generator=generator)
    assert (logits.argsort(descending=True) != perturbed.argsort(descending=True)).sum() > 100, "few ties swap"
    decodings = [Decoding(decoding.strategy, decoding.temperature, decoding.top_k, decoding.top_p, seed=seed)
                 for seed in range(2000)]
    for step in (0, 5):
        before = pick(decodings, logits.expand(2000, -1), step)
        after = pick(decodings, perturbed.expand(2000, -1), step)
        assert (before != after).sum() <= 10, f"step {step}: {(before != after).sum()} of 2,000 draws changed"

"""Per-row decoding: greedy, top-k, nucleus and temperature sampling, vectorized over the batch.

Each row carries its own strategy parameters and seed. A row's random draw at step t depends only on
(seed, t), never on the other rows in the batch, so a seeded request is reproducible however it is batched.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from service.engine.strategies import SAMPLING_DEFAULTS, Strategy

MASK32 = 0xFFFFFFFF
HEAD_TOKENS = (1024, 8192)  # how many of a row's heaviest tokens a top-k or nucleus cut looks among, in turn


@dataclass(frozen=True)
class Decoding:
    """How one request picks its tokens."""

    strategy: Strategy = "greedy"
    temperature: float = SAMPLING_DEFAULTS["temperature"]
    top_k: int = SAMPLING_DEFAULTS["top_k"]
    top_p: float = SAMPLING_DEFAULTS["top_p"]
    max_new_tokens: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        """Raises ValueError on parameters no sampler can honour (the API's schemas refuse them first)."""
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be finite and >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")

    def row_params(self) -> tuple[float, int, float]:
        """(temperature, top_k, top_p) for this row; 0 temperature means greedy, 0 top_k means off."""
        if self.strategy == "greedy":
            return 0.0, 0, 1.0
        if self.strategy == "top_k":
            return self.temperature, self.top_k, 1.0
        if self.strategy == "nucleus":
            return self.temperature, 0, self.top_p
        return self.temperature, 0, 1.0


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` (>= 0) of a request seeded ``seed`` that asks for several choices, in
    [0, 2^63): ``seed`` itself (its low 63 bits, all the sampler reads) for choice 0, so that a single choice samples
    as the request alone would; distinct seeds for distinct indices below 2^63 (adding multiples of an odd constant
    is a bijection modulo 2^63)."""
    return (seed + index * 0x9E3779B97F4A7C15) & (2**63 - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors that hold uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def _row_hashes(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """One 32-bit hash per row (int64 holding uint32), a pure function of (seed, step); ``step`` shared or per row."""
    low, high = seeds & MASK32, (seeds >> 32) & MASK32
    return _mix32(_mix32(low ^ _mix32(high + 0x9E3779B9)) ^ ((step * 0x632BE5AB) & MASK32))


@functools.cache
def _token_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    """One 32-bit hash per token id [V] (int64 holding uint32), the same for every row and step."""
    return _mix32((torch.arange(vocab, device=device) * 0x9E3779B9 + 0x7F4A7C15) & MASK32)


def token_uniforms(seeds: torch.Tensor, step: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1) [B, V] float64, one per row and token id, each a pure function of (seed, step, token id):
    murmur3's finalizer of the row's hash xor the token's; 2^32 values, (h + 0.5) / 2^32, so never 0 or 1."""
    mixed = _mix32(_row_hashes(seeds, step)[:, None] ^ _token_hashes(vocab, seeds.device))
    return (mixed.double() + 0.5) / 2.0**32


def tempered_weights(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Each row's tempered softmax, unnormalized: exp((logit - row max) / T), in float64 [B, V].

    ``logits`` [B, V] of any float dtype (bf16, fp16, fp32; -inf for masked tokens, +inf allowed); ``temperature``
    [B], >= 0. Softmax is unchanged by subtracting the row max, and doing it before dividing is what keeps the
    result right at every T: the scaled logits are <= 0 with the max at exactly 0, so exp never overflows and every
    row's weights sum to at least 1 (no 0/0). A tiny T (1e-40, subnormal, even 0) sends every non-maximal scaled
    logit to -inf and its weight to 0, which is the T -> 0 limit: all the mass on the maxima (the greedy token when
    it is unique), with no threshold to choose. float64 keeps ``logit - max`` finite for any float32 logits (1e38
    and -1e38 differ by more than float32 can hold). Every maximum (+inf ones included, and every token of an
    all -inf row) gets weight 1 rather than the NaN that inf - inf would give.
    """
    logits = logits.double()
    top = logits.amax(dim=-1, keepdim=True)
    return torch.where(logits == top, 0.0, (logits - top) / temperature[:, None]).exp()


def keep_heads(weights: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``weights`` [B, V] (>= 0) with every token outside its row's top-k and nucleus set to 0.

    ``top_k`` [B] long (0: off; above V: the whole vocabulary); ``top_p`` [B] in (0, 1] (1: off). The nucleus is
    the smallest head, in decreasing weight, whose mass reaches ``top_p``: the tokens whose more likely tokens hold
    less than ``top_p`` of the mass. Both cuts keep the ``size`` heaviest tokens (at least one), and the cut is a
    weight threshold, the size-th largest weight, so tokens tied at the threshold are all kept and the set never
    depends on how a sort orders ties. Rows that cut nothing are not sorted at all.
    """
    vocab = weights.shape[-1]
    top_k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    cutting = ((top_k < vocab) | (top_p < 1)).nonzero().squeeze(-1)
    if len(cutting) == 0:
        return weights
    return weights.index_copy(0, cutting, _cut(weights[cutting], top_k[cutting], top_p[cutting]))


def _cut(weights: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``keep_heads`` for rows that cut, ``top_k`` [R] in [1, V]. A row's cut is sought among its heaviest tokens,
    1,024 of them (or its ``top_k``, if more), then 8,192, then all (``torch.topk``; on the CPU the first costs a
    seventh of a full sort): only a nucleus that reaches past them looks further. SmolLM2-135M's nucleus at top_p 0.95
    held more than 1,024 tokens in 46 of 240 sampled steps, median 112 (docs/results/sampling_race/)."""
    vocab = weights.shape[-1]
    total = weights.sum(dim=-1, keepdim=True)
    threshold = torch.empty_like(total)
    todo = torch.arange(len(weights), device=weights.device)
    cut_k = torch.where(top_k < vocab, top_k, 0)  # the rows that cut to a top k, and their k
    for head in (*HEAD_TOKENS, vocab):
        head = min(vocab, max(head, int(cut_k[todo].max())))
        ordered = weights[todo].topk(head, dim=-1).values
        mass = ordered.cumsum(dim=-1)
        nucleus = ((mass - ordered) < top_p[todo, None] * total[todo]).sum(dim=-1)
        settled = (nucleus < head) | (top_k[todo] <= head) | (head == vocab)
        nucleus = torch.where(top_p[todo] < 1, nucleus, vocab)  # no float rounding cuts the tail at top_p = 1
        size = torch.minimum(nucleus, top_k[todo]).clamp(min=1)
        threshold[todo[settled]] = ordered[settled].gather(-1, (size[settled] - 1)[:, None])
        todo = todo[~settled]
        if len(todo) == 0:
            break
    return weights.masked_fill(weights < threshold, 0.0)


def exponential_race(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row [B]: the argmax of weight_i / E_i, E_i = -log(u_i) ~ Exp(1) from ``uniforms`` [B, V] in (0, 1).

    ``weights`` [B, V] float64 >= 0 with a positive entry in every row. Token i wins with probability w_i / sum(w)
    (the first of independent exponential clocks of rates w_i rings at i with that probability: the Gumbel-max trick
    in ratio form, as vLLM samples). A token of weight 0 is never picked. Perturbing the weights by a relative eps
    (batching changes logits by float rounding) changes the pick only when the two best ratios lie within eps of each
    other, however large the vocabulary; inverting a cumulative distribution over it would change the pick whenever
    the draw lies near any of its V boundaries, each moved by the rounding of every weight before it.
    """
    ratios = weights / -uniforms.log()
    return ratios.masked_fill(weights == 0, -1.0).argmax(dim=-1)


class Sampler:
    """The decoding parameters of a batch's rows as tensors; picks the next token for every row at once."""

    def __init__(self, decodings: list[Decoding], device: torch.device):
        params = [d.row_params() for d in decodings]
        self.temperature = torch.tensor([p[0] for p in params], device=device, dtype=torch.float64)
        self.top_k = torch.tensor([p[1] for p in params], device=device, dtype=torch.long)
        self.top_p = torch.tensor([p[2] for p in params], device=device, dtype=torch.float64)
        self.seeds = torch.tensor([d.seed & (2**63 - 1) for d in decodings], device=device, dtype=torch.long)
        self.all_greedy = all(p[0] == 0.0 for p in params)

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows still running."""
        self.temperature, self.top_k = self.temperature[keep], self.top_k[keep]
        self.top_p, self.seeds = self.top_p[keep], self.seeds[keep]

    def extend(self, other: Sampler) -> None:
        """Append another sampler's rows (requests joining a running batch)."""
        self.temperature = torch.cat([self.temperature, other.temperature])
        self.top_k, self.top_p = torch.cat([self.top_k, other.top_k]), torch.cat([self.top_p, other.top_p])
        self.seeds = torch.cat([self.seeds, other.seeds])
        self.all_greedy = self.all_greedy and other.all_greedy

    def __call__(self, logits: torch.Tensor, step: int | list[int] | torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """Next token per row [R] from logits [R, V] of ``rows`` [R] (long, indices of the sampler's rows; None: all of
        them, in order); ``step`` counts each row's tokens so far (shared or per row).

        Greedy rows (temperature 0) take the argmax. Sampling rows draw from their tempered softmax cut to their
        top-k and nucleus (see ``tempered_weights``, ``keep_heads``, ``exponential_race``). Greedy-only batches draw
        nothing, so their steps never go to the device."""
        greedy = logits.argmax(dim=-1)
        if self.all_greedy:
            return greedy
        picked = slice(None) if rows is None else rows
        temperature = self.temperature[picked]
        sampling = (temperature > 0).nonzero().squeeze(-1)
        steps = torch.as_tensor(step, device=logits.device).expand(len(temperature))[sampling]
        weights = keep_heads(tempered_weights(logits[sampling], temperature[sampling]),
                             self.top_k[picked][sampling], self.top_p[picked][sampling])
        uniforms = token_uniforms(self.seeds[picked][sampling], steps, logits.shape[-1]).to(weights.device)
        return greedy.index_copy(0, sampling, exponential_race(weights, uniforms))

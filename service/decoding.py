"""Per-row decoding: greedy, top-k, nucleus and temperature sampling, vectorized over the batch.

Each row carries its own strategy parameters and seed. A row's random draw at step t depends only on
(seed, t), never on the other rows in the batch, so a seeded request is reproducible however it is batched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Strategy = Literal["greedy", "top_k", "nucleus", "temperature"]
MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Decoding:
    """How one request picks its tokens."""

    strategy: Strategy = "greedy"
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9
    max_new_tokens: int = 32
    seed: int = 0

    def row_params(self) -> tuple[float, int, float]:
        """(temperature, top_k, top_p) for this row; 0 temperature means greedy, 0 top_k means off."""
        if self.strategy == "greedy":
            return 0.0, 0, 1.0
        if self.strategy == "top_k":
            return self.temperature, self.top_k, 1.0
        if self.strategy == "nucleus":
            return self.temperature, 0, self.top_p
        return self.temperature, 0, 1.0


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors that hold uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def row_uniforms(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row, a pure function of (seed, step); ``step`` is shared or per row."""
    low, high = seeds & MASK32, (seeds >> 32) & MASK32
    mixed = _mix32(_mix32(low ^ _mix32(high + 0x9E3779B9)) ^ ((step * 0x632BE5AB) & MASK32))
    return (mixed.double() + 0.5) / 2.0**32


class RowSampler:
    """The decoding parameters of a batch's rows as tensors; picks the next token for every row at once."""

    def __init__(self, decodings: list[Decoding], device: torch.device):
        params = [d.row_params() for d in decodings]
        self.temperature = torch.tensor([p[0] for p in params], device=device, dtype=torch.float32)
        self.top_k = torch.tensor([p[1] for p in params], device=device, dtype=torch.long)
        self.top_p = torch.tensor([p[2] for p in params], device=device, dtype=torch.float32)
        self.seeds = torch.tensor([d.seed & (2**63 - 1) for d in decodings], device=device, dtype=torch.long)
        self.all_greedy = all(p[0] == 0.0 for p in params)

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows still running."""
        self.temperature, self.top_k = self.temperature[keep], self.top_k[keep]
        self.top_p, self.seeds = self.top_p[keep], self.seeds[keep]

    def extend(self, other: RowSampler) -> None:
        """Append another sampler's rows (requests joining a running batch)."""
        self.temperature = torch.cat([self.temperature, other.temperature])
        self.top_k, self.top_p = torch.cat([self.top_k, other.top_k]), torch.cat([self.top_p, other.top_p])
        self.seeds = torch.cat([self.seeds, other.seeds])
        self.all_greedy = self.all_greedy and other.all_greedy

    def __call__(self, logits: torch.Tensor, step: int | list[int] | torch.Tensor) -> torch.Tensor:
        """Next token per row from logits [B, V]; ``step`` counts each row's tokens so far (shared or per row).

        Greedy-only batches draw nothing, so their steps never go to the device."""
        greedy = logits.argmax(dim=-1)
        if self.all_greedy:
            return greedy
        step = torch.as_tensor(step, device=logits.device)
        sampling = self.temperature > 0
        temperature = torch.where(sampling, self.temperature, torch.ones_like(self.temperature))
        sorted_logits, order = (logits.float() / temperature[:, None]).sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)  # [B, V], descending
        ranks = torch.arange(probs.shape[-1], device=probs.device)
        top_k = torch.where(self.top_k > 0, self.top_k, torch.full_like(self.top_k, probs.shape[-1]))
        cut = ranks[None, :] >= top_k[:, None]
        cut |= (probs.cumsum(dim=-1) - probs) > self.top_p[:, None]  # nucleus: keep the smallest head reaching p
        probs = probs.masked_fill(cut, 0.0)
        cdf = probs.double().cumsum(dim=-1)
        draw = row_uniforms(self.seeds, step).to(cdf.device) * cdf[:, -1]
        picked = torch.searchsorted(cdf, draw[:, None]).clamp(max=probs.shape[-1] - 1)
        sampled = order.gather(-1, picked).squeeze(-1)
        return torch.where(sampling, sampled, greedy)

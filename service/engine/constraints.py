"""Constrained decoding: rows whose next token must come from a set of their own, beside free rows in one batch."""
from __future__ import annotations

from typing import Protocol

import torch

from service.engine.logprobs import token_logprobs


class TokenConstraint(Protocol):
    """What a generation may decode next (one per generation, holding its state; e.g.
    ``service.tasks.span_constraint.SpanConstraint``)."""

    def allowed(self) -> torch.Tensor:
        """The token ids [n] (long, n >= 1) the next step may take."""

    def advance(self, token: int, logprob: float) -> None:
        """Take the token the step chose (one of ``allowed()``) and its log-probability under the model's own
        distribution (natural log, before the constraint and any sampling)."""


def constrain(logits: torch.Tensor, constraints: list[TokenConstraint | None]) -> torch.Tensor:
    """``logits`` [B, V] with every logit a row's constraint does not allow set to -inf (one constraint or None per
    row; free rows as they are): a copy, or ``logits`` itself when no row is constrained (the model's own logits stay
    for log-probabilities). Every decoding strategy then picks among the allowed tokens only: greedy takes the best
    allowed token, sampling renormalizes over them (-inf has weight 0 at any temperature)."""
    rows = [row for row, constraint in enumerate(constraints) if constraint is not None]
    if not rows:
        return logits
    keep = torch.zeros(len(rows), logits.shape[-1], dtype=torch.bool)
    for index, row in enumerate(rows):
        keep[index, constraints[row].allowed()] = True
    index, masked = torch.tensor(rows, device=logits.device), logits.clone()
    masked[index] = logits[index].masked_fill(~keep.to(logits.device), -torch.inf)
    return masked


def advance(constraints: list[TokenConstraint | None], chosen: list[int], logits: torch.Tensor) -> None:
    """Hand every constrained row's constraint the token the step chose for it (``chosen`` [B]) and its raw
    log-probability (``logprobs.token_logprobs`` of the row's ``logits`` [B, V])."""
    logprobs = token_logprobs(logits, chosen, [None if constraint is None else 0 for constraint in constraints])
    for row, (logprob, _) in logprobs.items():
        constraints[row].advance(chosen[row], logprob)

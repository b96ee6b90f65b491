"""What a scoring request (``requests.Scoring``) answers, from the logits at its prompt's last position: the
candidates' probabilities renormalized over them, or their log-probabilities under the whole next-token distribution
together with the weights that scored them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from service.engine.requests import Scoring
from service.lora.adapter_files import AdapterWeights


@dataclass(frozen=True)
class CandidateLogprobs:
    """A ``Scoring(logprobs=True)`` result. ``logprobs`` [candidates]: natural logs of P(candidate | prompt) under the
    model's whole next-token distribution (log-softmax of the float32 logits over the vocabulary), in the order of
    ``Scoring.candidates``. ``weights``: the adapter weights the engine bound the request to when it took it from the
    queue (None: the bare base), so that what goes with exactly those weights (their card's calibration) is used even
    if the adapter's name was registered again meanwhile."""

    logprobs: list[float]
    weights: AdapterWeights | None


def scored(work: Scoring, logits: torch.Tensor, weights: AdapterWeights | None) -> list[float] | CandidateLogprobs:
    """The answer to ``work`` from ``logits`` [vocab] (float32, its prompt's last position), run with ``weights``:
    softmax over the candidates' logits (a list that sums to 1), or with ``work.logprobs`` a ``CandidateLogprobs``."""
    candidates = torch.tensor(work.candidates, device=logits.device)
    if not work.logprobs:
        return logits[candidates].softmax(-1).tolist()
    return CandidateLogprobs(logits.log_softmax(-1)[candidates].tolist(), weights)

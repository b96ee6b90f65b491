"""Requests joining the batch: taken from the queue together, their prompts' prefill passes, and their landing.

Their prompts run in one pass (a chunk per pause beside running rows). With prefix caching, a pass of the prefixes
that several of them share and the cache lacks may come first, one row per prefix, so each such prefix runs once and
the requests' own pass finds it cached. Once their own pass is through, NLI requests get their answer and
generations join the running rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from service.engine.prefill import Prefill
from service.engine.requests import Scoring
from service.engine.running_batch import RunningBatch
from service.engine.sampling import Sampler
from service.engine.scoring import scored
from service.errors import NonFiniteLogits


@dataclass
class Joining:
    """Requests of one kind taken from the queue (the engine's ``_Pending``), and the prefill pass running for them: of
    their prompts, or first of the prefixes several of them share (``leaders``: a request that begins each)."""

    pendings: list
    prefill: Prefill
    leaders: list | None = None

    @property
    def rows(self) -> list:
        """The requests whose adapters the rows of the pass use, in its order."""
        return self.leaders or self.pendings

    def land(self, running: RunningBatch, max_new_tokens: int) -> None:
        """Once their own pass is through: scoring requests get their scores (``scoring.scored``), generations (each
        generating at most ``max_new_tokens``, or fewer if it asks) join ``running``."""
        pendings, prefill = self.pendings, self.prefill
        if isinstance(pendings[0].work, Scoring):
            finite = torch.isfinite(prefill.logits).all(-1).tolist()
            for row, pending in enumerate(pendings):
                if pending.future.done():
                    continue
                if finite[row]:
                    pending.future.set_result(scored(pending.work, prefill.logits[row], pending.adapter))
                else:
                    pending.future.set_exception(NonFiniteLogits(pending.work.adapter))
            return
        works = [pending.work for pending in pendings]
        limits = [min(work.decoding.max_new_tokens, max_new_tokens) for work in works]
        sampler = Sampler([work.decoding for work in works], prefill.logits.device)
        running.add(pendings, prefill.logits, prefill.cache, prefill.mask, sampler, limits)

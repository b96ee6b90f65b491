"""A batch of generations in flight: its rows, their place in the KV cache and their decoding state.

Row i of the batch owns row i of the decoder's ``RowKVCache``. Requests join between two decoding
steps: they are prefilled on their own and their keys/values are copied into the next free rows.
Rows that finish leave: the rows after them move up, so finished rows stop costing compute.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache

from service.engine.constraints import advance, constrain
from service.engine.decode_step import DecodeStep
from service.engine.kv_cache import RowKVCache
from service.engine.logprobs import token_logprobs
from service.engine.requests import SampledToken
from service.engine.sampling import Sampler

log = logging.getLogger(__name__)


class RunningBatch:
    """Rows being generated together. ``pendings`` are the engine's requests, one per row."""

    def __init__(self, decoder: DecodeStep):
        self.decoder = decoder
        self.pendings: list = []
        self.logits: torch.Tensor | None = None  # [B, V] next-token logits
        self.positions: list[int] = []  # per row: tokens in the cache = the position of the next one
        self.sampler = Sampler([], decoder.device)
        self.limits: list[int] = []
        self.tokens: list[list[int]] = []
        self.first_token_at: list[float] = []

    def __len__(self) -> int:
        return len(self.pendings)

    def room(self, lengths: list[int]) -> tuple[RowKVCache, int]:
        """Make room in the KV cache for rows of prompts of ``lengths`` tokens after the running ones: the cache and
        their first row (a prefill pass that runs whole writes them there itself: ``kv_cache.OnePassCache``)."""
        start, cache = len(self), self.decoder.cache
        cache.reserve(start + len(lengths), max(lengths), used=(start, max(self.positions, default=0)))
        return cache, start

    def add(self, pendings: list, logits: torch.Tensor, prefill: DynamicCache | None, mask: torch.Tensor,
            sampler: Sampler, limits: list[int]) -> None:
        """Append prefilled rows after the running ones (``mask`` [k, W]: the prefill's cache columns that hold each
        row's tokens, see ``Prefill``): their keys and values copied from ``prefill``, or with None already written
        into the rows ``room`` made (a pass that ran whole)."""
        lengths = mask.sum(-1).tolist()
        if prefill is not None:
            cache, start = self.room(lengths)
            cache.write_prompts(start, prefill, mask)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.positions += lengths
        self.sampler.extend(sampler)
        self.pendings += pendings
        self.limits += limits
        self.tokens += [[] for _ in pendings]
        self.first_token_at += [0.0] * len(pendings)

    def sample(self, is_stop: Callable[[object, int], bool]) -> tuple[list[int], list[tuple[int, str]]]:
        """Pick every row's next token; returns (the tokens, [(row, finish reason)] for rows now done)."""
        constraints = [pending.work.constraint for pending in self.pendings]
        chosen = self.sampler(constrain(self.logits, constraints), [len(t) for t in self.tokens]).tolist()
        advance(constraints, chosen, self.logits)
        now, finished = time.perf_counter(), []
        for row, token in enumerate(chosen):
            if not self.tokens[row]:
                self.first_token_at[row] = now
            self.tokens[row].append(token)
            if is_stop(self.pendings[row].work, token):
                finished.append((row, "stop"))
            elif len(self.tokens[row]) >= self.limits[row]:
                finished.append((row, "length"))
        return chosen, finished

    def publish(self, chosen: list[int], finished: dict[int, str], ends_text: Callable[[object, int], bool]) -> None:
        """Hand each listened-to row the token this step picked (``chosen``; an end-of-text token that ends its row,
        as ``finished`` and ``ends_text`` say, is no output), with its log-probabilities if it asked (from
        ``logits`` [B, V]); a listener that raises has its request abandoned."""
        rows = [row for row, pending in enumerate(self.pendings) if pending.on_token is not None
                and not (finished.get(row) == "stop" and ends_text(pending.work, chosen[row]))]
        if not rows:
            return
        now, tops = time.perf_counter(), [None] * len(self)
        for row in rows:
            tops[row] = self.pendings[row].work.logprobs
        logprobs = token_logprobs(self.logits, chosen, tops)
        for row in rows:
            pending = self.pendings[row]
            try:
                pending.on_token(SampledToken(chosen[row], now, *logprobs.get(row, (None, ()))))
            except Exception:
                log.exception("a token listener failed; its request is abandoned")
                pending.future.abandoned = True

    def keep(self, rows: list[int]) -> torch.Tensor:
        """Keep only ``rows`` (in this order), dropping the others' cache and state; returns their index tensor."""
        index = torch.tensor(rows, dtype=torch.long, device=self.decoder.device)
        if rows != list(range(len(rows))):  # rows that stay in place need no copy
            self.decoder.cache.keep(index, max(self.positions))
        self.logits = self.logits[index]
        self.sampler.select_rows(index)
        for name in ("pendings", "positions", "limits", "tokens", "first_token_at"):
            values = getattr(self, name)
            setattr(self, name, [values[row] for row in rows])
        return index

    def forward(self, next_tokens: list[int]) -> None:
        """One decoding step: feed each row's last token, keep the next-token logits."""
        self.logits = self.decoder(next_tokens, self.positions)
        self.positions = [position + 1 for position in self.positions]

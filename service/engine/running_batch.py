"""A batch of generations in flight: its rows, their place in the KV cache and their decoding state.

Row i of the batch owns row i of the decoder's ``RowKVCache``. Requests join between two decoding
steps: they are prefilled on their own and their keys/values are copied into the next free rows.
Rows that finish leave: the rows after them move up, so finished rows stop costing compute.
With ``draft_tokens``, a step feeds each row its last token and up to that many draft tokens after it
(``drafts.lookup``), and the row then takes every token its strategy picks in agreement with them; a step feeds
``MOST_FED`` tokens in all at most, so drafts thin out as the batch grows and stop past ``MOST_FED`` / 2 rows. Where
the step's linear layers pad its rows x tokens (``DecodeStep.widest``), a row may be fed as many drafts as the padding
holds: one row is fed up to 7 with ``draft_tokens`` 4.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from service import metrics
from service.engine.constraints import advance, constrain
from service.engine.decode_step import DecodeStep
from service.engine.drafts import lookup
from service.engine.kv_cache import RowKVCache
from service.engine.logprobs import token_logprobs
from service.engine.requests import SampledToken
from service.engine.sampling import Sampler

log = logging.getLogger(__name__)
# the most tokens a step feeds, drafts included: on the CPU a step's layers took 43-56 ms for 1 row, 62-88 for 8, 75-117
# for 16, 101-135 for 32 and 214-249 for 64 (two runs, docs/results/drafts/step_rows.txt), so drafts that make a large
# batch's step several times as wide cost more than the steps they can save (measured while oneDNN padded up to 64 rows
# to a power of 2; now a multiple of 8 above 16, onednn_linear.padded_rows)
MOST_FED = 64


class RunningBatch:
    """Rows being generated together. ``pendings`` are the engine's requests, one per row; ``draft_tokens``: the most
    draft tokens a step feeds a row after its last token (0: none, one token per row and step)."""

    def __init__(self, decoder: DecodeStep, draft_tokens: int = 0):
        self.decoder, self.draft_tokens = decoder, draft_tokens
        self.pendings: list = []
        self.logits: torch.Tensor | None = None  # [B, Q, V] next-token logits after each token a row was fed last
        self.drafts: list[list[int]] = []  # per row: the draft tokens fed after its last token (fewer than Q)
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
        cache.reserve(start + len(lengths), max(lengths), used=(start, self.columns_written()))
        return cache, start

    def columns_written(self) -> int:
        """The KV cache columns the rows may read again: each row's tokens and the drafts it was fed last (until the
        next ``sample``, its position counts none of them)."""
        return max((position + len(drafts) for position, drafts in zip(self.positions, self.drafts)), default=0)

    def add(self, pendings: list, logits: torch.Tensor, prefill: DynamicCache | None, mask: torch.Tensor,
            sampler: Sampler, limits: list[int]) -> None:
        """Append prefilled rows after the running ones (``mask`` [k, W]: the prefill's cache columns that hold each
        row's tokens, see ``Prefill``): their keys and values copied from ``prefill``, or with None already written
        into the rows ``room`` made (a pass that ran whole)."""
        lengths = mask.sum(-1).tolist()
        if prefill is not None:
            cache, start = self.room(lengths)
            cache.write_prompts(start, prefill, mask)
        logits = logits[:, None]  # [k, 1, V]: the logits after the prompt
        if self.logits is not None:  # positions past a row's drafts are never read
            logits = torch.cat([self.logits, F.pad(logits, (0, 0, 0, self.logits.shape[1] - 1))])
        self.logits = logits
        self.positions += lengths
        self.drafts += [[] for _ in pendings]
        self.sampler.extend(sampler)
        self.pendings += pendings
        self.limits += limits
        self.tokens += [[] for _ in pendings]
        self.first_token_at += [0.0] * len(pendings)

    def sample(self, is_stop: Callable[[object, int], bool]) -> tuple[list[list[int]], list[tuple[int, str]]]:
        """Pick every row's next tokens: one from the logits after its last token, then, while the token picked equals
        the next of its drafts and the row goes on, one more from the logits after that draft token. Each is the token
        the row's strategy picks from those logits at that step, as if every token had a step of its own. Returns
        (each row's tokens, [(row, finish reason)] for rows now done)."""
        picked: list[list[int]] = [[] for _ in self.pendings]
        # [B][Q - 1]: a draft's non-finite logits end its row's run (the engine dropped rows whose first ones are)
        finite = torch.isfinite(self.logits[:, 1:]).all(-1).tolist()
        finished: dict[int, str] = {}
        rows, now = list(range(len(self))), time.perf_counter()
        for position in range(self.logits.shape[1]):
            chosen = self._pick(rows, position)
            for row, token in zip(rows, chosen):
                if not self.tokens[row]:
                    self.first_token_at[row] = now
                self.tokens[row].append(token)
                picked[row].append(token)
                if is_stop(self.pendings[row].work, token):
                    finished[row] = "stop"
                elif len(self.tokens[row]) >= self.limits[row]:
                    finished[row] = "length"
            rows = [row for row, token in zip(rows, chosen) if row not in finished and position < len(self.drafts[row])
                    and token == self.drafts[row][position] and finite[row][position]]
            if not rows:
                break
        for row, tokens in enumerate(picked):  # the drafts taken are in the KV cache: the last token picked is not
            self.positions[row] += len(tokens) - 1
        metrics.ACCEPTED_DRAFT_TOKENS.inc(sum(map(len, picked)) - len(picked))
        return picked, list(finished.items())

    def _pick(self, rows: list[int], position: int) -> list[int]:
        """The token each of ``rows`` picks from its logits at ``position`` (its constraint advanced by it)."""
        index = torch.tensor(rows, device=self.logits.device)
        logits = self.logits[index, position]  # [R, V]
        constraints = [self.pendings[row].work.constraint for row in rows]
        chosen = self.sampler(constrain(logits, constraints), [len(self.tokens[row]) for row in rows], index).tolist()
        advance(constraints, chosen, logits)
        return chosen

    def publish(self, picked: list[list[int]], finished: dict[int, str], ends_text: Callable[[object, int], bool]
                ) -> None:
        """Hand each listened-to row the tokens this step picked (``picked``), with their log-probabilities if it
        asked (from the logits they were picked from); an end-of-text token that ends its row, as ``finished`` and
        ``ends_text`` say, is marked so (``SampledToken.ends_text``: no output text). A listener that raises has its
        request abandoned."""
        now = time.perf_counter()
        for position in range(max(map(len, picked), default=0)):
            rows = [row for row, pending in enumerate(self.pendings) if pending.on_token is not None
                    and position < len(picked[row]) and not pending.future.abandoned]
            tokens = [tokens[position] if position < len(tokens) else 0 for tokens in picked]
            tops = [self.pendings[row].work.logprobs if row in rows else None for row in range(len(self))]
            logprobs = token_logprobs(self.logits[:, position], tokens, tops)
            for row in rows:
                pending = self.pendings[row]
                ending = (position == len(picked[row]) - 1 and finished.get(row) == "stop"
                          and ends_text(pending.work, tokens[row]))
                try:
                    pending.on_token(SampledToken(tokens[row], now, *logprobs.get(row, (None, ())), ends_text=ending))
                except Exception:
                    log.exception("a token listener failed; its request is abandoned")
                    pending.future.abandoned = True

    def keep(self, rows: list[int]) -> torch.Tensor:
        """Keep only ``rows`` (in this order), dropping the others' cache and state; returns their index tensor."""
        index = torch.tensor(rows, dtype=torch.long, device=self.decoder.device)
        if rows != list(range(len(rows))):  # rows that stay in place need no copy
            self.decoder.cache.keep(index, self.columns_written())
        self.logits = self.logits[index]
        self.sampler.select_rows(index)
        for name in ("pendings", "positions", "limits", "tokens", "first_token_at", "drafts"):
            values = getattr(self, name)
            setattr(self, name, [values[row] for row in rows])
        return index

    def forward(self, last: list[int]) -> None:
        """One decoding step: feed each row its last token (``last``) and its drafts, keep the logits after each."""
        most = min(self.draft_tokens, MOST_FED // len(last) - 1)
        if most > 0:  # the padding of a step's linear layers holds more drafts at no cost
            most = self.decoder.widest(len(last), 1 + most) - 1
        self.drafts = [self._draft(row, token, most) for row, token in enumerate(last)]
        metrics.DRAFT_TOKENS.inc(sum(map(len, self.drafts)))
        self.logits = self.decoder([[token, *draft] for token, draft in zip(last, self.drafts)], self.positions)
        self.positions = [position + 1 for position in self.positions]

    def _draft(self, row: int, last: int, most: int) -> list[int]:
        """The draft tokens to feed row ``row`` after its last token ``last`` (``drafts.lookup`` in its prompt and
        output): at most ``most``, and no more than it may still generate after the token the step picks."""
        most = min(most, self.limits[row] - len(self.tokens[row]) - 1)
        if most <= 0:
            return []
        return lookup(np.array([*self.pendings[row].work.prompt_ids, *self.tokens[row]]), most)

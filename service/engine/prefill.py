"""Prefill: prompts run through the model together, left-padded, whole or a chunk of columns at a time.

Requests that join a running batch have their prompts run between two of its decoding steps; run whole,
long prompts would hold the running rows for many steps' worth of work. A ``Prefill`` can instead
advance by a budget of prompt tokens per pause, keeping the columns run so far in a ``DynamicCache``.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from service.model.base_model import cache_keyword


class Prefill:
    """Left-padded prompts [rows, width] and how far they have run; ``logits`` [rows, vocab] once finished."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int, device: torch.device):
        self.model = model
        width = max(len(prompt) for prompt in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        self.done = 0  # columns run so far
        self.logits: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    @property
    def finished(self) -> bool:
        return self.done == self.width

    def advance(self, budget: int = 0) -> None:
        """Run the next columns: as many as ``budget`` tokens over all rows allow (at least one), or all (0)."""
        columns = max(1, budget // len(self.ids)) if budget else self.width
        start, end = self.done, min(self.width, self.done + columns)
        out = self.model(input_ids=self.ids[:, start:end], attention_mask=self.mask[:, :end],
                         position_ids=self.positions[:, start:end], **{cache_keyword(self.model): self.cache},
                         use_cache=True, logits_to_keep=1)
        self.done = end
        if self.finished:
            self.logits = out.logits[:, -1].float()

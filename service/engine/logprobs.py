"""Log-probabilities of the tokens a decoding step picked, for the rows that ask, from the step's raw logits.

They are the model's own distribution: log_softmax of the logits the step computed, in float32, before any
temperature, top-k or top-p (what vLLM calls raw logprobs), so they do not depend on how a row samples.
"""
from __future__ import annotations

import torch

MOST_TOP_LOGPROBS = 20  # the most alternatives a row may ask for (OpenAI's chat top_logprobs bound)

# per row asking: (the chosen token's logprob, ((token id, logprob) of the k most likely, most likely first))
RowLogprobs = tuple[float, tuple[tuple[int, float], ...]]


def token_logprobs(logits: torch.Tensor, chosen: list[int], tops: list[int | None]) -> dict[int, RowLogprobs]:
    """For every row whose ``tops`` entry k is not None: the natural log-probability of its ``chosen`` token and the
    (token id, log-probability) of its k most likely tokens, most likely first.

    ``logits`` [B, V] (any float dtype: computed in float32); ``chosen`` [B] token ids; ``tops`` [B], each None or
    0 <= k <= MOST_TOP_LOGPROBS. Rows that ask nothing cost nothing, and neither does a step where none asks. Returns
    {row: RowLogprobs}. Raises ValueError for k outside [0, MOST_TOP_LOGPROBS]."""
    rows = [row for row, top in enumerate(tops) if top is not None]
    if not rows:
        return {}
    most = max(tops[row] for row in rows)
    if not 0 <= min(tops[row] for row in rows) <= most <= MOST_TOP_LOGPROBS:
        raise ValueError(f"top logprobs must be in [0, {MOST_TOP_LOGPROBS}], not {[tops[row] for row in rows]}")
    index = torch.tensor(rows, device=logits.device)
    logprobs = logits[index].float().log_softmax(dim=-1)  # [R, V]
    picked = torch.tensor([chosen[row] for row in rows], device=logits.device)
    chosen_logprobs = logprobs.gather(-1, picked[:, None])[:, 0].tolist()
    values, ids = logprobs.topk(most, dim=-1)  # [R, most]
    values, ids = values.tolist(), ids.tolist()
    return {row: (chosen_logprobs[i], tuple(zip(ids[i][:tops[row]], values[i][:tops[row]])))
            for i, row in enumerate(rows)}

"""Label probabilities: the softmax with a temperature, and the scoring of a request's own labels over their whole
tokenization.

The default NLI labels are scored as the adapter was trained and documented: by the first token of each label's
completion, in one forward pass (exact as a choice among three labels whose first tokens differ, but not the same as
scoring whole labels). Custom labels are scored by log P(label completion | prompt), the sum over the label's tokens
of each token's log-probability given the prompt and the label's tokens before it (the chain rule), so labels that
share a first token (``not sure``, ``not likely``) are told apart. The completions form a trie: each distinct proper
prefix of them (the empty one included) is one scoring request, prompt + prefix, whose candidates are the tokens that
follow that prefix in some label; the prefix cache shares the prompt's keys and values among those requests.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from service.tasks.prompts import encode_text, label_target

MOST_LABELS = 16  # candidate labels of one request, at most
MOST_LABEL_CHARACTERS = 64  # characters of one label, at most
MOST_LABEL_TOKENS = 16  # tokens of one label's completion, at most

Prefix = tuple[int, ...]


def softmax(scores: Sequence[float], temperature: float = 1.0) -> list[float]:
    """softmax(scores / temperature) [len(scores)]: exp((s_i - max s) / T) / sum_j exp((s_j - max s) / T), which sums
    to 1 (the maximum subtracted first, so nothing overflows). ``temperature`` > 0; an infinitely negative score (a
    token the model rules out) gets 0."""
    top = max(scores)
    weights = [math.exp((score - top) / temperature) for score in scores]
    total = sum(weights)
    return [weight / total for weight in weights]


def label_ids(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str]) -> list[list[int]]:
    """The token ids of each label's completion after the NLI prompt (``label_target``: a space, then the label),
    encoded as plain text. Raises ValueError when a label's completion has more than ``MOST_LABEL_TOKENS`` tokens or
    two labels have the same tokens (they could not be told apart)."""
    sequences = [encode_text(tokenizer, label_target(label)) for label in labels]
    for label, ids in zip(labels, sequences):
        if len(ids) > MOST_LABEL_TOKENS:
            raise ValueError(f"label {label[:MOST_LABEL_CHARACTERS]!r} has {len(ids)} tokens; at most "
                             f"{MOST_LABEL_TOKENS} are scored")
    if len({tuple(ids) for ids in sequences}) != len(sequences):
        raise ValueError("two labels have the same tokens, so they cannot be told apart")
    return sequences


def prefix_candidates(sequences: Sequence[Sequence[int]]) -> dict[Prefix, list[int]]:
    """Each distinct proper prefix of ``sequences`` (the inner nodes of their trie, the empty prefix first) -> the
    distinct tokens that follow it in some sequence, in ascending order."""
    followers: dict[Prefix, set[int]] = {}
    for ids in sequences:
        for end in range(len(ids)):
            followers.setdefault(tuple(ids[:end]), set()).add(ids[end])
    return {prefix: sorted(tokens) for prefix, tokens in followers.items()}


def sequence_logprobs(sequences: Sequence[Sequence[int]], candidates: dict[Prefix, list[int]],
                      logprobs: dict[Prefix, list[float]]) -> list[float]:
    """log P(sequence | prompt) for each of ``sequences``: the sum over its tokens t_i of log P(t_i | prompt, t_<i),
    read from ``logprobs`` (prefix -> the log-probabilities of ``candidates[prefix]``, in that order)."""
    return [sum(logprobs[tuple(ids[:end])][candidates[tuple(ids[:end])].index(ids[end])] for end in range(len(ids)))
            for ids in sequences]

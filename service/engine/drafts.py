"""Draft tokens for speculative decoding, looked up in the generation's own tokens (prompt lookup decoding).

A decoding step may feed a row its last token followed by a guess at the tokens after it; the step's logits at every
fed position are then the model's next-token distributions after each guessed token, and the row takes as many tokens
as its own strategy picks in agreement with the guess (``RunningBatch.sample``), so the tokens are those one step per
token would pick. On the CPU a step costs about as much for a few tokens per row as for one (it reads the weights
once either way), so an answer copied from its context takes one step instead of one per token.

The guess: the tokens that followed an earlier occurrence of the generation's last tokens in its prompt and its
output so far (A. Saxena, "Prompt Lookup Decoding", 2023, github.com/apoorvumang/prompt-lookup-decoding; vLLM's
``NgramProposer``, ``vllm/v1/spec_decode/ngram_proposer.py``, whose rule this is: the longest suffix of at most
``LONGEST_NGRAM`` tokens, then shorter ones down to one, matched at its first occurrence).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

LONGEST_NGRAM = 3  # vLLM's prompt_lookup_max as its docs show it


def lookup(tokens: np.ndarray, most: int) -> list[int]:
    """Up to ``most`` tokens that followed the first earlier occurrence of the last n tokens of ``tokens`` ([T] ints,
    the prompt then the output so far), for the largest n <= ``LONGEST_NGRAM`` that occurs earlier; [] where none does
    (or ``most`` is 0)."""
    for n in range(min(LONGEST_NGRAM, len(tokens) - 1), 0, -1):
        windows = sliding_window_view(tokens[:-1], n)  # [T - n, n]: every earlier run of n tokens
        found = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if len(found):
            start = int(found[0]) + n
            return tokens[start: start + most].tolist()
    return []

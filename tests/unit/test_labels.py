"""Scoring labels over their whole tokenization (service/tasks/labels.py): the trie of the labels' completions, the
chain rule over it, and the softmax with a temperature, against hand-computed cases."""
from __future__ import annotations

import math

import pytest
from transformers import AutoTokenizer

from service.tasks.labels import MOST_LABEL_TOKENS, label_ids, prefix_candidates, sequence_logprobs, softmax
from service.tasks.prompts import encode_text


def test_prefix_candidates_are_the_inner_nodes_of_the_labels_trie():
    sequences = [[7, 2], [7, 3, 9], [4]]
    assert prefix_candidates(sequences) == {(): [4, 7], (7,): [2, 3], (7, 3): [9]}
    assert next(iter(prefix_candidates(sequences))) == ()  # the prompt alone comes first


def test_sequence_logprobs_sum_each_tokens_logprob_given_the_tokens_before_it():
    sequences = [[7, 2], [7, 3, 9], [4]]
    candidates = prefix_candidates(sequences)
    logprobs = {(): [-1.5, -0.25], (7,): [-2.0, -0.5], (7, 3): [-0.125]}  # in the order of candidates[prefix]
    # [7, 2]: log P(7) + log P(2 | 7) = -0.25 - 2.0; [7, 3, 9]: -0.25 - 0.5 - 0.125; [4]: -1.5
    assert sequence_logprobs(sequences, candidates, logprobs) == [-2.25, -0.875, -1.5]


def test_softmax_with_a_temperature_by_hand():
    # softmax([0, ln 2, ln 4] / 2) = [1, sqrt 2, 2] / (3 + sqrt 2)
    got = softmax([0.0, math.log(2), math.log(4)], temperature=2.0)
    assert got == pytest.approx([w / (3 + math.sqrt(2)) for w in (1, math.sqrt(2), 2)])
    assert softmax([1000.0, 999.0]) == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.e)])  # no overflow
    assert softmax([0.0, -math.inf]) == [1.0, 0.0]


def test_label_ids_refuse_labels_too_long_to_score(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert label_ids(tokenizer, ["yes", "not sure"]) == [encode_text(tokenizer, " yes"),
                                                         encode_text(tokenizer, " not sure")]
    long = "\u3041" * (MOST_LABEL_TOKENS // 3 + 1)  # 3 UTF-8 bytes each, at least one byte-level token per byte
    assert len(encode_text(tokenizer, " " + long)) > MOST_LABEL_TOKENS
    with pytest.raises(ValueError, match="tokens"):
        label_ids(tokenizer, ["yes", long])

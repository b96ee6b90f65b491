"""Legacy completions' logprobs name each token, and key ``top_logprobs`` by name: tokens that hold part of a UTF-8
character (their text alone U+FFFD) are named by their bytes, so that none collapses into another's entry."""
from __future__ import annotations

from service.http.openai_replies import completion_logprobs
from service.tasks.streaming import TokenLogprob, TopLogprob

PARTS = [(0xE2, 0x80), (0xE2, 0x81), (0x9C,), (0xF0, 0x9F, 0x98)]  # parts of characters (U+2019, U+2041, ..., an emoji)


def test_tokens_holding_part_of_a_character_keep_an_entry_each():
    tops = (*[TopLogprob("\ufffd", i, -1.0 - i, part) for i, part in enumerate(PARTS)],
            TopLogprob("\ufffd", 9, -6.0, (0xEF, 0xBF, 0xBD)),  # the character U+FFFD itself: named by its text
            TopLogprob("<|im_end|>", 10, -7.0, None), TopLogprob(" the", 11, -8.0, (0x20, 0x74, 0x68, 0x65)))
    chosen = TokenLogprob("\ufffd", 2, -3.0, PARTS[2], tops, text_offset=0)
    logprobs = completion_logprobs([chosen])
    assert logprobs["tokens"] == ["bytes:\\x9c"]
    assert logprobs["top_logprobs"] == [{"bytes:\\xe2\\x80": -1.0, "bytes:\\xe2\\x81": -2.0, "bytes:\\x9c": -3.0,
                                         "bytes:\\xf0\\x9f\\x98": -4.0, "\ufffd": -6.0, "<|im_end|>": -7.0,
                                         " the": -8.0}]
    assert len(logprobs["top_logprobs"][0]) == len(tops)  # every one of the k, the chosen among them


def test_a_chosen_token_outside_the_top_adds_its_own_entry():
    tops = (TopLogprob("\ufffd", 0, -0.5, PARTS[0]), TopLogprob("\ufffd", 1, -1.0, PARTS[1]))
    logprobs = completion_logprobs([TokenLogprob("\ufffd", 3, -5.0, PARTS[3], tops, text_offset=4)])
    assert logprobs["top_logprobs"] == [{"bytes:\\xe2\\x80": -0.5, "bytes:\\xe2\\x81": -1.0,
                                         "bytes:\\xf0\\x9f\\x98": -5.0}]
    assert logprobs["text_offset"] == [4] and logprobs["token_logprobs"] == [-5.0]

"""The tasks' text handling: answer offsets in the context as given, and user text encoded as plain text."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from service.tasks.prompts import encode_text, nli_prompt
from service.tasks.spans import caseless, locate

TURKISH = "İSTANBUL AND İZMİR ARE BIG CITIES. THE CAPITAL OF TURKEY IS ANKARA."
# characters whose case folding changes the length of the text before an answer, or inside it
LONGER_FOLDED = "İßﬁŉǰΐẞﬀ"


def assert_span(context: str, answer: str) -> tuple[str, int | None, int | None]:
    """``locate``'s result, checked: offsets index ``context`` itself and cut out exactly the span returned."""
    span, start, end = locate(answer, context)
    if start is not None:
        assert 0 <= start < end <= len(context) and context[start:end] == span, (context, answer, start, end)
    return span, start, end


@pytest.mark.parametrize("answer,expected", [("ankara", "ANKARA"), ("Ankara.", "ANKARA."), ("big cities", "BIG CITIES"),
                                             ("ANKARA", "ANKARA"), ("i̇zmi̇r", "İZMİR")])
def test_offsets_after_characters_whose_case_folding_is_longer(answer, expected):
    span, start, end = assert_span(TURKISH, answer)
    assert span == expected and TURKISH[start:end] == expected


@pytest.mark.parametrize("prefix", [*LONGER_FOLDED, LONGER_FOLDED])
@pytest.mark.parametrize("answer", ["the Capital", "STRASSE", "straße", "finale"])
def test_offsets_after_and_inside_longer_folding_text(prefix, answer):
    context = f"{prefix} {prefix} The capital is in the Straße, said the ﬁnale. {prefix}"
    span, start, _ = assert_span(context, answer)
    assert start is not None and span.casefold() == answer.casefold()


def test_an_answer_not_in_the_context_has_no_offsets():
    assert locate("Paris", TURKISH) == ("Paris", None, None)
    assert locate("  ", TURKISH) == ("", None, None)


def test_caseless_maps_every_folded_character_to_its_source():
    folded, origins = caseless("aİß")
    assert folded == "ai̇ss" and origins == [0, 1, 1, 2, 2]


@given(st.text(min_size=1, max_size=40), st.integers(0, 40), st.integers(1, 12),
       st.sampled_from([str.upper, str.lower, str.casefold, str.swapcase, str.title, lambda text: text]))
def test_any_found_span_is_cut_from_the_context_as_given(context, at, length, change_case):
    """Any context and any case change of any piece of it: offsets, when given, index the context exactly."""
    piece = context[at:at + length]
    _, start, _ = assert_span(context, change_case(piece))
    if piece.strip() and context.find(piece.strip()) >= 0 and change_case(piece) == piece:
        assert start == context.find(piece.strip())


def test_user_text_that_spells_a_special_token_is_encoded_as_plain_text(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    special = tokenizer.eos_token
    prompt = nli_prompt(f"A dog {special} runs.", f"{special}An animal")
    plain = encode_text(tokenizer, prompt)
    assert tokenizer.eos_token_id not in plain
    assert tokenizer.decode(plain) == prompt
    assert tokenizer.eos_token_id in tokenizer.encode(prompt, add_special_tokens=False)  # what it was before

"""Prompt building for any text a user sends (hypothesis): unicode of every plane, control characters, right-to-left
scripts and marks, and text that spells the template's own markers or a special token. The template changes nothing
of a field but the whitespace around it; the model is shown exactly the prompt, as text (adapter style); in the chat
styles only the chat template writes control tokens."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from service.tasks.prompt_styles import ADAPTER_STYLE, PROMPT_STYLES, answer_ids, nli_ids
from service.tasks.prompts import NLI_LABELS, answer_prompt, encode_text, nli_prompt
from tests.tiny_models import EOS

# pieces a user's text is drawn from besides arbitrary unicode: the template's markers, a special token spelled out,
# right-to-left text and marks (U+202E overrides the direction, U+200F is a mark), control characters, line breaks
PIECES = ("\nAnswer:", "\nQuestion: ", "Context: ", "\nRelation:", EOS, "<|im_end|>", "שלום עולם", "مرحبا",
          "\u202eabc\u202c", "\u200f", "\x00", "\x1b[0m", "\r\n", "\u2028", "\t", " ")
FIELD = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(PIECES)), max_size=6).map("".join)
BOUNDED = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@BOUNDED
@given(first=FIELD, second=FIELD, padding=st.sampled_from(["", " ", "\n", "\t \u3000"]))
def test_a_prompt_is_its_fields_verbatim_in_the_template_less_the_whitespace_around_them(first, second, padding):
    for build, head, middle, tail in [(answer_prompt, "Context: ", "\nQuestion: ", "\nAnswer:"),
                                      (nli_prompt, "Premise: ", "\nHypothesis: ", "\nRelation:")]:
        prompt = build(first, second)
        assert prompt.startswith(head + first.strip()) and prompt.endswith(second.strip() + tail)
        assert len(prompt) == len(head + middle + tail) + len(first.strip()) + len(second.strip())
        assert build(padding + first + padding, padding + second) == prompt


@BOUNDED
@given(first=FIELD, second=FIELD)
def test_the_model_is_shown_exactly_the_prompt_as_text(tokenizer, first, second):
    """Adapter style: the tokens decode to the prompt, character for character, and none is a special token, whatever
    the fields spell."""
    for prompt in (answer_prompt(first, second), nli_prompt(first, second)):
        ids = encode_text(tokenizer, prompt)
        assert tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == prompt
        assert not set(ids) & set(tokenizer.all_special_ids)


@BOUNDED
@given(first=FIELD, second=FIELD, style=st.sampled_from([s for s in PROMPT_STYLES if s != ADAPTER_STYLE]))
def test_in_the_chat_styles_only_the_template_writes_control_tokens(tokenizer, first, second, style):
    """As many special tokens as with fields that spell none: the chat template's own."""
    def specials(ids: list[int]) -> list[int]:
        return [i for i in ids if i in tokenizer.all_special_ids]

    assert specials(answer_ids(tokenizer, style, first, second)) == specials(answer_ids(tokenizer, style, "c", "q"))
    assert specials(nli_ids(tokenizer, style, first, second, NLI_LABELS)) == \
        specials(nli_ids(tokenizer, style, "p", "h", NLI_LABELS))

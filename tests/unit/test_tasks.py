"""The tasks' text handling: free answers' offsets in the context as given, and user text encoded as plain text."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from service.tasks.prompts import encode_text, nli_prompt
from service.tasks.tasks import exact_span


@given(st.text(min_size=1, max_size=40), st.integers(0, 40), st.integers(0, 12))
def test_a_free_answers_offsets_are_its_first_exact_occurrence(context, at, length):
    """Non-extractive answers: offsets where the model's text occurs exactly as it is (any text), else none."""
    piece = context[at:at + length]
    span = exact_span(piece, context)
    if not piece:
        assert span is None
    else:
        assert span is not None and context[span[0]:span[1]] == piece and span[0] == context.find(piece)


def test_user_text_that_spells_a_special_token_is_encoded_as_plain_text(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    special = tokenizer.eos_token
    prompt = nli_prompt(f"A dog {special} runs.", f"{special}An animal")
    plain = encode_text(tokenizer, prompt)
    assert tokenizer.eos_token_id not in plain
    assert tokenizer.decode(plain) == prompt
    assert tokenizer.eos_token_id in tokenizer.encode(prompt, add_special_tokens=False)  # what it was before

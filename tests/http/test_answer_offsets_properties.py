"""/answer's offsets for any context (hypothesis), on a tiny Llama server whose prompts hold 128 tokens, so that long
contexts go in windows: unicode of every plane, right-to-left text and marks, control characters, text that spells a
special token, blank and empty contexts, contexts of one window, of several, and past the windows cap. An extractive
answer is always a non-empty span at its first occurrence, ``context[start:end] == answer``; a free one has those
offsets or none; a blank context is a 422, one past the windows cap a 413, and nothing else is refused."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.tasks.prompts import answer_prompt, encode_text
from tests.server_helpers import ready_client, settings_in

# pieces a context is drawn from besides arbitrary unicode: right-to-left text and marks (U+202E overrides the
# direction), control characters, line breaks (which end answers), a special token spelled out, words
PIECES = ("שלום עולם. ", "مرحبا بالعالم ", "\u202eabc\u202c", "\u200f", "\x00", "\x07", "\x1b[0m", "\r\n", "\n",
          "\u2028", "\t", "<|endoftext|>", "Denver Broncos ", "in 2015, ", "日本語 ", "𝄞 ")
WORDS = ("Denver", "2015", "שלום", "مرحبا", "日本", "\x07", "\u202e")  # not blank, and so neither is a text holding one
TEXT = st.lists(st.one_of(st.text(max_size=10), st.sampled_from(PIECES)), max_size=6).map("".join)
CONTEXT = st.tuples(TEXT, st.sampled_from(WORDS), TEXT).map("".join)
QUESTION = st.one_of(st.sampled_from(["Who won?", "מי ניצח?", "متى؟", "When<|endoftext|>?", "\u202eWho\u202c?"]),
                     st.text(min_size=1, max_size=8).filter(str.strip))
BLANK = st.text(" \t\n\r\u3000\u2028", max_size=5)
PROMPT_TOKENS, STRIDE, WINDOWS_CAP = 128, 16, 4


@pytest.fixture(scope="module")
def client(tiny_llama_dir, llama_adapters, tmp_path_factory):
    """Short prompts, so that long contexts go in windows, and few windows; /answer defaults to adapter one."""
    settings = settings_in(tmp_path_factory.mktemp("offsets"), tiny_llama_dir, llama_adapters, qa_adapter="one",
                           max_input_tokens=PROMPT_TOKENS, answer_stride=STRIDE, max_answer_windows=WINDOWS_CAP)
    with ready_client(settings) as client:
        yield client


def answered(client, context: str, question: str, extractive: bool) -> tuple[int, dict]:
    reply = client.post("/answer", json={"context": context, "question": question, "extractive": extractive,
                                         "decoding": {"strategy": "greedy"}})
    return reply.status_code, reply.json()


def fits_one_prompt(client, context: str, question: str) -> bool:
    tasks = client.app.state.runtime.tasks
    return len(encode_text(tasks.tokenizer, answer_prompt(context, question))) <= tasks.max_prompt


@settings(max_examples=40, deadline=None)
@given(context=CONTEXT, question=QUESTION, repeat=st.sampled_from([1, 1, 4, 12, 40]), extractive=st.booleans())
def test_an_answer_is_its_span_of_the_context_or_the_context_is_too_long(client, context, question, repeat,
                                                                        extractive):
    context = context * repeat  # 4 or 12 copies are often several windows, 40 often past the cap
    status, reply = answered(client, context, question, extractive)
    if not fits_one_prompt(client, context, question) and (status == 413 or not extractive):
        assert status == 413 and "at most" in reply["error"], reply  # a free answer has one prompt, no windows
        return
    assert status == 200, reply
    answer, start, end = reply["answer"], reply["start"], reply["end"]
    assert "\n" not in answer
    if extractive:
        assert answer and context[start:end] == answer and start == context.find(answer)
        assert reply["score"] <= 0
    else:
        assert (start, end) == (None, None) or (context[start:end] == answer and start == context.find(answer))


@settings(max_examples=10, deadline=None)
@given(context=BLANK, question=QUESTION)
def test_a_blank_or_empty_context_is_a_422_naming_it(client, context, question):
    status, reply = answered(client, context, question, extractive=True)
    assert status == 422 and reply["detail"][0]["loc"] == ["body", "context"], reply

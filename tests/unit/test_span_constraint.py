"""The span constraint: against a brute-force reference on a real tokenizer for any text (hypothesis), and on a
hand-made vocabulary for its edges: characters cut by the token budget, repeated and overlapping spans, whitespace,
newlines, contexts nothing can begin an answer in, and vocabularies whose bytes are unknown."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from service.errors import NoSpan
from service.tasks.span_constraint import SpanConstraint, SpanVocabulary, answer_vocabulary
from service.tasks.token_bytes import sentencepiece_bytes, token_bytes
from tests.span_reference import BruteForceSpans

EOS, NEWLINE = 0, 1
PIECES = [None, b"\n", b"caf", b"\xc3", b"\xa9", b" au", b" lait", b"ab", b"a", b"b", b" ", b"x\ny", b"  "]


def constraint(context: str, budget: int = 8) -> SpanConstraint:
    return SpanConstraint(context, SpanVocabulary(PIECES, [EOS, NEWLINE]), budget)


def taken(context: str, pieces: list[bytes], budget: int = 8) -> SpanConstraint:
    """The constraint after the tokens spelled ``pieces``, each checked to be allowed first."""
    state = constraint(context, budget)
    for piece in pieces:
        token = PIECES.index(piece)
        assert token in state.allowed().tolist(), (piece, context)
        state.advance(token, -1.0)
    return state


def test_a_character_cut_by_the_token_budget_is_completed_from_the_context():
    state = taken("un café au lait", [b"caf", b"\xc3"])
    assert EOS not in state.allowed().tolist()  # inside a character: the answer cannot end there
    assert state.span() == (3, 7)  # "café"
    assert taken("un é", [b"\xc3"]).span() == (3, 4)  # never empty
    state.advance(PIECES.index(b"\xa9"), -1.0)
    assert EOS in state.allowed().tolist() and state.span() == (3, 7)  # "café"


def test_a_repeated_span_is_given_at_its_first_occurrence_and_overlaps_are_followed():
    state = taken("xaaab aab", [b"a", b"a", b"b"])  # "aab" ends only at offset 5 of the first "aaab"
    assert state.ends == {5, 9} and state.span() == (2, 5)


def test_an_answer_lies_inside_unless_every_occurrence_runs_to_a_cut_edge():
    """A window cut out of a longer context ends in "caf" (of "café"): an answer running to that edge may be cut short
    (``Tasks.answer`` prefers one that is not); a cut at the other edge, or none, leaves it whole."""
    assert not taken("un caf", [b"caf"]).lies_inside(cut_before=False, cut_after=True)
    assert taken("un caf", [b"caf"]).lies_inside(cut_before=True, cut_after=False)
    assert taken("un caf  ", [b"caf"]).lies_inside(False, False)
    assert not taken("un caf  ", [b"caf"]).lies_inside(False, True)  # only whitespace after it: still the edge
    assert not taken(" ab x", [b"ab"]).lies_inside(True, False)  # only whitespace before it
    assert taken("ab caf ab x", [b"ab"]).lies_inside(True, True)  # its second occurrence lies inside: "ab" is whole
    assert not taken("ab caf ab", [b"ab"]).lies_inside(True, True)  # each runs to an edge
    assert taken("ab caf", [b"caf"]).lies_inside(True, False) and not taken("ab caf", [b"caf"]).lies_inside(True, True)
    assert not constraint("un caf").lies_inside(False, False)  # no answer yet


def test_the_first_token_matches_without_its_leading_whitespace_and_trailing_whitespace_is_dropped():
    assert PIECES.index(b" au") in constraint("au lait").allowed().tolist()
    state = taken("au lait", [b" au", b" "])
    assert state.span() == (0, 2)  # "au", not "au "


@pytest.mark.parametrize("blank", [b" ", b"  "])
def test_one_token_of_whitespace_may_lead_the_answer_in_when_the_budget_leaves_room_after_it(blank):
    """SmolLM2 writes " 2015" as " " then digits: forbidding the lone space changed such answers."""
    state = taken("x au lait", [blank], budget=2)
    after = state.allowed().tolist()
    assert PIECES.index(b" ") not in after and PIECES.index(b"  ") not in after  # one only
    assert EOS not in after and NEWLINE not in after and PIECES.index(b" au") in after  # nothing ends it yet
    state.advance(PIECES.index(b" au"), -1.0)
    assert state.span() == (2, 4) and state.score() == -1.0  # "au"; the lead-in counts in the score
    assert PIECES.index(blank) not in constraint("au lait", budget=1).allowed().tolist()  # it would leave nothing


def test_newlines_end_answers_and_never_spell_them():
    state = constraint("x\ny ab")
    first = state.allowed().tolist()
    assert PIECES.index(b"x\ny") not in first and NEWLINE not in first and EOS not in first
    state.advance(PIECES.index(b"ab"), -1.0)
    assert {EOS, NEWLINE} <= set(state.allowed().tolist())


@pytest.mark.parametrize("context", [" ", "\n\t ", "\n"])
def test_a_context_of_nothing_but_whitespace_has_no_span(context):
    with pytest.raises(NoSpan):
        constraint(context)


def test_a_vocabulary_spelled_neither_byte_level_nor_sentencepiece_is_refused():
    words = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    with pytest.raises(NoSpan):
        answer_vocabulary(tokenizer, [2])


def test_sentencepiece_pieces_are_read_as_their_bytes():
    assert [sentencepiece_bytes(p) for p in ("\u2581the", "<0xC3>", "<0x0A>", "é")] == [b" the", b"\xc3", b"\n",
                                                                                        "é".encode()]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_the_tiny_tokenizers_bytes_are_what_it_decodes(tokenizer):
    pieces = token_bytes(tokenizer)
    assert pieces[tokenizer.eos_token_id] is None
    for token in range(len(tokenizer)):
        if pieces[token] is not None and all(byte < 0x80 for byte in pieces[token]):
            assert pieces[token].decode() == tokenizer.decode([token]), token


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(context=st.text(min_size=1, max_size=60).filter(str.strip), seed=st.integers(0, 2**16),
       budget=st.integers(1, 8))
def test_every_step_allows_exactly_what_brute_force_allows(tokenizer, context, seed, budget):
    """Random walks through the allowed tokens of any text (unicode, control characters, right to left, empty
    lines) within any token budget: at each step the constraint allows what trying every token against the context
    allows."""
    reference = BruteForceSpans(tokenizer, context, {tokenizer.eos_token_id}, budget)
    state = SpanConstraint(context, answer_vocabulary(tokenizer, [tokenizer.eos_token_id]), budget)
    generator, generated = random.Random(seed), []
    for _ in range(budget):
        allowed = state.allowed().tolist()
        assert allowed == reference.allowed(reference.bytes_of(generated)), generated
        token = generator.choice(allowed)
        if token in reference.ends:
            break
        state.advance(token, -1.0)
        generated.append(token)
    start, end = state.span()
    answer = reference.span(reference.bytes_of(generated))
    assert context[start:end] == answer and answer and context.find(answer) == start

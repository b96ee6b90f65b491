"""A choice's text as its tokens arrive (service.tasks.streaming.ChoiceText) on the tiny byte-level BPE tokenizer:
deltas never split a character nor revise what was handed out, stop strings are met across token and delta
boundaries, and only what could still start a stop string is held back. Also the engine-to-asyncio token feed."""
from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from service.engine.requests import SampledToken
from service.engine.token_feed import TokenFeed
from service.model.base_model import resolve_base_dir
from service.settings import Settings
from service.tasks import streaming
from service.tasks.streaming import ChoiceDelta, ChoiceText
from service.tasks.token_bytes import piece_bytes

# characters of 1 to 4 UTF-8 bytes; the tiny tokenizer (trained on English text) splits the multi-byte ones into bytes
MIXED = "Café ☃ 日本 naïve 𝄞 x"
ALPHABET = "ab é☃\n.𝄞"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = (), finish: str = "length", ending: int | None = None
           ) -> tuple[list[ChoiceDelta], ChoiceText]:
    """The deltas of a choice whose tokens are ``ids`` (each with logprob -position), then the end-of-text token
    ``ending`` that ends it (if not None: as the engine hands it out, ``SampledToken.ends_text``), then the engine's
    ``finish``; as the stream does, tokens after the choice ended at a stop string are ignored."""
    choice = ChoiceText(0, tokenizer, stop, logprobs=True)
    sampled = [SampledToken(token, 0.0, -float(at)) for at, token in enumerate(ids)]
    sampled += [SampledToken(ending, 0.0, -float(len(ids)), ends_text=True)] if ending is not None else []
    deltas = [choice.add(token) for token in sampled]
    deltas.append(choice.finish(finish, len(sampled)))
    return [delta for delta in deltas if delta is not None], choice


def joined(deltas: list[ChoiceDelta]) -> str:
    return "".join(delta.text for delta in deltas)


def test_a_character_split_over_tokens_is_never_split_in_a_delta(tokenizer):
    ids = encode(tokenizer, MIXED)
    naive = [tokenizer.decode([token]) for token in ids]
    assert sum("\ufffd" in piece for piece in naive) >= 6, "the tokenizer keeps the multi-byte characters whole"
    deltas, _ = stream(tokenizer, ids)
    assert joined(deltas) == MIXED
    assert not any("\ufffd" in delta.text for delta in deltas), [delta.text for delta in deltas]
    assert [delta.finish_reason for delta in deltas] == [None] * (len(deltas) - 1) + ["length"]
    offsets = [entry.text_offset for delta in deltas for entry in delta.logprobs]
    assert len(offsets) == len(ids) and offsets == sorted(offsets)
    for delta in deltas[:-1]:  # each delta's tokens start in it: the first at the delta's own start
        assert delta.logprobs and MIXED[delta.logprobs[0].text_offset:].startswith(delta.text)


def test_each_token_carries_its_own_bytes_those_of_part_of_a_character_included(tokenizer):
    """OpenAI's chat logprobs give each token's bytes, so that a client can join the pieces of a split character;
    they were null for those (their text alone is U+FFFD)."""
    ids = encode(tokenizer, MIXED)
    deltas, _ = stream(tokenizer, ids)
    entries = [entry for delta in deltas for entry in delta.logprobs]
    assert sum("\ufffd" in entry.token for entry in entries) >= 6
    assert b"".join(bytes(entry.token_bytes) for entry in entries) == MIXED.encode()


def test_an_incomplete_character_at_the_end_is_handed_out_as_a_whole_decode_gives_it(tokenizer):
    ids = encode(tokenizer, "ab日")[:-1]  # the last byte of 日 never comes
    deltas, choice = stream(tokenizer, ids)
    assert joined(deltas) == tokenizer.decode(ids) == "ab\ufffd"
    assert deltas[-1].finish_reason == "length" and len(choice.token_ids) == len(ids)


@pytest.mark.parametrize("text", [MIXED, "ab日"])
def test_the_end_of_text_token_adds_no_text_and_the_last_logprobs_entry_at_the_texts_end(tokenizer, text):
    """vLLM lists the end-of-text token that ended a choice in its logprobs (its detokenizer leaves it out of the
    text only), so that there is an entry for each token usage counts: named by its own text, special tokens kept,
    at the end of the text, with the choice's last delta. After an incomplete character too (the end of "ab日" is
    cut off), whose text is U+FFFD as a whole decode gives it."""
    ids = encode(tokenizer, text)[:-1 if text == "ab日" else None]
    eos = tokenizer.eos_token_id
    deltas, choice = stream(tokenizer, ids, finish="stop", ending=eos)
    assert joined(deltas) == tokenizer.decode(ids) and choice.token_ids == ids
    entries = [entry for delta in deltas for entry in delta.logprobs]
    assert [entry.token_id for entry in entries] == [*ids, eos] and choice.generated_tokens == len(ids) + 1
    last = entries[-1]
    assert deltas[-1].logprobs[-1] == last and deltas[-1].finish_reason == "stop"
    assert (last.token, last.token_bytes) == ("<|endoftext|>", tuple(b"<|endoftext|>"))
    assert (last.logprob, last.text_offset) == (-float(len(ids)), len(joined(deltas)))


@pytest.mark.parametrize("stop,expected", [
    (("é ☃",), "Caf"),  # starts in one token (é's two bytes), ends in another (☃'s three)
    (("ï", "日本", "☃"), "Café "),  # several: the earliest occurrence wins, whatever the order given
    (("☃", "é ☃"), "Caf"),  # both complete with ☃'s last byte: the one that starts first wins
    (("Caf",), ""),  # at the very start
    (("Café ☃ 日本 naïve 𝄞 x",), ""),  # the whole text
    (("x",), "Café ☃ 日本 naïve 𝄞 "),  # in the last token
    (("本 z", "zz"), MIXED),  # never met, though "本 " starts one
])
def test_stop_strings_across_token_boundaries(tokenizer, stop, expected):
    ids = encode(tokenizer, MIXED)
    deltas, choice = stream(tokenizer, ids, stop)
    assert (joined(deltas), deltas[-1].finish_reason) == expected_text(tokenizer, ids, stop)
    assert joined(deltas) == expected
    assert all(delta.finish_reason is None for delta in deltas[:-1])
    # an entry for each token consumed, as usage counts them and vLLM lists them: those whose text the stop string cut
    # off come with the last delta, at their offsets in the uncut text
    tokens = [entry for delta in deltas for entry in delta.logprobs]
    uncut, _ = stream(tokenizer, ids)
    assert tokens == [entry for delta in uncut for entry in delta.logprobs][:len(choice.token_ids)]
    assert all(entry.text_offset < len(expected) for delta in deltas[:-1] for entry in delta.logprobs)
    if expected != MIXED:  # the choice consumed tokens until the one that completed the stop string, and no more
        consumed = len(choice.token_ids)
        assert stop_met(tokenizer, ids[:consumed], stop) and not stop_met(tokenizer, ids[:consumed - 1], stop)


def stop_met(tokenizer, ids: list[int], stop: tuple[str, ...]) -> bool:
    return earliest_stop(decoded(tokenizer, ids), stop) is not None


def decoded(tokenizer, ids: list[int]) -> str:
    """The text of ``ids`` less an incomplete character at the end: what a stream has decoded after them."""
    return tokenizer.decode(ids).removesuffix("\ufffd")


def earliest_stop(text: str, stop: tuple[str, ...]) -> int | None:
    return min((at for at in (text.find(s) for s in stop) if at >= 0), default=None)


def expected_text(tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[str, str]:
    """(text, finish reason) as generation defines them: the text stops at the first token after which a stop string
    occurs, before the earliest one then there; with none, the whole decode and "length"."""
    for end in range(1, len(ids) + 1):
        cut = earliest_stop(decoded(tokenizer, ids[:end]), stop)
        if cut is not None:
            return decoded(tokenizer, ids[:end])[:cut], "stop"
    return tokenizer.decode(ids), "length"


def test_only_text_that_could_start_a_stop_string_is_held_back(tokenizer):
    ids = encode(tokenizer, MIXED)
    free, _ = stream(tokenizer, ids)
    unmet, _ = stream(tokenizer, ids, ("\x00", "zz"))  # no character of these occurs: nothing is held
    assert [delta.text for delta in unmet] == [delta.text for delta in free]
    held, _ = stream(tokenizer, ids, ("日本 naïve!",))  # met up to "naïve", then not: held that long, then let go
    assert joined(held) == MIXED
    ends = [len(joined(held[:k + 1])) for k in range(len(held))]
    start, mismatch = MIXED.index("日"), MIXED.index("naïve") + len("naïve ")  # the space is no "!"
    assert start in ends and not any(start < end < mismatch for end in ends), ends


@settings(max_examples=150, deadline=None)
@given(st.text(ALPHABET, min_size=1, max_size=30), st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=4),
       st.data())
def test_any_text_and_stop_strings_give_the_text_up_to_the_earliest_stop(tokenizer, text, stops, data):
    """Stops drawn from the alphabet or cut from the text itself; the deltas add up to the text generation defines
    (``expected_text``), and each token's logprobs come exactly once, with the delta its text starts in."""
    start = data.draw(st.integers(0, len(text) - 1))
    stops.append(text[start:start + data.draw(st.integers(1, 5))])
    ids = encode(tokenizer, text)
    deltas, _ = stream(tokenizer, ids, tuple(stops))
    text, reason = expected_text(tokenizer, ids, tuple(stops))
    assert joined(deltas) == text
    assert [delta.finish_reason for delta in deltas] == [None] * (len(deltas) - 1) + [reason]
    assert all(delta.text for delta in deltas[:-1])
    positions = [-entry.logprob for delta in deltas for entry in delta.logprobs]
    assert positions == list(range(len(positions)))  # in order, none twice
    if reason == "length":
        assert len(positions) == len(ids)
    sent = 0
    for delta in deltas:  # the tokens a stop string cut off start at or past the text's end: in the last delta only
        starting = [entry for entry in delta.logprobs if entry.text_offset < len(text)]
        assert all(sent <= entry.text_offset < sent + len(delta.text) for entry in starting[:1] if delta.text)
        assert delta is deltas[-1] or starting == list(delta.logprobs)
        sent += len(delta.text)


def test_a_token_the_stop_cut_off_comes_with_the_last_delta_the_text_it_releases_with_it(tokenizer):
    """Hypothesis found it: ' aab' as ' a' + 'ab' with the stop 'ab': ' a' sends ' ' and holds 'a' back; 'ab' completes
    the stop, so the last delta releases 'a' and lists 'ab', whose text the cut left out, at its offset in the uncut
    text (2, the text's end), as vLLM does."""
    ids = encode(tokenizer, " aab")
    assert [tokenizer.decode([token]) for token in ids] == [" a", "ab"]
    deltas, _ = stream(tokenizer, ids, ("ab",))
    assert [(delta.text, [(entry.token, entry.text_offset) for entry in delta.logprobs], delta.finish_reason)
            for delta in deltas] == [(" ", [(" a", 0)], None), ("a", [("ab", 2)], "stop")]


@pytest.fixture(scope="module")
def smollm2():
    return AutoTokenizer.from_pretrained(resolve_base_dir("smollm2", Settings().cache_dir))


def byte_offsets(entries) -> list[int]:
    """Each entry's text offset as its bytes place it: the index of the character its first byte lies in (bytes
    before it that end in part of a character are that character's)."""
    utf8, offsets = b"", []
    for entry in entries:
        offsets.append(len(utf8.decode("utf-8", "ignore")))
        utf8 += bytes(entry.token_bytes)
    return offsets


@pytest.mark.smollm2
@settings(max_examples=60, deadline=None)
@given(st.text(" aé☃日😀🏽שם\n", min_size=1, max_size=24))
def test_a_token_s_text_offset_is_that_of_the_character_its_bytes_begin_in(smollm2, text):
    """SmolLM2 spells a space and the first bytes of a character as one token (" \xd7" of " ש"): the detokenizer
    holds both until the character's last byte comes, and the token that completes it was given the space's offset
    (a review's ``" שלום"``: offsets 0, 0, 2 for 0, 1, 2)."""
    deltas, _ = stream(smollm2, encode(smollm2, text))
    entries = [entry for delta in deltas for entry in delta.logprobs]
    assert joined(deltas) == text
    assert [entry.text_offset for entry in entries] == byte_offsets(entries)


def test_the_choices_of_a_tokenizer_share_one_spelling_built_once(tiny_tokenizer_dir, monkeypatch):
    """Each choice that asks for logprobs reads the spelling of its tokenizer's pieces (``piece_bytes``): built once
    per tokenizer, not once per choice, and the same as built afresh."""
    built = []
    monkeypatch.setattr(streaming, "piece_bytes", lambda tokenizer: built.append(tokenizer) or piece_bytes(tokenizer))
    first, second = (AutoTokenizer.from_pretrained(tiny_tokenizer_dir) for _ in range(2))  # not yet in the cache
    choices = [ChoiceText(index, tokenizer, (), logprobs=True) for tokenizer in (first, second) for index in range(3)]
    assert built == [first, second]
    assert all(choice.piece_bytes is choices[0].piece_bytes for choice in choices[:3])
    assert choices[0].piece_bytes is not choices[3].piece_bytes
    pieces = first.convert_ids_to_tokens(encode(first, MIXED))
    assert [choices[0].piece_bytes(piece) for piece in pieces] == [piece_bytes(first)(piece) for piece in pieces]


def test_a_fast_tokenizer_is_required(tokenizer):
    with pytest.raises(TypeError, match="fast tokenizer"):
        ChoiceText(0, object(), (), logprobs=False)


def test_the_token_feed_hands_over_every_item_in_order_across_threads_and_drops_them_once_closed():
    async def main() -> tuple[list, list]:
        feed = TokenFeed(asyncio.get_running_loop())
        producer = threading.Thread(target=lambda: [feed.put(item) for item in range(5000)])
        producer.start()
        taken: list = []
        while len(taken) < 5000:
            taken += await feed.take()
        producer.join()
        feed.put("before")
        feed.close()
        feed.put("after")
        return taken, feed._items

    taken, left = asyncio.run(main())
    assert taken == list(range(5000)) and left == []

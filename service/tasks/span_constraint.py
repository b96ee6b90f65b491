"""Guaranteed spans: decoding constrained so that an answer is always a contiguous span of its context.

At each decoding step a constrained row may take only the tokens whose bytes extend the answer so far into a string
that still occurs in the context, or end the answer once it is a whole, non-empty span. The match is on the UTF-8
bytes of the text, never on the context's own tokens: the model may spell a span with other tokens than the context
was split into. The answer's leading whitespace is not part of it (the model writes " Denver" after "Answer:"), so the
first token matches without its leading whitespace, anywhere a character starts; and one token of whitespace alone may
come before it (SmolLM2 splits digits, and writes " 2015" as " " then digits), when the token budget leaves room for
the answer after it.

The state is the set of byte offsets where the answer so far ends in the context (every occurrence at once), so the
constraint never commits to one occurrence before the answer is done. Cost per request: one walk of the context
(for each character start, the tokens that spell the bytes from there, found through a set of token prefixes), then
per step a walk from each offset the answer still ends at.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerBase

from service.errors import NoSpan
from service.tasks.token_bytes import token_bytes

WHITESPACE = b" \t\n\r\x0b\x0c"


class SpanVocabulary:
    """The tokens of one vocabulary that can spell answer text, indexed by their bytes (built once per tokenizer).

    ``pieces``: each token id's bytes, None for special tokens (``token_bytes``); ``end_ids``: the tokens that end an
    answer (end of text, and tokens that are only whitespace holding a newline: the /answer prompt ends an answer at
    its first newline); ``blank_ids``: the tokens of whitespace alone without a newline, one of which may lead an
    answer in. A token holding a newline never spells answer text."""

    def __init__(self, pieces: list[bytes | None], end_ids: Iterable[int]):
        self.pieces = pieces
        self.end_ids = frozenset(end_ids)
        self.blank_ids = [token for token, piece in enumerate(pieces)
                          if piece and b"\n" not in piece and not piece.strip(WHITESPACE) and token not in self.end_ids]
        self.exact: dict[bytes, list[int]] = {}  # bytes -> the tokens spelled so
        self.first: dict[bytes, list[int]] = {}  # bytes less leading whitespace -> the tokens that begin an answer so
        for token, piece in enumerate(pieces):
            if piece and b"\n" not in piece:
                self.exact.setdefault(piece, []).append(token)
                if piece.lstrip(WHITESPACE):
                    self.first.setdefault(piece.lstrip(WHITESPACE), []).append(token)
        self.exact_prefixes = proper_prefixes(self.exact)
        self.first_prefixes = proper_prefixes(self.first)

    def spelled_from(self, text: bytes, start: int, first: bool = False) -> Iterable[tuple[list[int], int]]:
        """(tokens, end) for every token that spells ``text[start:end]`` (by its bytes less leading whitespace with
        ``first``): a walk that stops where no token's bytes go on."""
        keys, prefixes = (self.first, self.first_prefixes) if first else (self.exact, self.exact_prefixes)
        for end in range(start + 1, len(text) + 1):
            piece = text[start:end]
            if piece in keys:
                yield keys[piece], end
            if piece not in prefixes:
                return


def answer_vocabulary(tokenizer: PreTrainedTokenizerBase, eos_ids: Iterable[int]) -> SpanVocabulary:
    """The ``SpanVocabulary`` of /answer on ``tokenizer``: an answer ends with an end-of-text token (``eos_ids``) or a
    token of whitespace holding a newline. Raises NoSpan when the tokenizer's tokens' bytes are unknown
    (``token_bytes``)."""
    try:
        pieces = token_bytes(tokenizer)
    except ValueError as unknown:
        raise NoSpan(str(unknown)) from None
    newlines = [token for token, piece in enumerate(pieces) if piece and b"\n" in piece and not piece.strip(WHITESPACE)]
    return SpanVocabulary(pieces, [*eos_ids, *newlines])


def proper_prefixes(keys: Iterable[bytes]) -> set[bytes]:
    """Every non-empty proper prefix of the ``keys``."""
    return {key[:length] for key in keys for length in range(1, len(key))}


def character_starts(text: bytes) -> list[bool]:
    """For each byte offset in [0, len(text)], whether a character starts (or the text ends) there: UTF-8
    continuation bytes are 0b10xxxxxx (RFC 3629, section 3)."""
    return [byte & 0xC0 != 0x80 for byte in text] + [True]


class SpanConstraint:
    """The decoding constraint of one answer over one context (one generation; not reusable).

    ``allowed`` gives the token ids the next step may take, ``advance`` takes the token the step took, ``span`` gives
    the answer's character offsets in the context once decoding is done. ``budget``: the most tokens the generation
    may take (its ``max_new_tokens``); a token of whitespace alone may lead the answer in only when at least one more
    is left after it, so the answer is never empty. Raises NoSpan when the context holds no text a token can begin an
    answer with (only whitespace, or nothing)."""

    def __init__(self, context: str, vocabulary: SpanVocabulary, budget: int):
        self.vocabulary, self.text = vocabulary, context.encode()
        self.starts = character_starts(self.text)
        self.ends: set[int] = set()  # byte offsets where the answer so far ends, once it has begun
        self.length = 0  # the answer's bytes so far
        self.logprobs: list[float] = []  # of every token taken, its ending included
        self._next: dict[int, list[int]] = {}  # offset -> the tokens that go on from it
        firsts = {token for start in range(len(self.text)) if self.starts[start]
                  for tokens, _ in vocabulary.spelled_from(self.text, start, first=True) for token in tokens}
        if not firsts:
            raise NoSpan("the context holds no text an answer could be a span of")
        self._first = torch.tensor(sorted(firsts))
        self._lead_in = torch.tensor(sorted(firsts.union(vocabulary.blank_ids))) if budget >= 2 else self._first

    def allowed(self) -> torch.Tensor:
        """The token ids [n] (long, n >= 1) the next step may take."""
        if not self.ends:
            return self._first if self.logprobs else self._lead_in
        tokens = {token for end in self.ends for token in self._tokens_from(end)}
        if any(self.starts[end] for end in self.ends):  # a whole span: the answer may end here
            tokens.update(self.vocabulary.end_ids)
        return torch.tensor(sorted(tokens))

    def _tokens_from(self, offset: int) -> list[int]:
        if offset not in self._next:
            self._next[offset] = [token for tokens, _ in self.vocabulary.spelled_from(self.text, offset)
                                  for token in tokens]
        return self._next[offset]

    def advance(self, token: int, logprob: float) -> None:
        """Take the token a step chose, one of ``allowed()`` (an ending token ends the answer's text), and its
        log-probability under the model (``score``)."""
        self.logprobs.append(logprob)
        piece = self.vocabulary.pieces[token]
        if token in self.vocabulary.end_ids or piece is None:
            return
        if not self.ends:
            piece = piece.lstrip(WHITESPACE)
            if not piece:  # whitespace leading the answer in
                return
            self.ends = {start + len(piece) for start in occurrences(self.text, piece) if self.starts[start]}
        else:
            self.ends = {end + len(piece) for end in self.ends if self.text.startswith(piece, end)}
        self.length += len(piece)

    def score(self) -> float | None:
        """The mean log-probability (natural log, under the model's own distribution) of the tokens taken, the
        ending one included: how the spans of a long context's windows are compared. None before any token."""
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else None

    def span(self) -> tuple[int, int] | None:
        """The answer's [start, end) character offsets in the context: its first occurrence, less trailing
        whitespace, and with a character the token budget cut short completed as the context spells it there (so
        never empty: the first token begins with a character that is not whitespace); None before any token."""
        if not self.ends:
            return None
        end = min(self.ends)
        start = end - self.length
        while not self.starts[end]:
            end += 1
        end = start + len(self.text[start:end].rstrip(WHITESPACE))
        return len(self.text[:start].decode()), len(self.text[:end].decode())

    def lies_inside(self, cut_before: bool, cut_after: bool) -> bool:
        """Whether the answer (once decoding is done) occurs somewhere in the context that a cut could not have
        shortened: not at its start (nothing but whitespace before it) when ``cut_before`` (the context is a window
        cut out of a longer text, which goes on before it), nor at its end when ``cut_after``. An answer running to a
        cut edge may be the beginning or the end of a longer one the model would have given had it seen the text
        beyond (``Tasks.answer``). False before any token."""
        first = len(self.text) - len(self.text.lstrip(WHITESPACE))  # where the context's text begins
        last = len(self.text.rstrip(WHITESPACE))  # and ends
        return any(not (cut_before and end - self.length <= first) and not (cut_after and end >= last)
                   for end in self.ends)


def occurrences(text: bytes, piece: bytes) -> Iterable[int]:
    """Every offset where ``piece`` (non-empty) occurs in ``text``, overlapping ones included."""
    found = text.find(piece)
    while found >= 0:
        yield found
        found = text.find(piece, found + 1)

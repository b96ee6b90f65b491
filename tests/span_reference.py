"""A brute-force reference of span-constrained decoding, for tests: at every step it tries every token of the
vocabulary against the context by plain substring search, sharing nothing with ``service.tasks.span_constraint``
but the reading of a token's bytes."""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from service.tasks.token_bytes import token_bytes

WHITESPACE = b" \t\n\r\x0b\x0c"


class BruteForceSpans:
    """Which tokens may come next for an answer (its bytes so far) that must be a span of ``context``, in at most
    ``budget`` tokens: a first token of whitespace alone (no newline) is allowed when one more token is left."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context: str, eos_ids: set[int], budget: int):
        self.pieces, self.budget = token_bytes(tokenizer), budget
        self.text = context.encode()
        offsets, offset = [], 0
        for char in context:
            offsets.append(offset)
            offset += len(char.encode())
        self.char_starts = set(offsets)
        self.ends = set(eos_ids) | {t for t, piece in enumerate(self.pieces)
                                    if piece and b"\n" in piece and not piece.strip(WHITESPACE)}

    def occurs(self, answer: bytes) -> bool:
        """Whether ``answer`` occurs in the context starting where a character starts."""
        found = self.text.find(answer)
        while found >= 0:
            if found in self.char_starts:
                return True
            found = self.text.find(answer, found + 1)
        return False

    def allowed(self, so_far: bytes) -> list[int]:
        """Every token that may follow the answer's bytes ``so_far`` (its tokens' bytes, leading whitespace too)."""
        answer = so_far.lstrip(WHITESPACE)
        whole = bool(answer) and self.occurs(answer) and valid_utf8(answer)
        lead_in = not so_far and self.budget >= 2
        return [token for token, piece in enumerate(self.pieces)
                if (token in self.ends and whole)
                or (token not in self.ends and piece is not None and b"\n" not in piece
                    and (self.extends(so_far, piece) or (lead_in and not piece.strip(WHITESPACE))))]

    def extends(self, so_far: bytes, piece: bytes) -> bool:
        """Whether ``piece`` after ``so_far`` spells a non-empty answer that occurs in the context."""
        answer = (so_far + piece).lstrip(WHITESPACE)
        return bool(answer) and self.occurs(answer)

    def span(self, so_far: bytes) -> str:
        """The answer the tokens ``so_far`` spell: its first occurrence in the context where a character starts, a
        last character cut short completed from there, trailing whitespace dropped."""
        answer = so_far.lstrip(WHITESPACE)
        start = next(at for at in sorted(self.char_starts) if self.text.startswith(answer, at))
        end = start + len(answer)
        while end < len(self.text) and end not in self.char_starts:
            end += 1
        return self.text[start:end].rstrip(WHITESPACE).decode()

    def bytes_of(self, tokens: list[int]) -> bytes:
        return b"".join(self.pieces[token] or b"" for token in tokens)


def valid_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True

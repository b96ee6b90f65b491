"""Answer spans: where a generated answer lies in its context, in the context's own character offsets."""
from __future__ import annotations


def caseless(text: str) -> tuple[str, list[int]]:
    """``text`` case-folded, and for each of its characters the index of the character of ``text`` it came from
    (case folding can change the length: "İ" folds to two characters, "ß" to "ss")."""
    folded, origins = [], []
    for index, char in enumerate(text):
        piece = char.casefold()
        folded.append(piece)
        origins += [index] * len(piece)
    return "".join(folded), origins


def locate(answer: str, context: str) -> tuple[str, int | None, int | None]:
    """Find the answer in the context (exactly, else ignoring case); return the context's span and its character
    offsets in ``context`` itself, so that ``context[start:end]`` is the span returned (None, None if not found)."""
    answer = answer.strip()
    if not answer:
        return answer, None, None
    start = context.find(answer)
    if start >= 0:
        return answer, start, start + len(answer)
    folded, origins = caseless(context)
    found = folded.find(answer.casefold())
    if found < 0:
        return answer, None, None
    start, end = origins[found], origins[found + len(answer.casefold()) - 1] + 1
    return context[start:end], start, end

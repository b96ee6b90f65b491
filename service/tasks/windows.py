"""Long contexts for /answer: overlapping windows of the context's tokens, each short enough for one prompt.

The windows are answered together and the best span wins (``Tasks.answer``). Consecutive windows share ``stride``
tokens (Hugging Face's ``doc_stride`` of its question-answering pipelines), so a span of at most ``stride`` tokens
lies whole inside some window wherever the windows are cut.
"""
from __future__ import annotations


def windows(offsets: list[tuple[int, int]], size: int, stride: int) -> list[tuple[int, int]]:
    """Character ranges [start, end) of the windows over a text whose tokens have the character ``offsets`` (one
    (start, end) per token, in order): at most ``size`` tokens each, consecutive windows sharing ``stride`` tokens,
    the first beginning at the first token and the last ending at the last one. Raises ValueError unless
    0 <= stride < size."""
    if not 0 <= stride < size:
        raise ValueError(f"a window of {size} tokens cannot share {stride} with the next")
    if not offsets:
        return []
    firsts = range(0, max(len(offsets) - stride, 1), size - stride)
    return [(offsets[first][0], offsets[min(first + size, len(offsets)) - 1][1]) for first in firsts]

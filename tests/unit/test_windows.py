"""Windows over a long context: every token inside one, none longer than the budget, neighbours sharing the stride,
and every span of at most the stride whole inside some window."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.settings import Settings
from service.tasks.windows import windows


def token_offsets(count: int) -> list[tuple[int, int]]:
    """Tokens of 3 characters, one space apart: token i spans [4i, 4i + 3)."""
    return [(4 * i, 4 * i + 3) for i in range(count)]


def tokens_in(window: tuple[int, int], count: int) -> list[int]:
    return [i for i, (start, end) in enumerate(token_offsets(count)) if window[0] <= start and end <= window[1]]


@given(count=st.integers(1, 300), size=st.integers(1, 64), stride=st.integers(0, 63))
def test_windows_cover_the_text_within_the_budget_and_share_the_stride(count, size, stride):
    if stride >= size:
        with pytest.raises(ValueError):
            windows(token_offsets(count), size, stride)
        return
    cut = [tokens_in(window, count) for window in windows(token_offsets(count), size, stride)]
    assert cut[0][0] == 0 and cut[-1][-1] == count - 1
    assert all(len(tokens) <= size for tokens in cut)
    assert all(len(set(a) & set(b)) == stride for a, b in itertools.pairwise(cut))
    for first in range(count):  # every span of at most ``stride`` tokens (at least one) lies whole in a window
        last = min(first + max(stride, 1), count) - 1
        assert any(tokens[0] <= first and last <= tokens[-1] for tokens in cut), (first, last)


def test_a_text_that_fits_is_one_window_and_no_tokens_none():
    assert windows(token_offsets(5), 8, 2) == [(0, 19)]
    assert windows([], 8, 2) == []


@pytest.mark.parametrize("fields,room,stride", [({}, 1000, 128), ({}, 300, 128), ({}, 36, 18), ({}, 1, 0),
                                                ({"max_input_tokens": 64}, 36, 18),
                                                ({"max_input_tokens": 64, "answer_stride": 5}, 36, 5),
                                                ({"answer_stride": 200}, 300, 200)])
def test_the_default_stride_follows_a_windows_room_as_hugging_faces_doc_stride(fields, room, stride):
    """Unset: min(room // 2, 128) of the ``room`` context tokens a window holds beside the question (taken of the whole
    prompt, 32 for a prompt of 64 left windows of 36 context tokens moving on by 4); set: as set."""
    assert Settings(**fields).window_stride(room) == stride


@pytest.mark.parametrize("longest,stride", [(64, 64), (64, 500), (1024, 1024)])
def test_a_stride_set_at_or_above_the_longest_prompt_is_refused(longest, stride):
    with pytest.raises(ValidationError, match=f"must be below max_input_tokens \\({longest}\\), not {stride}"):
        Settings(max_input_tokens=longest, answer_stride=stride)

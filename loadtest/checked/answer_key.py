"""The answer key of a load test and the verdict on each reply.

Before the load, a reference pass sends every request (``asks.Ask``) to every adapter alone, one at a time, greedy:
its reply is that (adapter, request)'s right answer. Under load the same request must get the same answer, as the
engine's greedy answers do not depend on the batch a request runs in. A 200 whose answer is another adapter's right
answer for that request is the wrong-adapter case; one that is nobody's is wrong too. Only a 429 with Retry-After, or
a 404 for an adapter that was unregistered at some moment of the request, may stand in for an answer."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from loadtest.checked.asks import Ask, answer_of, same

# what became of a request
OK = "ok"  # a 200 with the right answer
WRONG_ADAPTER = "wrong_adapter"  # a 200 with another adapter's right answer for the request
WRONG = "wrong"  # a 200 with an answer no adapter gives the request
REJECTED = "rejected_429"  # a 429 with Retry-After (the queue was full)
GONE = "gone_404"  # a 404 for an adapter that was unregistered at some moment of the request
SERVER_ERROR = "server_error"  # a 5xx
FAILED = "failed"  # anything else: no reply (a timeout, a refused connection), a 429 without Retry-After, a 404 for
# an adapter registered all along, another status, a 200 of another shape
OUTCOMES = (OK, WRONG_ADAPTER, WRONG, REJECTED, GONE, SERVER_ERROR, FAILED)
FINE = (OK, REJECTED, GONE)  # the outcomes that are no failure


class ReferenceFailed(RuntimeError):
    """A request of the reference pass got no 200: its right answer cannot be known."""


@dataclass
class AnswerKey:
    """The right answer of each (adapter, request): ``expected[(adapter, i)]``, ``answer_of`` the reply of
    ``asks[i]`` to ``adapter`` alone. ``tolerance``: how far a probability may be from the key's (batching changes
    float rounding). ``seconds``: how long the reference pass took."""

    adapters: list[str]
    asks: list[Ask]
    expected: dict[tuple[str, int], dict]
    tolerance: float
    seconds: float = 0.0

    def grade(self, adapter: str, index: int, got: dict) -> str:
        """OK, WRONG_ADAPTER or WRONG for the answer ``got`` to request ``index`` of ``adapter``: OK only when it is
        the key's, the adapter the reply names included; WRONG_ADAPTER when, whatever adapter it names, it is another
        adapter's right answer."""
        if same(got, self.expected[(adapter, index)], self.tolerance):
            return OK
        return WRONG_ADAPTER if self.anothers(adapter, index, got) else WRONG

    def anothers(self, adapter: str, index: int, answer: dict) -> bool:
        """Whether ``answer``, the adapter its reply names aside, is the right answer of an adapter other than
        ``adapter`` to request ``index``."""
        return any(same(unnamed(answer), unnamed(self.expected[(other, index)]), self.tolerance)
                   for other in self.adapters if other != adapter)

    def distinct_fraction(self) -> float:
        """The share of (adapter, request) whose right answer differs from every other adapter's for that request
        (the adapter's name in the reply aside): where it does not, a reply from the wrong adapter is not seen."""
        distinct = sum(not self.anothers(adapter, index, answer) for (adapter, index), answer in self.expected.items())
        return distinct / len(self.expected)


def unnamed(answer: dict) -> dict:
    """An answer (``asks.answer_of``) without the adapter its reply names."""
    return {key: value for key, value in answer.items() if key != "adapter"}


def reference_pass(http: httpx.Client, adapters: Sequence[str], asks: Sequence[Ask], tolerance: float) -> AnswerKey:
    """Send each of ``asks`` to each adapter alone (one request at a time, adapter by adapter) and keep the answers.
    ``http``: a client of the server, with its API key if it has one. Raises ReferenceFailed for a reply that is not
    a 200."""
    started = time.perf_counter()
    expected = {}
    for adapter in adapters:
        for i, ask in enumerate(asks):
            reply = http.post(ask.endpoint, json=ask.body(adapter))
            if reply.status_code != 200:
                raise ReferenceFailed(f"the reference pass got {reply.status_code} from {ask.endpoint} for adapter "
                                      f"{adapter}: {reply.text[:300]}")
            expected[(adapter, i)] = answer_of(ask.endpoint, reply.json())
    return AnswerKey(list(adapters), list(asks), expected, tolerance, time.perf_counter() - started)


def verdict(key: AnswerKey, adapter: str, index: int, status: int, retry_after: bool, body: dict | None,
            absent: bool) -> str:
    """The outcome (one of OUTCOMES) of request ``index`` sent to ``adapter``: ``status`` 0 when no reply came,
    ``retry_after`` whether the reply has that header, ``body`` its JSON (None if it is none), ``absent`` whether the
    adapter was unregistered at some moment while the request was out."""
    if status == 200:
        try:
            return key.grade(adapter, index, answer_of(key.asks[index].endpoint, body))
        except (KeyError, IndexError, TypeError, AttributeError):
            return FAILED
    if status == 429:
        return REJECTED if retry_after else FAILED
    if status == 404:
        return GONE if absent else FAILED
    return SERVER_ERROR if status >= 500 else FAILED

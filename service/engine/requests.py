"""What the engine is asked to do, and what it answers: a generation or a scoring, their futures and results, and
the tokens a generation hands out as it decodes them."""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from service.engine.constraints import TokenConstraint
from service.engine.sampling import Decoding
from service.lora.adapter_files import AdapterWeights


class RequestFuture(Future):
    """A submitted request's outcome; ``abandoned`` once its caller withdrew it, ``ended`` once its caller asked it to
    finish early (``Engine.end``)."""

    def __init__(self):
        super().__init__()
        self.abandoned = False
        self.ended = False

    def set_result(self, result) -> None:
        """As ``Future.set_result``, except that on a future cancelled meanwhile the result is dropped (see
        ``set_exception``)."""
        self._settle(super().set_result, result)

    def set_exception(self, exception) -> None:
        """As ``Future.set_exception``, except that on a future cancelled meanwhile the exception is dropped: a
        queued request's future is cancelled by ``asyncio.wrap_future`` when the task awaiting it is cancelled (its
        client went away), from the event loop's thread and without the engine's lock, so a check of ``done()``
        before settling it is a race. Raises InvalidStateError on a future already finished, as Future does."""
        self._settle(super().set_exception, exception)

    def _settle(self, settle, outcome) -> None:
        try:
            settle(outcome)
        except InvalidStateError:
            if not self.cancelled():
                raise


@dataclass
class Generation:
    """Generate a continuation of ``prompt_ids`` with one adapter (None: the bare base).

    ``logprobs``: None asks for none; k >= 0 (at most ``logprobs.MOST_TOP_LOGPROBS``) asks, for each token handed to
    a listener (``Engine.submit``), its log-probability and the k most likely tokens' (``SampledToken``).
    ``constraint``: None decodes freely; a ``TokenConstraint`` (its own, it holds state) limits every step's token.
    ``weights``: the weights registered under ``adapter``, bound by the caller (``Engine.bound``); None: those the
    name holds when the request is queued."""

    prompt_ids: list[int]
    adapter: str | None
    decoding: Decoding = field(default_factory=Decoding)
    stop_at_newline: bool = True
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    logprobs: int | None = None
    constraint: TokenConstraint | None = None
    weights: AdapterWeights | None = None


@dataclass(frozen=True)
class SampledToken:
    """A token a generation produced, as the engine hands it to the request's listener on the engine thread, at the
    decoding step that picked it (before the next step runs). An end-of-text token that stops the generation is handed
    out too, last, with ``ends_text`` set: it is no part of the generation's text or ``token_ids``, but is one of its
    ``generated_tokens`` and has its log-probabilities, as vLLM gives that token a logprobs entry.

    ``logprob`` and ``top_logprobs`` are natural logs of probabilities under the model's own next-token distribution
    at that step: the softmax of its raw logits, before temperature, top-k and top-p (vLLM's "raw logprobs"); None
    and () unless the generation asked (``Generation.logprobs``). ``top_logprobs`` holds (token id, logprob) of the k
    most likely tokens, most likely first (the chosen token may or may not be among them)."""

    token_id: int
    sampled_at: float  # time.perf_counter() seconds, on the engine thread, when the token was picked
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    ends_text: bool = False  # the end-of-text token that stopped the generation (``Endings.ends_text``)


@dataclass
class GenerationResult:
    """A finished generation: its text and token ids (an ending end-of-text token left out), why it ended, the
    seconds from queueing to its first token, the prompt's length in tokens, and the tokens the model generated: the
    token ids and an ending end-of-text token (what vLLM's ``usage.completion_tokens`` counts: its detokenizer leaves
    the stop token out of the text, not out of the token ids)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    time_to_first_token: float
    prompt_tokens: int
    generated_tokens: int


@dataclass
class Scoring:
    """Scores of the next token over ``candidates`` (one forward pass): their probabilities renormalized over them (a
    list that sums to 1), or with ``logprobs`` their log-probabilities under the whole next-token distribution and the
    weights that scored them (``scoring.CandidateLogprobs``). ``weights``: as ``Generation``'s."""

    prompt_ids: list[int]
    adapter: str | None
    candidates: list[int]
    logprobs: bool = False
    weights: AdapterWeights | None = None


def run_all(engine, works: list[Generation | Scoring]) -> list:
    """Submit many requests to ``engine`` (a ``service.engine.scheduler.Engine``) and wait for all their results,
    in order, keeping at most its ``max_queue`` in flight (evaluation and benchmarks). Raises what a request does."""
    futures, results = deque(), []
    for work in works:
        while len(futures) >= engine.settings.max_queue:
            results.append(futures.popleft().result())
        futures.append(engine.submit(work))
    return results + [future.result() for future in futures]

"""What the engine is asked to do, and what it answers: a generation or a scoring, their futures and results."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

from service.engine.sampling import Decoding


class RequestFuture(Future):
    """A submitted request's outcome; ``abandoned`` once its caller withdrew it."""

    def __init__(self):
        super().__init__()
        self.abandoned = False


@dataclass
class Generation:
    """Generate a continuation of ``prompt_ids`` with one adapter (None: the bare base)."""

    prompt_ids: list[int]
    adapter: str | None
    decoding: Decoding = field(default_factory=Decoding)
    stop_at_newline: bool = True
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)


@dataclass
class GenerationResult:
    """A finished generation: its text and token ids (the stop token left out), why it ended, the seconds from
    queueing to its first token, and the prompt's length in tokens."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    time_to_first_token: float
    prompt_tokens: int


@dataclass
class Scoring:
    """Probabilities of the next token over ``candidates`` (one forward pass)."""

    prompt_ids: list[int]
    adapter: str | None
    candidates: list[int]

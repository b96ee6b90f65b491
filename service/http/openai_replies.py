"""OpenAI's reply bodies for completions and chat completions, whole or streamed as server-sent events, from what the
tasks hand out (``service.tasks.streaming``: Completion, ChoiceDelta, TokenLogprob). No tensors here."""
from __future__ import annotations

import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from typing import ClassVar

from fastapi.sse import format_sse_event

from service.errors import InputTooLong, NonFiniteLogits, UnknownAdapter
from service.http.errors import STATUS, error_code, message_of, openai_error, param_of, status_of
from service.tasks.streaming import ChoiceDelta, Completion, CompletionStream, TokenLogprob, TopLogprob, Usage

LOGPROB_FLOOR = -9999.0  # what OpenAI writes for a log-probability of minus infinity (JSON has no infinity)
DONE = format_sse_event(data_str="[DONE]")
logger = logging.getLogger(__name__)


def logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def usage(tokens: Usage) -> dict:
    return {"prompt_tokens": tokens.prompt_tokens, "completion_tokens": tokens.completion_tokens,
            "total_tokens": tokens.total_tokens}


def completion_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    """OpenAI's logprobs of completion tokens: ``tokens`` (each token's name, ``completion_token``),
    ``token_logprobs``, ``top_logprobs`` (per token, {name: logprob} of the k most likely tokens and of the token
    itself: up to k + 1, as OpenAI gives) and ``text_offset`` (where each token's text starts in the choice's text, in
    characters)."""
    return {
        "tokens": [completion_token(entry) for entry in entries],
        "token_logprobs": [logprob(entry.logprob) for entry in entries],
        "top_logprobs": [{**{completion_token(top): logprob(top.logprob) for top in entry.top_logprobs},
                          completion_token(entry): logprob(entry.logprob)} for entry in entries],
        "text_offset": [entry.text_offset for entry in entries],
    }


def completion_token(token: TokenLogprob | TopLogprob) -> str:
    """A token's name in legacy completions' logprobs: its text, or for a token whose bytes are part of a character
    (its text alone U+FFFD) ``bytes:`` and its bytes as ``\\xNN`` escapes, as OpenAI's legacy completions name such
    tokens (``bytes:\\xe2\\x80``). ``top_logprobs`` is keyed by name, and the U+FFFD of two such tokens would
    collapse their entries into one."""
    if token.token_bytes is None:
        return token.token
    try:
        bytes(token.token_bytes).decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in token.token_bytes)
    return token.token


def utf8(token_bytes: tuple[int, ...] | None) -> list[int] | None:
    """A token's bytes as OpenAI's ``bytes`` (null where unknown: ``TokenLogprob``)."""
    return None if token_bytes is None else list(token_bytes)


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    """OpenAI's chat logprobs: per token its text, logprob, bytes and the k most likely tokens' (``top_logprobs``)."""
    return {"content": [{"token": entry.token, "logprob": logprob(entry.logprob), "bytes": utf8(entry.token_bytes),
                         "top_logprobs": [{"token": top.token, "logprob": logprob(top.logprob),
                                           "bytes": utf8(top.token_bytes)} for top in entry.top_logprobs]}
                        for entry in entries],
            "refusal": None}


class Replies(ABC):
    """The replies to one request: its id, creation time (Unix seconds) and model, whole or as stream chunks. Each
    kind of request (``CompletionReplies``, ``ChatReplies``) says how a choice is written, and which request field
    each domain error it may fail with is the fault of (``fields``: OpenAI's ``param``, see ``errors.blaming``)."""

    prefix, whole_object, chunk_object = "", "", ""
    # the model named is unknown (or was unregistered while the request waited), or its weights overflow on it
    fields: ClassVar[dict[type[Exception], str]] = {UnknownAdapter: "model", NonFiniteLogits: "model"}

    def __init__(self, model: str):
        self.id, self.created, self.model = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time()), model

    def head(self, chunk: bool) -> dict:
        return {"id": self.id, "object": self.chunk_object if chunk else self.whole_object, "created": self.created,
                "model": self.model}

    def whole(self, completion: Completion) -> dict:
        choices = [self.choice(choice.index, choice.text, choice.logprobs, choice.finish_reason)
                   for choice in completion.choices]
        return {**self.head(False), "choices": choices, "usage": usage(completion.usage)}

    def chunk(self, choices: list[dict], include_usage: bool) -> bytes:
        """A server-sent event of ``choices``; with ``include_usage``, it says "usage": null (all but the last)."""
        return event({**self.head(True), "choices": choices, **({"usage": None} if include_usage else {})})

    @abstractmethod
    def choice(self, index: int, text: str, logprobs: Sequence[TokenLogprob] | None, finish_reason: str) -> dict:
        """A whole reply's choice."""

    @abstractmethod
    def opening(self, index: int) -> dict | None:
        """What choice ``index``'s stream starts with, before its first delta (None: nothing)."""

    @abstractmethod
    def delta(self, delta: ChoiceDelta) -> dict:
        """A stream chunk's choice."""


class CompletionReplies(Replies):
    """/v1/completions: a choice is its text; ``echo`` (the prompt, when echoed) comes before it."""

    prefix, whole_object, chunk_object = "cmpl", "text_completion", "text_completion"
    fields: ClassVar[dict[type[Exception], str]] = {**Replies.fields, InputTooLong: "prompt"}

    def __init__(self, model: str, echo: str = ""):
        super().__init__(model)
        self.echo = echo

    def choice(self, index: int, text: str, logprobs: Sequence[TokenLogprob] | None, finish_reason: str) -> dict:
        return {"index": index, "text": self.echo + text,
                "logprobs": None if logprobs is None else completion_logprobs(logprobs), "finish_reason": finish_reason}

    def opening(self, index: int) -> dict | None:
        return {"index": index, "text": self.echo, "logprobs": None, "finish_reason": None} if self.echo else None

    def delta(self, delta: ChoiceDelta) -> dict:
        return {"index": delta.index, "text": delta.text,
                "logprobs": None if delta.logprobs is None else completion_logprobs(delta.logprobs),
                "finish_reason": delta.finish_reason}


class ChatReplies(Replies):
    """/v1/chat/completions: a choice is the assistant's message; a stream opens each choice with its role."""

    prefix, whole_object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"
    fields: ClassVar[dict[type[Exception], str]] = {**Replies.fields, InputTooLong: "messages"}

    def choice(self, index: int, text: str, logprobs: Sequence[TokenLogprob] | None, finish_reason: str) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": None if logprobs is None else chat_logprobs(logprobs), "finish_reason": finish_reason}

    def opening(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, delta: ChoiceDelta) -> dict:
        return {"index": delta.index, "delta": {"content": delta.text},
                "logprobs": None if delta.logprobs is None else chat_logprobs(delta.logprobs),
                "finish_reason": delta.finish_reason}


def stream_error(exc: Exception, fields: dict[type[Exception], str], named: Callable[[str], str]) -> dict:
    """The error event of a streamed reply that failed with ``exc``: a domain error's status, message (``message_of``
    with ``named``), code and the request field ``fields`` traces it to (``param_of``), as a reply before the stream
    began would have had; anything else a server error, logged with its traceback."""
    if not isinstance(exc, tuple(STATUS)):
        logger.error("a streamed reply failed after it began", exc_info=exc)
        return openai_error(500, "internal server error: the request's batch failed", code="internal_error")
    return openai_error(status_of(type(exc), openai=True), message_of(exc, named), param_of(exc, fields),
                        error_code(type(exc), openai=True))


def event(body: dict) -> bytes:
    """One server-sent event whose data is ``body`` as JSON (strict: no NaN or infinity)."""
    return format_sse_event(data_str=json.dumps(body, allow_nan=False))


async def events(replies: Replies, stream: CompletionStream, include_usage: bool,
                 named: Callable[[str], str]) -> AsyncIterator[bytes]:
    """A streamed reply as server-sent events: each choice's opening, then a chunk per delta (new text, its logprobs;
    the finish reason in each choice's last), with ``include_usage`` a last chunk with no choices and the usage, then
    ``data: [DONE]``. An error after the reply began (the engine failed, a fault failed the batch, another choice
    of the request timed out in the queue) is an event of OpenAI's error shape, which OpenAI's clients raise, then
    ``[DONE]`` (``stream_error``, naming settings as ``named`` does). The stream is
    closed however this ends: a client gone mid-stream has its rows leave the batch before the next decoding step."""
    async with stream:
        try:
            for opening in filter(None, map(replies.opening, range(len(stream.choices)))):
                yield replies.chunk([opening], include_usage)
            async for delta in stream:
                yield replies.chunk([replies.delta(delta)], include_usage)
        except Exception as exc:  # the reply has begun (200): the error is its last event
            yield event(stream_error(exc, replies.fields, named))
            yield DONE
            return
    if include_usage:
        yield event({**replies.head(True), "choices": [], "usage": usage(stream.usage)})
    yield DONE

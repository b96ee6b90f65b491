"""Streamed completions: the tokens of a request's choices, turned into text deltas as the engine decodes them.

Each choice's tokens are detokenized incrementally (tokenizers' ``DecodeStream``), so a delta never splits a UTF-8
character and never changes text handed out before. Stop strings are searched in the decoded text, across token and
delta boundaries; the text stops before the earliest one, and only the end of the text that could still be the start
of one is held back. A choice that meets a stop string asks the engine to end its row (``Engine.end``): it leaves the
batch a step or two later, and the tokens of those steps are dropped. Log-probabilities come with the tokens behind
the text of each delta; a choice's last delta has those of every token left, as vLLM lists every token it counts in
``usage``: the end-of-text token the model ended the choice on (no text), and those whose text a stop string cut off.
Nothing here touches a tensor: the HTTP layer iterates ``CompletionStream``.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from service import metrics
from service.engine.requests import Generation, SampledToken
from service.engine.scheduler import Engine
from service.engine.token_feed import TokenFeed
from service.errors import RequestAbandoned
from service.lora.adapter_files import BASE_LABEL
from service.tasks.token_bytes import piece_bytes


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a step: its text and bytes (``token``, ``token_bytes``: see TokenLogprob), id
    and natural logprob."""

    token: str
    token_id: int
    logprob: float
    token_bytes: tuple[int, ...] | None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token and its log-probabilities (natural logs, under the model's raw distribution: before
    temperature, top-k and top-p).

    ``token`` is the token's own text, decoded alone with special tokens kept ("<|im_end|>"); a token that holds part
    of a UTF-8 character decodes alone to U+FFFD. ``text_offset`` is the character (code point) offset, in the choice's
    text, where the token's text starts: that of the character it completes, for a token ending a multi-byte one; the
    end of the text for the end-of-text token that ended the choice (no part of its text); where it would start in the
    text as though uncut, at or past its end, for a token whose text a stop string cut off.
    ``top_logprobs`` are the k most likely tokens at that step, most likely first (k as asked; the chosen token may or
    may not be among them). ``token_bytes`` are the UTF-8 bytes the token stands for, part of a character's for such a
    token (read from its vocabulary entry: ``token_bytes.piece_bytes``); None only where the vocabulary's spelling is
    unknown."""

    token: str
    token_id: int
    logprob: float
    token_bytes: tuple[int, ...] | None
    top_logprobs: tuple[TopLogprob, ...]
    text_offset: int


@dataclass(frozen=True)
class ChoiceDelta:
    """New text of one choice (``index``, 0 to n - 1): it follows the choice's previous deltas and never revises them.

    ``text`` may be empty only on a choice's last delta. ``logprobs``: None unless asked; else the tokens whose text
    starts in this delta (on a last delta, every token left: those whose text is empty at the end, the end-of-text
    token that ended the choice among them, and those whose text a stop string cut off), in order.
    ``finish_reason`` is None until the choice's last delta: "stop" (a stop string, whose text is left out, or the
    model's end of text) or "length" (the token budget)."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None


@dataclass(frozen=True)
class Usage:
    """Tokens of a request: its prompt's (once, whatever n) and those its choices generated, summed. A choice stopped
    by a stop string counts its tokens up to the one that completed the stop string; one the model ended counts the
    end-of-text token too, which has no text but a logprobs entry (as vLLM counts: ``GenerationResult.generated_tokens``
    and ``SampledToken.ends_text``)."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class CompletedChoice:
    """One choice of a non-streamed completion: its text, logprobs (None unless asked) and finish reason."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str


@dataclass(frozen=True)
class Completion:
    """A non-streamed completion: its choices (index order) and usage."""

    choices: list[CompletedChoice]
    usage: Usage


@lru_cache(maxsize=8)
def spelling(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], bytes] | None:
    """``token_bytes.piece_bytes`` of ``tokenizer``; None for a spelling it does not know. Built once per tokenizer
    (a byte-level one's is a map of 256 characters), not for each choice that asks for logprobs; the last few
    tokenizers' are kept (a server has one), as ``chat.longest_token`` keeps theirs."""
    try:
        return piece_bytes(tokenizer)
    except ValueError:
        return None


class ChoiceText:
    """One choice's text as its tokens arrive: incremental detokenization, stop strings, text offsets.

    ``tokenizer`` must be a fast one (``backend_tokenizer``; TypeError otherwise); ``stop``: non-empty strings;
    ``logprobs``: whether the deltas carry them. ``finish_reason`` is set once the choice ends."""

    def __init__(self, index: int, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...], logprobs: bool):
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is None:
            raise TypeError(f"streaming needs a fast tokenizer (a tokenizers backend); {type(tokenizer).__name__} "
                            "has none")
        self.index, self.stop, self.logprobs = index, stop, logprobs
        self.piece_bytes = spelling(tokenizer) if logprobs else None
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.token_ids: list[int] = []
        self.generated_tokens = 0  # the tokens taken, and the end-of-text token the model ended the choice on
        self.text = ""  # decoded so far; cut at a stop string once met
        self.held_from = 0  # the first of the tokens the detokenizer holds (their text ends in part of a character)
        self.sent = 0  # characters of ``text`` handed out
        self.pending: list[TokenLogprob] = []  # of the tokens whose text is not handed out yet
        self.finish_reason: str | None = None

    def add(self, token: SampledToken) -> ChoiceDelta | None:
        """Take the choice's next token; the delta it releases, if any. Tokens after the choice ended are ignored.
        The end-of-text token the model ends the choice on (``SampledToken.ends_text``) adds no text: it is counted,
        and its logprobs entry (at the end of the text) comes with the choice's last delta, as vLLM gives it one."""
        if self.finish_reason is not None:
            return None
        entry = self.token_logprob(token, self.offset_of(token.token_id)) if self.logprobs else None
        self.generated_tokens += 1
        if entry is not None:
            self.pending.append(entry)
        if token.ends_text:
            return None
        self.token_ids.append(token.token_id)
        text = self.decoder.step(self.backend, token.token_id)
        if text is not None:
            self.text, self.held_from = self.text + text, len(self.token_ids)
        return self.release(None)

    def offset_of(self, token_id: int) -> int:
        """Where the text of the next token, ``token_id``, starts in the choice's text: after the text so far and the
        whole characters the tokens the detokenizer holds spell (decoded after the token before them, as the
        detokenizer does), or at the character they end in part of, when this token's bytes begin inside one."""
        held = self.token_ids[self.held_from:]
        if not held:
            return len(self.text)
        before = self.token_ids[max(self.held_from - 1, 0):self.held_from]
        known = len(self.backend.decode(before, skip_special_tokens=True))
        spelled = self.backend.decode(before + held, skip_special_tokens=True)[known:]
        utf8 = self.spelled(token_id)[1]
        completes = bool(utf8) and utf8[0] & 0xC0 == 0x80  # a UTF-8 continuation byte (RFC 3629, section 3)
        return len(self.text) + len(spelled) - (completes and spelled.endswith("\ufffd"))

    def finish(self, reason: str, generated_tokens: int) -> ChoiceDelta | None:
        """The engine finished the choice (``reason``: "stop" or "length") after ``generated_tokens`` tokens (those
        taken, and an ending end-of-text token): hand out the rest, with the characters the detokenizer still held (an
        incomplete UTF-8 sequence at the end, decoded as U+FFFD as a whole decode does). None if the choice ended at a
        stop string already."""
        if self.finish_reason is not None:
            return None
        self.generated_tokens = generated_tokens
        whole = self.backend.decode(self.token_ids, skip_special_tokens=True)
        if whole.startswith(self.text):
            self.text = whole
        return self.release(reason)

    def release(self, finish_reason: str | None) -> ChoiceDelta | None:
        """Hand out what is final: up to the earliest stop string (the choice then ends, "stop"), else all but what
        could start one, or everything when the engine finished the choice (``finish_reason``)."""
        cut = min((at for at in (self.text.find(stop, self.sent) for stop in self.stop) if at >= 0), default=None)
        if cut is not None:
            self.text, self.finish_reason = self.text[:cut], "stop"
            return self.hand_out(cut)
        if finish_reason is None:
            return self.hand_out(len(self.text) - self.held())
        self.finish_reason = finish_reason
        return self.hand_out(len(self.text))

    def held(self) -> int:
        """The length of the longest end of the text not handed out that is a proper start of a stop string."""
        tail = self.text[self.sent:]
        longest = min(len(tail), max((len(stop) - 1 for stop in self.stop), default=0))
        return next((k for k in range(longest, 0, -1) if any(stop.startswith(tail[-k:]) for stop in self.stop)), 0)

    def hand_out(self, end: int) -> ChoiceDelta | None:
        """The delta of ``text[sent:end]``, with the logprobs of the tokens whose text starts before ``end``, or of all
        the tokens left once the choice ended (those a stop string cut off too, as vLLM lists every token it counts);
        None when there is no text and the choice goes on."""
        text, self.sent = self.text[self.sent:end], end
        released = [entry for entry in self.pending if self.finish_reason is not None or entry.text_offset < end]
        self.pending = self.pending[len(released):]  # offsets never decrease: the released ones come first
        if not text and self.finish_reason is None:
            return None
        return ChoiceDelta(self.index, text, tuple(released) if self.logprobs else None, self.finish_reason)

    def token_logprob(self, token: SampledToken, offset: int) -> TokenLogprob:
        top = []
        for i, logprob in token.top_logprobs:
            text, utf8 = self.spelled(i)
            top.append(TopLogprob(text, i, logprob, utf8))
        text, utf8 = self.spelled(token.token_id)
        return TokenLogprob(text, token.token_id, token.logprob, utf8, tuple(top), offset)

    def spelled(self, token_id: int) -> tuple[str, tuple[int, ...] | None]:
        """A token's own text (decoded alone, special tokens kept) and its UTF-8 bytes: the text's, or for a token
        holding part of a character (its text alone is U+FFFD) its vocabulary entry's; None where that entry's
        spelling is unknown."""
        text = self.backend.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text, tuple(text.encode())
        try:
            return text, tuple(self.piece_bytes(self.backend.id_to_token(token_id))) if self.piece_bytes else None
        except KeyError:  # a piece outside the vocabulary's spelling
            return text, None


class CompletionStream:
    """An async iterator of ChoiceDelta over a request's choices, generated together (see ``Tasks.stream``).

    Deltas of different choices interleave, each choice's in order; each choice's last delta has its finish_reason,
    and iteration ends once every choice has finished. Iterating raises what failed a choice (EngineFailed,
    UnknownAdapter when the adapter was unregistered while the request queued, an error of its batch), after
    abandoning the other choices. Must be used on the event loop it was made on. Close it (``async with``, or
    ``close()``) when done or when its client is gone: every choice still generating is abandoned, its row leaving
    the batch before the next decoding step; cancelling a task blocked in the iteration closes it too. ``usage``
    counts the tokens so far (final once iteration ended)."""

    def __init__(self, engine: Engine, tokenizer: PreTrainedTokenizerBase, works: list[Generation],
                 stop: tuple[str, ...]):
        self.engine, self.prompt_tokens = engine, len(works[0].prompt_ids)
        self.label = works[0].adapter or BASE_LABEL
        self.started = time.perf_counter()
        self.feed = TokenFeed(asyncio.get_running_loop())
        self.choices = [ChoiceText(index, tokenizer, stop, work.logprobs is not None)
                        for index, work in enumerate(works)]
        self.last_token_at: list[float | None] = [None] * len(works)
        self.ready: deque[ChoiceDelta] = deque()
        self.first_handed_out, self.closed = False, False
        listeners = [lambda token, index=index: self.feed.put((index, token)) for index in range(len(works))]
        self.futures = engine.submit_together(works, listeners)
        for index, future in enumerate(self.futures):
            future.add_done_callback(lambda _, index=index: self.feed.put((index, None)))

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, sum(choice.generated_tokens for choice in self.choices))

    def __aiter__(self) -> CompletionStream:
        return self

    async def begun(self) -> None:
        """Wait until the first delta is ready (or every choice finished): raises, closing the stream, what failed a
        choice before that (QueueTimeout when it waited past the server's max_queue_wait, UnknownAdapter,
        EngineFailed), so a caller can answer with that error's status before it sends anything. Iterating then
        starts with that delta."""
        while not self.ready:
            if self.closed or all(choice.finish_reason is not None for choice in self.choices):
                return
            try:
                items = await self.feed.take()
            except asyncio.CancelledError:
                self.close()
                raise
            for index, token in items:
                self.take_in(index, token)

    async def __anext__(self) -> ChoiceDelta:
        await self.begun()
        if not self.ready:
            raise StopAsyncIteration
        if not self.first_handed_out:  # the time to first token, as the stream's client sees it
            self.first_handed_out = True
            metrics.TIME_TO_FIRST_TOKEN.labels(adapter=self.label).observe(time.perf_counter() - self.started)
        return self.ready.popleft()

    def take_in(self, index: int, token: SampledToken | None) -> None:
        """A choice's next token, or None once its future is done (its outcome): queue the delta it releases."""
        choice = self.choices[index]
        if choice.finish_reason is not None:  # tokens of the steps before the engine dropped the row
            return
        delta = self.outcome(index) if token is None else self.token(index, token)
        if delta is not None:
            self.ready.append(delta)

    def token(self, index: int, token: SampledToken) -> ChoiceDelta | None:
        last, self.last_token_at[index] = self.last_token_at[index], token.sampled_at
        if last is not None:
            metrics.INTER_TOKEN_LATENCY.labels(adapter=self.label).observe(token.sampled_at - last)
        delta = self.choices[index].add(token)
        if self.choices[index].finish_reason == "stop":  # a stop string: its row stops costing compute
            self.engine.end(self.futures[index])
        return delta

    def outcome(self, index: int) -> ChoiceDelta | None:
        future = self.futures[index]
        error = RequestAbandoned("the request was withdrawn") if future.cancelled() else future.exception()
        if error is not None:
            self.close()
            raise error
        result = future.result()
        return self.choices[index].finish(result.finish_reason, result.generated_tokens)

    def close(self) -> None:
        """Abandon every choice still queued or generating (finished ones are left as they are); idempotent."""
        self.closed = True
        self.feed.close()
        for future in self.futures:
            self.engine.abandon(future)

    async def __aenter__(self) -> CompletionStream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()


async def collect(stream: CompletionStream) -> Completion:
    """Every delta of ``stream`` gathered into one Completion (closing the stream, also when cancelled)."""
    texts, logprobs = [[] for _ in stream.choices], [[] for _ in stream.choices]
    reasons: list[str | None] = [None] * len(stream.choices)
    async with stream:
        async for delta in stream:
            texts[delta.index].append(delta.text)
            logprobs[delta.index] += delta.logprobs or ()
            reasons[delta.index] = delta.finish_reason
    wanted = [choice.logprobs for choice in stream.choices]
    choices = [CompletedChoice(index, "".join(texts[index]), tuple(logprobs[index]) if wanted[index] else None,
                               reasons[index]) for index in range(len(texts))]
    return Completion(choices, stream.usage)

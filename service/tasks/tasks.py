"""Tasks: build the prompt, decide how to decode or score, and post-process the engine's output."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from transformers import PreTrainedTokenizerBase

from service.engine.logprobs import MOST_TOP_LOGPROBS
from service.engine.requests import Generation, Scoring
from service.engine.sampling import Decoding, choice_seed
from service.engine.scheduler import Engine
from service.engine.scoring import CandidateLogprobs
from service.errors import InputTooLong, NoSpan, TemplateRefused
from service.lora.adapter_files import AdapterWeights
from service.settings import Settings
from service.tasks.labels import label_ids, prefix_candidates, sequence_logprobs, softmax
from service.tasks.prompt_styles import ADAPTER_STYLE, Prompt, answer_input, chat_job, nli_input, require_template
from service.tasks.prompts import NLI_LABELS, encode_text, label_target
from service.tasks.span_constraint import SpanConstraint, SpanVocabulary, answer_vocabulary
from service.tasks.streaming import Completion, CompletionStream, collect
from service.tasks.template_sandbox import renderer
from service.tasks.windows import windows

PROMPT_SETTINGS = ("max_input_tokens", "max_new_tokens")  # the settings that bound a prompt's tokens (max_prompt)
Windowed = tuple[list[tuple[int, int]], list[list[int]]]  # the windows of a context, and the prompt of each
WINDOW_SLACK = 8  # prompt tokens kept free in a window: tokens can merge differently where a window is cut
# prompts are built off the event loop: text tokenized on these threads, chat templates rendered in their processes
# (``template_sandbox``), awaited without a thread, so that a render waiting its turn holds no thread
TOKENIZING = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prompt-tokenizing")


# what each chat-style prompt is for, as a refusal of its render says (``Tasks.prompt_ids_of``): the whole context's
# prompt is asked where it fits, else it sizes the windows; the question's alone only sizes them
WHOLE = "the {style} prompt of the context and the question (asked where it fits in one prompt, else it sizes windows)"
ASKED = ("the {style} prompt of the question without its context, rendered only to size the windows of a context too "
         "long for one prompt (the model is not asked it)")
WINDOW = "the {style} prompt of the window and the question"
PAIR = "the {style} prompt of the premise and the hypothesis"


async def off_loop(function: Callable, *args):
    """``function(*args)`` on ``TOKENIZING``'s threads."""
    return await asyncio.get_running_loop().run_in_executor(TOKENIZING, function, *args)


@dataclass
class Answer:
    answer: str
    start: int | None
    end: int | None
    tokens: int
    score: float | None  # extractive: the answer's mean token log-probability (SpanConstraint.score)
    latency_ms: float


def chat_template(adapter: AdapterWeights | None) -> str | None:
    """The chat template ``adapter``'s folder ships; None for the bare base or an adapter that ships none (the base
    tokenizer's applies)."""
    return None if adapter is None else adapter.chat_template


def name_of(adapter: AdapterWeights | None) -> str | None:
    """The name ``adapter`` is registered under; None for the bare base."""
    return None if adapter is None else adapter.name


def exact_span(text: str, context: str) -> tuple[int, int] | None:
    """The [start, end) character offsets of ``text``'s first occurrence in ``context``; None if it is empty or
    occurs nowhere."""
    start = context.find(text) if text else -1
    return (start, start + len(text)) if start >= 0 else None


def stream_options(stop: str | Sequence[str], logprobs: int | None, n: int) -> tuple[str, ...]:
    """The stop strings of a stream (one string is one stop string), once its options are checked: ValueError for
    an empty stop string, ``logprobs`` outside None or [0, MOST_TOP_LOGPROBS], ``n`` below 1."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(text, str) or not text for text in stop):
        raise ValueError(f"stop strings must be non-empty strings, not {list(stop)}")
    if logprobs is not None and not 0 <= logprobs <= MOST_TOP_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {MOST_TOP_LOGPROBS}], not {logprobs}")
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    return stop


class Tasks:
    """The service's tasks over one engine: extractive QA, NLI and plain completion.

    Each task takes its adapter as the weights a request was bound to when it arrived (``AdapterRegistry.lookup``;
    None: the bare base): its prompt is built with their chat template and the engine runs it with them, even if the
    name is loaded in place meanwhile (``Engine.bound``), so a request never pairs one adapter's template with
    another's weights."""

    def __init__(self, engine: Engine, tokenizer: PreTrainedTokenizerBase, settings: Settings, max_positions: int):
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        room = max_positions - settings.max_new_tokens
        self.max_prompt = min(settings.max_input_tokens, room)
        # what sets max_prompt, named in the 413s (as the operator sets it: Runtime.named; a review: none named it)
        self.prompt_bound = "max_input_tokens" if settings.max_input_tokens <= room else \
            f"the base model's {max_positions} positions less max_new_tokens {settings.max_new_tokens}"
        self.label_tokens = {NLI_LABELS: self.first_tokens(NLI_LABELS)}
        try:  # about 1 s and 17 MiB for SmolLM2's 49,152 tokens
            self._span_vocabulary: SpanVocabulary | NoSpan = answer_vocabulary(tokenizer, engine.endings.eos_ids)
        except NoSpan as unknown:
            self._span_vocabulary = unknown

    def span_vocabulary(self) -> SpanVocabulary:
        """The tokens that spell extractive answers; raises NoSpan for a vocabulary whose tokens' bytes are unknown."""
        if isinstance(self._span_vocabulary, NoSpan):
            raise NoSpan(str(self._span_vocabulary))
        return self._span_vocabulary

    def first_tokens(self, labels: tuple[str, ...]) -> list[int]:
        """The first token of each label's completion; they must differ to be scored in one pass."""
        firsts = [encode_text(self.tokenizer, label_target(label))[0] for label in labels]
        if len(set(firsts)) != len(firsts):
            raise ValueError(f"this tokenizer gives two of {labels} the same first token; they cannot be scored")
        return firsts

    def bounded(self, ids: list[int]) -> list[int]:
        """``ids``, unless longer than ``max_prompt`` (InputTooLong)."""
        if len(ids) > self.max_prompt:
            raise self.too_long(f"the prompt has {len(ids)} tokens")
        return ids

    def too_long(self, what: str) -> InputTooLong:
        """InputTooLong saying ``what``, then the tokens a prompt may have and what sets that (``prompt_bound``)."""
        return InputTooLong(f"{what}; at most {self.max_prompt} are accepted ({self.prompt_bound})",
                            settings=PROMPT_SETTINGS)

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """A completion prompt's token ids: text is raw (special tokens spelled in it are parsed, as /v1/completions
        takes it); token ids (a chat template rendered by the caller) are taken as they are. Raises ValueError for an
        empty prompt or an id that is not an int in [0, vocabulary size), InputTooLong beyond ``max_prompt``."""
        if isinstance(prompt, str):
            ids = self.bounded(self.tokenizer.encode(prompt, add_special_tokens=False))
        else:
            vocabulary = len(self.tokenizer)
            wrong = [i for i in prompt if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocabulary]
            if wrong:
                raise ValueError(f"token ids must be ints in [0, {vocabulary}); {wrong[:5]} are not")
            ids = self.bounded(list(prompt))
        if not ids:
            raise ValueError("the prompt is empty: it has no tokens")
        return ids

    def decoding(self, decoding: Decoding) -> Decoding:
        """Cap the request's token budget at the server's setting."""
        if decoding.max_new_tokens <= self.settings.max_new_tokens:
            return decoding
        return Decoding(**{**decoding.__dict__, "max_new_tokens": self.settings.max_new_tokens})

    async def outcome(self, work: Generation | Scoring):
        """The engine's result for ``work`` (see ``outcomes``)."""
        return (await self.outcomes([work]))[0]

    async def stream(self, prompt: str | Sequence[int], adapter: AdapterWeights | None, decoding: Decoding, *,
                     stop: str | Sequence[str] = (), logprobs: int | None = None, n: int = 1) -> CompletionStream:
        """Start generating ``n`` choices of a completion of ``prompt``; returns the stream of their text deltas
        (``CompletionStream``: an async iterator of ``ChoiceDelta``, with ``usage``). Call it on the event loop that
        iterates the stream; close the stream when done or when the client is gone (``async with``).

        ``prompt``: raw text or token ids (see ``prompt_ids``). ``adapter``: the weights the request was bound to.
        ``decoding``: its ``max_new_tokens`` is capped at the server's ``max_new_tokens``; choice i samples with seed
        ``choice_seed(decoding.seed, i)`` (choice 0 with the request's own seed), so the choices are independent and
        reproducible; all are queued together, so that they share a batch whenever it has room for them all.
        ``stop``: a string or strings (any number, each non-empty; OpenAI allows 4): a choice's text ends before the
        first one met, as soon as it is met (of several met by one token, the one that starts first), which is left
        out. ``logprobs``: None, or k in [0, MOST_TOP_LOGPROBS]: every token's logprob and the k most likely tokens'
        (the model's raw distribution, before temperature, top-k and top-p). ``n``: choices, >= 1 (the caller caps it).

        Raises, before anything is queued: ValueError (empty prompt, a token id outside the vocabulary, an empty
        stop string, ``logprobs`` or ``n`` out of range), InputTooLong, QueueFull (the queue has no room for all n),
        EngineStopped or EngineFailed. The stream's iteration raises what fails a choice later (see
        ``CompletionStream``)."""
        stop = stream_options(stop, logprobs, n)
        ids = await off_loop(self.prompt_ids, prompt)  # tokenizing a long text blocks
        decoding = self.decoding(decoding)
        seeds = [choice_seed(decoding.seed, index) for index in range(n)]
        works = [Generation(ids, name_of(adapter), dataclasses.replace(decoding, seed=seed), stop_at_newline=False,
                            logprobs=logprobs, weights=adapter) for seed in seeds]
        return CompletionStream(self.engine, self.tokenizer, works, stop)

    async def complete(self, prompt: str | Sequence[int], adapter: AdapterWeights | None, decoding: Decoding, *,
                       stop: str | Sequence[str] = (), logprobs: int | None = None, n: int = 1) -> Completion:
        """The same completion as ``stream``, its deltas collected: each choice's whole text, logprobs and finish
        reason, and the usage. Raises as ``stream`` and as its iteration; cancelling the caller abandons every
        choice still generating."""
        return await collect(await self.stream(prompt, adapter, decoding, stop=stop, logprobs=logprobs, n=n))

    async def answer(self, context: str, question: str, adapter: AdapterWeights | None, decoding: Decoding,
                     extractive: bool = True, style: str = ADAPTER_STYLE, whole: list[int] | None = None,
                     windowed: Windowed | None = None) -> Answer:
        """Answer a question from a context, asked in prompt ``style`` (``prompt_styles``). ``extractive``: decoding
        is constrained to spans of the context (``SpanConstraint``), so ``context[start:end] == answer`` always, and a
        context too long for one prompt is answered in windows (``answer_windows``), together, the span of the best
        ``score`` winning among those no window's cut edge could have cut short (``SpanConstraint.lies_inside``;
        among all where every one runs to a cut edge); else the model's own text, with offsets where it occurs
        exactly as it is (its first occurrence), None where not. Raises NoSpan (extractive, and the context has
        nothing a span can begin with), InputTooLong (a free answer's prompt over ``max_prompt``, or a context of more
        windows than ``answer_windows`` allows), ValueError (a chat style on a model without a chat template), and
        what ``outcomes`` raises, and TemplateRefused as ``window_prompts``. ``whole``: the prompt of the whole context
        (``answer_ids``), ``windowed``: the windows and their prompts (``window_prompts``), where the caller built them
        already."""
        started, template, decoding = time.perf_counter(), chat_template(adapter), self.decoding(decoding)
        if whole is None:
            whole = await self.answer_ids(style, context, question, template)
        if not extractive:
            result = await self.outcome(Generation(self.bounded(whole), name_of(adapter), decoding, weights=adapter))
            text = result.text.strip()
            start, end = exact_span(text, context) or (None, None)
            return Answer(text, start, end, result.generated_tokens, None, (time.perf_counter() - started) * 1000)
        ranges, prompts = windowed or await self.window_prompts(context, question, style, template, whole)
        spans = await off_loop(self.window_spans, context, ranges, decoding.max_new_tokens)
        prompt_of = dict(zip(ranges, prompts))
        results = await self.outcomes([Generation(self.bounded(prompt_of[offset, end]), name_of(adapter), decoding,
                                                  constraint=constraint, weights=adapter)
                                       for offset, end, constraint in spans])
        # a span running to a window's cut edge may be a longer answer cut short: it wins only where every one does
        uncut = [i for i, (offset, end, constraint) in enumerate(spans)
                 if constraint.lies_inside(offset > ranges[0][0], end < ranges[-1][1])]
        best = max(uncut or range(len(spans)), key=lambda i: spans[i][2].score())
        offset, _, constraint = spans[best]
        text = context[slice(*(offset + at for at in constraint.span()))]
        start = context.find(text)  # its first occurrence in the whole context, whichever window found it
        return Answer(text, start, start + len(text), results[best].generated_tokens, constraint.score(),
                      (time.perf_counter() - started) * 1000)

    async def answer_ids(self, style: str, context: str, question: str, template: str | None,
                         rendered: str = WHOLE) -> list[int]:
        """``prompt_styles.answer_ids``, built off the event loop (``prompt_ids_of``); ``rendered``: what the prompt
        is for (``WHOLE``, ``ASKED``, ``WINDOW``), as a refusal says it."""
        return await self.prompt_ids_of(style, answer_input(style, context, question), template, rendered)

    async def prompt_ids_of(self, style: str, prompt: Prompt, template: str | None, rendered: str) -> list[int]:
        """``prompt_styles.encoded`` off the event loop: plain text tokenized on a thread, chat messages rendered in a
        template process and awaited, holding no thread (cancelling the caller withdraws a render not begun). Raises
        as it, a TemplateRefused saying what was rendered first: ``rendered``, formatted with ``style``."""
        if isinstance(prompt, str):
            return await off_loop(encode_text, self.tokenizer, prompt)
        require_template(self.tokenizer, style, template)
        try:
            return await renderer(self.tokenizer).rendered(chat_job(prompt, template))
        except TemplateRefused as exc:
            raise type(exc)(f"{rendered.format(style=style)}: {exc}") from None

    async def window_prompts(self, context: str, question: str, style: str, template: str | None,
                             whole: list[int] | None = None) -> Windowed:
        """The character ranges of ``context`` answered apart (``answer_windows``, ``whole`` as there) and the prompt
        of each (``whole`` where the context is one window), in ``style``, rendered together. Raises as
        ``answer_windows``, and TemplateRefused naming every window whose prompt the chat template refuses (a
        template may refuse a window's prompt and not the whole context's: its text cut at a window's edges)."""
        ranges = await self.answer_windows(context, question, style, template, whole)
        if ranges == [(0, len(context))]:
            return ranges, [whole or await self.answer_ids(style, context, question, template)]
        prompts = await asyncio.gather(*(self.answer_ids(style, context[start:end], question, template, WINDOW)
                                         for start, end in ranges), return_exceptions=True)
        refused = [f"window {at + 1} of {len(ranges)} (characters {start} to {end}): {prompt}"
                   for at, ((start, end), prompt) in enumerate(zip(ranges, prompts))
                   if isinstance(prompt, TemplateRefused)]
        failed = [prompt for prompt in prompts if isinstance(prompt, BaseException)]
        if refused and len(refused) == len(failed):
            raise TemplateRefused(f"the context is answered in {len(ranges)} windows, each a prompt of its own; "
                                  f"{'; '.join(refused)}")
        if failed:
            raise failed[0]
        return ranges, prompts

    async def answer_windows(self, context: str, question: str, style: str = ADAPTER_STYLE,
                             template: str | None = None, whole: list[int] | None = None) -> list[tuple[int, int]]:
        """The character ranges of ``context`` answered apart: [(0, len(context))] when its prompt in ``style`` fits
        (``max_prompt``), else windows of its tokens whose prompts do (``windows.windows``), neighbours sharing
        ``settings.window_stride(room)`` tokens; a chat style's prompt rendered with ``template`` (an adapter's, else
        the tokenizer's); ``whole``: the whole context's prompt, where the caller built it already. Raises InputTooLong
        when the question leaves no more room per window than the stride, or the context needs more windows than
        ``max_answer_windows`` or ``max_queue``."""
        if whole is None:
            whole = await self.answer_ids(style, context, question, template)
        if len(whole) <= self.max_prompt:
            return [(0, len(context))]
        asked = len(self.bounded(await self.answer_ids(style, "", question, template, ASKED)))  # no context
        room = self.max_prompt - asked - WINDOW_SLACK
        if room <= 0:
            raise self.too_long(f"the question leaves no room for a context: its prompt takes {asked} tokens, and a "
                                f"window keeps {WINDOW_SLACK} free")
        offsets = (await off_loop(partial(self.tokenizer, add_special_tokens=False, split_special_tokens=True,
                                          return_offsets_mapping=True), context))["offset_mapping"]
        # the windows queue together, all or none (Engine.submit_together): more than the queue holds never would
        stride, most = self.settings.window_stride(room), min(self.settings.max_answer_windows, self.settings.max_queue)
        if room <= stride:
            raise self.too_long(f"the question leaves {room} tokens of context per prompt, no more than the "
                                f"{stride} two windows share")
        ranges = windows(offsets, room, stride)
        if len(ranges) > most:
            raise InputTooLong(f"the context has {len(offsets)} tokens: {len(ranges)} windows of {room}, "
                               f"{stride} shared; at most {most} windows are answered (the least of this server's "
                               "max_answer_windows and max_queue: the windows queue together)",
                               settings=("max_answer_windows", "max_queue"))
        return ranges

    def window_spans(self, context: str, ranges: list[tuple[int, int]],
                     budget: int) -> list[tuple[int, int, SpanConstraint]]:
        """(start, end, its span constraint for answers of at most ``budget`` tokens) for each range of ``context`` a
        span can begin in; NoSpan if none."""
        spans = []
        for start, end in ranges:
            try:
                spans.append((start, end, SpanConstraint(context[start:end], self.span_vocabulary(), budget)))
            except NoSpan:
                if len(ranges) == 1:
                    raise
        if not spans:
            raise NoSpan("the context holds no text an answer could be a span of")
        return spans

    async def nli(self, premise: str, hypothesis: str, adapter: AdapterWeights | None,
                  labels: tuple[str, ...] = NLI_LABELS, style: str = ADAPTER_STYLE,
                  rendered: list[int] | None = None) -> dict[str, float]:
        """Probabilities of ``labels`` (sum to 1), scored as the adapters are trained: by each label's first token, in
        one forward pass (``label_scores``), after the NLI prompt in ``style`` (``prompt_styles``), then
        softmax(z / T) over those scores, T the temperature the adapter's card holds for this label set
        (``lora.card.Calibration``; 1 for the bare base, or without one) in the adapter style it was fitted in, 1 in
        any other. Raises as ``outcome``, InputTooLong for a prompt over ``max_prompt``, ValueError for a chat style
        on a model without a chat template or one_shot for labels it has no example for. ``rendered``: the prompt
        (``nli_ids``), where the caller built it already."""
        scores = await self.label_scores(premise, hypothesis, adapter, labels, style, rendered)
        calibrated = scores.weights is not None and style == ADAPTER_STYLE
        temperature = scores.weights.calibration.temperature_for(labels) if calibrated else 1.0
        return dict(zip(labels, softmax(scores.logprobs, temperature)))

    async def label_scores(self, premise: str, hypothesis: str, adapter: AdapterWeights | None,
                           labels: tuple[str, ...] = NLI_LABELS, style: str = ADAPTER_STYLE,
                           rendered: list[int] | None = None) -> CandidateLogprobs:
        """The log-probabilities of the first tokens of ``labels``' completions after the NLI prompt in ``style``
        (uncalibrated), and the weights that scored them; raises as ``nli``."""
        if labels not in self.label_tokens:
            self.label_tokens[labels] = self.first_tokens(labels)
        prompt = await self.nli_prompt(premise, hypothesis, adapter, labels, style, rendered)
        return await self.outcome(Scoring(prompt, name_of(adapter), self.label_tokens[labels], logprobs=True,
                                          weights=adapter))

    async def nli_prompt(self, premise: str, hypothesis: str, adapter: AdapterWeights | None, labels: tuple[str, ...],
                         style: str, rendered: list[int] | None = None) -> list[int]:
        """The NLI prompt's token ids (``nli_ids``, with the adapter's chat template; ``rendered`` where the caller
        built them already); InputTooLong over ``max_prompt``."""
        if rendered is None:
            rendered = await self.nli_ids(style, premise, hypothesis, labels, chat_template(adapter))
        return self.bounded(rendered)

    async def nli_ids(self, style: str, premise: str, hypothesis: str, labels: Sequence[str],
                      template: str | None) -> list[int]:
        """``prompt_styles.nli_ids``, built off the event loop (``prompt_ids_of``), as ``answer_ids``."""
        return await self.prompt_ids_of(style, nli_input(style, premise, hypothesis, labels), template, PAIR)

    async def classify(self, premise: str, hypothesis: str, adapter: AdapterWeights | None,
                       labels: tuple[str, ...], style: str = ADAPTER_STYLE,
                       rendered: list[int] | None = None) -> dict[str, float]:
        """Probabilities of a request's own ``labels`` (sum to 1): softmax over log P(label completion | prompt), each
        label scored over its whole tokenization (``tasks.labels``: one scoring request per distinct proper prefix of
        the completions) after the NLI prompt in ``style``, with no temperature (a card's is fitted for its own label
        set), all with the same weights (``Engine.submit_together``). Raises ValueError for labels ``labels.label_ids``
        refuses, InputTooLong for labels that need more scoring requests than the queue holds, and as ``nli``
        (``rendered`` too)."""
        sequences = label_ids(self.tokenizer, labels)
        prompt = await self.nli_prompt(premise, hypothesis, adapter, labels, style, rendered)
        candidates = prefix_candidates(sequences)
        if len(candidates) > self.settings.max_queue:  # they queue together, all or none: they would never fit
            raise InputTooLong(f"these labels need {len(candidates)} scoring requests; this server queues at most "
                               f"{self.settings.max_queue} (its max_queue)", settings=("max_queue",))
        works = [Scoring(self.bounded(prompt + list(prefix)), name_of(adapter), tokens, logprobs=True, weights=adapter)
                 for prefix, tokens in candidates.items()]
        results = await self.outcomes(works)
        logprobs = dict(zip(candidates, (result.logprobs for result in results)))
        return dict(zip(labels, softmax(sequence_logprobs(sequences, candidates, logprobs))))

    async def outcomes(self, works: list[Generation | Scoring]) -> list:
        """The engine's results for ``works``, queued together (all or none: QueueFull unless all fit). Raises the
        first failure of any of them; then, or if the caller is cancelled first, the engine drops every one still
        queued or running, as their results would be thrown away."""
        futures = self.engine.submit_together(works)
        try:
            return await asyncio.gather(*map(asyncio.wrap_future, futures))
        except BaseException:
            for future in futures:
                self.engine.abandon(future)
            raise

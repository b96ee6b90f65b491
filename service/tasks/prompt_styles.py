"""Prompt styles: how ``/answer``, ``/nli`` and ``loraswap eval`` ask the model.

``adapter`` (the default) is the plain template the adapters are trained on (``service.tasks.prompts``).
``zero_shot`` and ``one_shot`` are the baselines without training, for the bare base, an instruct model: they are
rendered with the base tokenizer's chat template (the format the model was tuned to follow instructions in), or the
adapter's own where its folder ships one (as ``/v1/chat/completions`` renders its messages), a system
message with the instruction (what to do, the answer format), a user message with the task's fields, and the
assistant's reply begun with ``Answer:`` (QA) or ``Label:`` (NLI). The model continues that reply, so the completion
has the same form as the adapters': `` answer`` ended by end of text (``<|im_end|>`` on SmolLM2) or a newline, and
`` label``, scored by its first token or over its whole tokenization as before. ``one_shot`` puts one worked example,
fixed and taken from the training split (never from dev), as an earlier user / assistant exchange.

Text in the task's fields that spells a control token (``<|im_end|>``) stays text: only the template writes control
tokens (``sanitize_control_tokens``), as the ``adapter`` style encodes its fields as plain text.
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from service.errors import TemplateRefused
from service.tasks.prompts import NLI_LABELS, RTE_LABELS, answer_prompt, encode_text, nli_prompt
from service.tasks.template_sandbox import Job, renderer

if TYPE_CHECKING:  # imported lazily: the CLI's parser reads PROMPT_STYLES without loading transformers
    from transformers import PreTrainedTokenizerBase

PromptStyle = Literal["adapter", "zero_shot", "one_shot"]
PROMPT_STYLES: tuple[str, ...] = get_args(PromptStyle)
ADAPTER_STYLE = "adapter"  # the template the adapters are trained on; the default
Prompt = str | list[dict[str, str]]  # plain text (the adapter style) or chat messages (the chat styles)

ANSWER_INSTRUCTION = ("Answer the question about the context. Reply with the answer alone: the shortest span of the "
                      "context that answers the question, copied from it word for word.")
NLI_INSTRUCTION = ("Read the premise and the hypothesis, and decide how they relate: the premise entails the "
                   "hypothesis (if the premise is true, the hypothesis is true), contradicts it (the hypothesis is "
                   "then false), or neither. Reply with exactly one of these labels: {labels}.")
ANSWER_REPLY = "Answer:"  # the assistant's reply is begun with it; the model writes " answer"
LABEL_REPLY = "Label:"  # and here " label"


@dataclass(frozen=True)
class QaExample:
    context: str
    question: str
    answer: str


@dataclass(frozen=True)
class PairExample:
    premise: str
    hypothesis: str
    label: str


# one_shot's worked examples, each the first row of its task's training split (shared/data/README.md):
# squad/train-v1.1.json.gz, question University_of_Notre_Dame_0_0
SQUAD_EXAMPLE = QaExample(
    context="Architecturally, the school has a Catholic character. Atop the Main Building's gold dome is a golden "
    "statue of the Virgin Mary. Immediately in front of the Main Building and facing it, is a copper statue of "
    "Christ with arms upraised with the legend \"Venite Ad Me Omnes\". Next to the Main Building is the Basilica of "
    "the Sacred Heart. Immediately behind the basilica is the Grotto, a Marian place of prayer and reflection. It is "
    "a replica of the grotto at Lourdes, France where the Virgin Mary reputedly appeared to Saint Bernadette "
    "Soubirous in 1858. At the end of the main drive (and in a direct line that connects through 3 statues and the "
    "Gold Dome), is a simple, modern stone statue of Mary.",
    question="To whom did the Virgin Mary allegedly appear in 1858 in Lourdes France?",
    answer="Saint Bernadette Soubirous")
# nli/mnli.jsonl.gz, the first pair of its train split (pairID 103400n)
MNLI_EXAMPLE = PairExample(
    premise="In Roman times a temple to Jupiter stood here, followed in the fourth century by the first Christian "
    "church, Saint-Etienne.",
    hypothesis="Saint-Etienne, a Christian church, had a temple to Jupiter and performed rituals during Roman times",
    label="contradiction")
# nli/rte_train.jsonl.gz, its first pair (idx 0)
RTE_EXAMPLE = PairExample(premise="No Weapons of Mass Destruction Found in Iraq Yet.",
                          hypothesis="Weapons of Mass Destruction Found in Iraq.", label="not_entailment")
# the label sets one_shot has a worked example for
PAIR_EXAMPLES = {frozenset(NLI_LABELS): MNLI_EXAMPLE, frozenset(RTE_LABELS): RTE_EXAMPLE}


def pair_example(labels: Sequence[str]) -> PairExample:
    """one_shot's worked example for ``labels`` (in any order): MNLI's for the three NLI labels, RTE's for its two.
    Raises ValueError for any other label set: no example is labelled with it."""
    try:
        return PAIR_EXAMPLES[frozenset(labels)]
    except KeyError:
        known = " or ".join(repr(sorted(labels)) for labels in PAIR_EXAMPLES)
        raise ValueError(f"one_shot has a worked example only for the labels {known}") from None


def answer_messages(style: str, context: str, question: str) -> list[dict[str, str]]:
    """The chat messages of a zero_shot or one_shot QA prompt (see the module), the last the assistant's reply
    begun."""
    def asked(context: str, question: str) -> dict[str, str]:
        return {"role": "user", "content": f"Context: {context.strip()}\nQuestion: {question.strip()}"}

    example = SQUAD_EXAMPLE
    shot = [asked(example.context, example.question),
            {"role": "assistant", "content": f"{ANSWER_REPLY} {example.answer}"}] if style == "one_shot" else []
    return [{"role": "system", "content": ANSWER_INSTRUCTION}, *shot, asked(context, question),
            {"role": "assistant", "content": ANSWER_REPLY}]


def nli_messages(style: str, premise: str, hypothesis: str, labels: Sequence[str]) -> list[dict[str, str]]:
    """The chat messages of a zero_shot or one_shot NLI prompt whose reply is one of ``labels`` (named in the
    instruction, in their order), the last the assistant's reply begun. Raises ValueError for one_shot with labels
    it has no example for (``pair_example``)."""
    def asked(premise: str, hypothesis: str) -> dict[str, str]:
        return {"role": "user", "content": f"Premise: {premise.strip()}\nHypothesis: {hypothesis.strip()}"}

    shot = []
    if style == "one_shot":
        example = pair_example(labels)
        shot = [asked(example.premise, example.hypothesis),
                {"role": "assistant", "content": f"{LABEL_REPLY} {example.label}"}]
    instruction = NLI_INSTRUCTION.format(labels=", ".join(labels))
    return [{"role": "system", "content": instruction}, *shot, asked(premise, hypothesis),
            {"role": "assistant", "content": LABEL_REPLY}]


def require_template(tokenizer: PreTrainedTokenizerBase, style: str, template: str | None = None) -> None:
    """Raises ValueError when ``style`` needs a chat template and there is none: neither ``template`` (an adapter's)
    nor the tokenizer's."""
    if style != ADAPTER_STYLE and template is None and tokenizer.chat_template is None:
        raise ValueError(f"prompt_style {style!r} is rendered with the model's chat template, and this model has "
                         "none; use prompt_style 'adapter'")


def chat_job(messages: list[dict[str, str]], template: str | None) -> Job:
    """The render of ``messages`` with ``template`` (an adapter's; None: the tokenizer's) the prompt styles ask for:
    the last message (the assistant's reply, begun) left open for the model to continue (``continue_final_message``).
    Rendered by ``render_ids`` in a template process (``template_sandbox.Renderer``)."""
    return messages, template, {"continue_final_message": True}


def render_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template: str | None,
               rendered: Callable[[], object] = lambda: None, **flags: bool) -> list[int]:
    """``apply_chat_template``'s token ids of ``messages`` with ``template`` (None: the tokenizer's) and ``flags``
    (``add_generation_prompt`` or ``continue_final_message``), text that spells a control token kept as text
    (``sanitize_control_tokens``). TemplateRefused when the template refuses or fails to render them (anything its
    code raises: an adapter's template is the adapter's code), renders no tokens, or does not keep each user message's
    text (``unkept``: a template that renders none of it, or one ``continue_final_message`` cuts before the reply:
    the model would answer what it was never asked). MemoryError is raised as it is. The template renders up to
    ``template_sandbox.RENDERS`` times (the text, the token ids, the marked text; where one fails, ``own_error``'s);
    ``rendered`` is called after each render that ends (a template process starts the next one's deadline there)."""
    text = rendered_text(tokenizer, messages, template, flags, rendered)
    try:
        ids = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False,
                                            sanitize_control_tokens=True, **flags)
    except MemoryError:
        raise
    except Exception as exc:  # the template's own code failed: TemplateError, "Range too big", anything
        rendered()
        raise refusal(own_error(tokenizer, messages, template, flags) or exc) from None
    rendered()
    if not ids:
        raise TemplateRefused("the chat template rendered the messages as no tokens at all")
    fault = unkept(messages, text, rendered_text(tokenizer, marked(messages), template, flags, rendered, MARKED))
    if fault is not None:
        raise TemplateRefused(fault)
    return ids


# what ``render_ids``' marked render is, as its refusal says: not the messages a template that fails on it refused
MARKED = ("a copy of the messages with each user message's text replaced by a marker, rendered only to check that the "
          "template keeps each user's text as it is (the messages themselves rendered)")


def rendered_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template: str | None,
                  flags: dict[str, bool], rendered: Callable[[], object], what: str = "the messages") -> str:
    """``apply_chat_template``'s text of ``messages`` (as ``render_ids``, not tokenized), ``rendered`` called once
    it ends; TemplateRefused when the template refuses or fails on them (``refusal``: of ``what``, the messages in
    words), MemoryError raised as it is."""
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **flags)
    except MemoryError:
        raise
    except Exception as exc:  # the template's own code failed
        rendered()
        raise refusal(own_error(tokenizer, messages, template, flags) or exc, what) from None
    rendered()
    return text


MARKER = re.compile(r"\[\[user-message-(\d+)-[0-9a-f]{32}\]\]")  # a user message's text, replaced (``marked``)


def marked(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """``messages`` with each user message's text replaced by a marker of its index (``MARKER``, a nonce that no
    text of the request holds), the other messages and fields as they are."""
    nonce = secrets.token_hex(16)
    return [{**message, "content": f"[[user-message-{at}-{nonce}]]"} if message["role"] == "user" else message
            for at, message in enumerate(messages)]


def unkept(messages: list[dict[str, str]], text: str, marked_text: str) -> str | None:
    """Why the render ``text`` of ``messages`` does not keep each user message's text, or None when it does.
    ``marked_text`` is the render of ``marked(messages)``: each user's marker must occur in it, in the order of the
    messages (the earliest occurrences: a template that reorders them, or renders once a user message said twice, is
    found out), and ``text`` must be that render with each marker replaced by its message's text, as it is or
    stripped at its ends: so each user's text stands in the prompt where the template put it, whatever a system or an
    assistant message or the template's own text holds. A template whose render depends on the users' text (it
    changes the text, ``lower``; or renders otherwise for another text) cannot be checked, and is refused."""
    pieces = MARKER.split(marked_text)  # text, index, text, index, ..., text
    found = iter(int(at) for at in pieces[1::2])
    for at, message in enumerate(messages):
        if message["role"] == "user" and at not in found:  # the rest of the iterator: in order
            return f"the chat template left out the text of message {at} (a user's): the model would not be asked it"
    return None if kept_verbatim(messages, text, pieces) else (
        "the chat template did not render each user message's text as it is (verbatim, or stripped at its ends), so "
        "whether it kept them cannot be checked: the model might not be asked them")


def kept_verbatim(messages: list[dict[str, str]], text: str, pieces: list[str]) -> bool:
    """Whether ``text`` is the marked render split into ``pieces`` (``unkept``) with each marker replaced by its
    message's text, as it is or stripped at its ends (whichever the next piece follows)."""
    at = len(pieces[0])
    if not text.startswith(pieces[0]):
        return False
    for index, after in zip(pieces[1::2], pieces[2::2]):
        content = messages[int(index)]["content"]
        for said in dict.fromkeys((content, content.strip())):
            if text.startswith(said + after, at):
                at += len(said) + len(after)
                break
        else:
            return False
    return at == len(text)


def refusal(exc: Exception, what: str = "the messages") -> TemplateRefused:
    """The refusal of ``what`` (messages, in words), whose render raised ``exc``."""
    return TemplateRefused(f"the chat template refused {what}: {type(exc).__name__}: {exc}")


def own_error(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template: str | None,
              flags: dict[str, bool]) -> Exception | None:
    """What the template itself raises on ``messages``, where a render with ``continue_final_message`` failed: that
    flag's checks may fail first (transformers refuses, before rendering, a template whose code does not name the
    final message's ``content``: ``{{ raise_exception('x') }}`` was reported as transformers' complaint, not as
    ``x``), so the messages are rendered again without it. None when that render raises nothing (the flag's own
    failure is the reason) or the render had no such flag. MemoryError is raised as it is."""
    if not flags.get("continue_final_message"):
        return None
    try:
        tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except MemoryError:
        raise
    except Exception as exc:  # the template's own code failed
        return exc
    return None


def answer_input(style: str, context: str, question: str) -> Prompt:
    """The QA prompt in ``style``: ``answer_prompt``'s plain text for adapter, else ``answer_messages``."""
    return answer_prompt(context, question) if style == ADAPTER_STYLE else answer_messages(style, context, question)


def nli_input(style: str, premise: str, hypothesis: str, labels: Sequence[str]) -> Prompt:
    """The NLI prompt in ``style``: ``nli_prompt``'s plain text for adapter, else ``nli_messages`` (ValueError for
    one_shot with labels it has no example for)."""
    return nli_prompt(premise, hypothesis) if style == ADAPTER_STYLE else nli_messages(style, premise, hypothesis,
                                                                                        labels)


def encoded(tokenizer: PreTrainedTokenizerBase, style: str, prompt: Prompt, template: str | None = None) -> list[int]:
    """A prompt's token ids: plain text encoded as text, chat messages rendered (``chat_job``) with ``template`` (an
    adapter's), else the tokenizer's chat template, in a template process, waiting for it (blocking: the service
    awaits its renders, ``Tasks.prompt_ids_of``). Raises ValueError for a chat style without a chat template,
    TemplateRefused as ``render_ids`` and when the render runs past the deadline or the memory bound, TemplateBacklog
    when the template is a slow one with as many prompts waiting as are queued for it (``Renderer.submit``)."""
    if isinstance(prompt, str):
        return encode_text(tokenizer, prompt)
    require_template(tokenizer, style, template)
    return renderer(tokenizer).render(chat_job(prompt, template))


def answer_ids(tokenizer: PreTrainedTokenizerBase, style: str, context: str, question: str,
               template: str | None = None) -> list[int]:
    """The QA prompt's token ids in ``style`` (``answer_input``, ``encoded``); raises as they do."""
    return encoded(tokenizer, style, answer_input(style, context, question), template)


def nli_ids(tokenizer: PreTrainedTokenizerBase, style: str, premise: str, hypothesis: str,
            labels: Sequence[str], template: str | None = None) -> list[int]:
    """The NLI prompt's token ids in ``style`` (``nli_input``, ``encoded``); raises as they do."""
    return encoded(tokenizer, style, nli_input(style, premise, hypothesis, labels), template)

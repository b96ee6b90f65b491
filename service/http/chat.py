"""Chat messages to prompt token ids, through a chat template: the adapter folder's, else the base tokenizer's."""
from __future__ import annotations

from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from service.errors import InputTooLong, TemplateRefused
from service.http.late_checks import LateProblems, problem, template_refused
from service.tasks.template_sandbox import renderer


async def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template: str | None,
                      max_tokens: int) -> list[int]:
    """The prompt's token ids: ``messages`` (``[{"role", "content", "name"?}]``, the name where a message has one, as
    vLLM passes it) rendered by ``apply_chat_template`` with the assistant's turn opened (``add_generation_prompt``),
    with ``template`` (None: the tokenizer's own). Text in the messages that spells a control token (``<|im_end|>``)
    is encoded as the characters it is (``sanitize_control_tokens``), so that no message can end its turn or forge
    another's; only the template writes control tokens. The render runs in a chat template process
    (``template_sandbox``), awaited without holding a thread; cancelling the caller withdraws a render not started.

    Raises InputTooLong, before rendering, when the messages hold more characters than ``max_tokens`` tokens can
    (``longest_token``: a message's text is encoded as ordinary text; its content only, as a template may leave out a
    ``name``); LateProblems, a 422 naming ``model`` (code ``no_chat_template``) when there is no template, and naming
    ``messages`` (code ``template_refused``) when the template refuses the messages (its ``raise_exception``: roles
    out of order, a system message where it takes none) or fails on them (anything its code raises: the template is
    the adapter's), renders no tokens, or leaves out a user message's text (``prompt_styles.render_ids``), or runs
    past the render's bounds; RenderUnavailable (a 503) when the server could not render it, for trouble not the
    template's (its process killed or frozen from outside, or not started: ``template_sandbox``); TemplateBacklog (a
    429) when the template is a slow one with as many prompts waiting as are queued for it; EngineStopped when the
    service shuts down before the render began."""
    if template is None and tokenizer.chat_template is None:
        raise LateProblems([problem("model", None, "no_chat_template", "this model has no chat template, and the "
                                    "adapter's folder ships none; send the prompt as text to /v1/completions")])
    characters, most = sum(len(message["content"]) for message in messages), max_tokens * longest_token(tokenizer)
    if characters > most:
        raise InputTooLong(f"the messages have {characters} characters: more than {max_tokens} tokens (at most "
                           f"{most} characters) can hold; at most {max_tokens} are accepted")
    try:
        job = (messages, template, {"add_generation_prompt": True})
        return await renderer(tokenizer).rendered(job)
    except TemplateRefused as exc:
        raise template_refused("messages", messages, exc) from None


@lru_cache(maxsize=8)
def longest_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters one token of ``tokenizer`` decodes to, at most: the longest entry of its vocabulary, whose
    byte-level (or SentencePiece) spelling has at least as many characters as the text it stands for."""
    return max(map(len, tokenizer.get_vocab()))

"""Chat messages to prompt token ids, through a chat template: the adapter folder's, else the base tokenizer's."""
from __future__ import annotations

from fastapi import HTTPException
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template: str | None) -> list[int]:
    """The prompt's token ids: ``messages`` (``[{"role", "content"}]``) rendered by ``apply_chat_template`` with the
    assistant's turn opened (``add_generation_prompt``), with ``template`` (None: the tokenizer's own). Text in the
    messages that spells a control token (``<|im_end|>``) is encoded as the characters it is
    (``sanitize_control_tokens``), so that no message can end its turn or forge another's; only the template writes
    control tokens. Raises HTTPException 422 when there is no template, or when the template refuses the messages
    (its ``raise_exception``: roles out of order, a system message where it takes none)."""
    if template is None and tokenizer.chat_template is None:
        raise HTTPException(422, "this model has no chat template, and the adapter's folder ships none; send the "
                            "prompt as text to /v1/completions")
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=True, return_dict=False, sanitize_control_tokens=True)
    except TemplateError as exc:
        raise HTTPException(422, f"the chat template refused the messages: {exc}") from None

"""What ends a generation, and what it leaves: end-of-text and newline tokens, and the finished text."""
from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.engine.requests import Generation, GenerationResult


class Endings:
    """The tokens that end generations on one model (end of text: the tokenizer's and the generation config's;
    newline: every token whose text holds one), and the result a finished generation gives."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        configured = getattr(model.generation_config, "eos_token_id", None)
        self.eos_ids = {tokenizer.eos_token_id, *([configured] if isinstance(configured, int) else configured or [])}
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.newline_ids = {i for i, piece in enumerate(vocab)
                            if piece and "\n" in tokenizer.convert_tokens_to_string([piece])}

    def ends_text(self, work: Generation, token: int) -> bool:
        """Whether ``token`` is an end-of-text token that stops ``work`` (it is then no part of its text or token ids,
        but counts as generated and is handed to a listener marked so: ``SampledToken.ends_text``)."""
        return token in self.eos_ids and not work.ignore_eos

    def is_stop(self, work: Generation, token: int) -> bool:
        """Whether ``token`` ends ``work`` with finish reason "stop" (end of text, or a newline where it stops)."""
        return self.ends_text(work, token) or (work.stop_at_newline and token in self.newline_ids)

    def result(self, work: Generation, tokens: list[int], reason: str, first_token_seconds: float) -> GenerationResult:
        """The finished generation of ``tokens`` (all it generated): those without an ending end-of-text token, their
        text (cut at the first newline where ``work`` stops there), ``reason`` ("stop" or "length") and the seconds to
        its first token."""
        generated = len(tokens)
        if reason == "stop" and self.ends_text(work, tokens[-1]):
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if work.stop_at_newline:
            text = text.split("\n", 1)[0]
        return GenerationResult(text, tokens, reason, first_token_seconds, len(work.prompt_ids), generated)

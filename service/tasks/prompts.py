"""Prompt templates shared by training and serving, so a model is served as it was trained."""
from __future__ import annotations

NLI_LABELS = ("entailment", "neutral", "contradiction")
RTE_LABELS = ("entailment", "not_entailment")
ANSWER_STOP = "\n"


def answer_prompt(context: str, question: str) -> str:
    """Prompt for extractive QA; the model continues with `` answer\\n``."""
    return f"Context: {context.strip()}\nQuestion: {question.strip()}\nAnswer:"


def answer_target(answer: str) -> str:
    """Completion the QA prompt is trained to produce."""
    return f" {answer.strip()}{ANSWER_STOP}"


def nli_prompt(premise: str, hypothesis: str) -> str:
    """Prompt for premise/hypothesis classification; the model continues with `` label``."""
    return f"Premise: {premise.strip()}\nHypothesis: {hypothesis.strip()}\nRelation:"


def label_target(label: str) -> str:
    """Completion the NLI prompt is trained to produce (scored by its first token)."""
    return f" {label}"


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of task text (a filled template) as plain text: no special tokens added, and text that spells a
    special token (``<|im_end|>``) encoded as the characters it is, never as the control token. Training and the
    task routes both encode this way."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

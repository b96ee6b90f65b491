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

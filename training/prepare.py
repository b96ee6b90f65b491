"""Tokenise task rows with the shared prompt templates: loss only on the target tokens.

SQuAD: input = answer_prompt + answer_target; the loss covers the answer tokens and the stop
newline. Too long an example is cut by priority: the whole answer is kept, then the whole
question, then a window of the CONTEXT around the answer span (text dropped from both ends as
needed, never the answer). NLI/RTE: input = nli_prompt + label_target, loss on the label tokens.
"""
from __future__ import annotations

from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from service.tasks.prompts import (
    NLI_LABELS,
    RTE_LABELS,
    answer_prompt,
    answer_target,
    encode_text,
    label_target,
    nli_prompt,
)

IGNORE_INDEX = -100
TASK_LABELS = {"nli": NLI_LABELS, "rte": RTE_LABELS}


def join(prompt_ids: list[int], target_ids: list[int]) -> dict[str, list[int]]:
    """One training example: the loss is masked (-100) on every prompt token."""
    return {
        "input_ids": prompt_ids + target_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(target_ids)),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def answer_window(a: int, b: int, n: int, budget: int) -> tuple[int, int]:
    """Token window [lo, hi) of at most ``budget`` tokens out of ``n`` that holds the answer [a, b),
    centred on it where both sides have room, shifted to one side where the other runs out."""
    spare = budget - (b - a)
    lo = max(0, a - spare // 2)
    hi = min(n, lo + budget)
    return max(0, hi - budget), hi


def encode_squad(example: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict | None:
    """Tokenise one SQuAD row (its first answer); None when even question + answer do not fit."""
    context, question, answer = example["context"], example["question"], example["answers"][0]
    start = example["answer_starts"][0]
    if context[start : start + len(answer)] != answer:
        start = context.find(answer)
        if start < 0:
            return None
    end = start + len(answer)
    target = encode_text(tokenizer, answer_target(answer))
    prompt = encode_text(tokenizer, answer_prompt(context, question))
    if len(prompt) + len(target) <= max_length:
        return join(prompt, target)

    offsets = tokenizer(context, return_offsets_mapping=True, add_special_tokens=False,
                        split_special_tokens=True)["offset_mapping"]
    n = len(offsets)
    a = next(i for i, (_, e) in enumerate(offsets) if e > start)  # first token touching the answer
    b = 1 + max(i for i, (s, _) in enumerate(offsets) if s < end)  # one past the last one
    budget = max_length - len(target) - (len(prompt) - n)  # context tokens that fit beside the rest
    while budget >= b - a:
        lo, hi = answer_window(a, b, n, budget)
        prompt = encode_text(tokenizer, answer_prompt(context[offsets[lo][0] : offsets[hi - 1][1]], question))
        excess = len(prompt) + len(target) - max_length
        if excess <= 0:
            return join(prompt, target)
        budget -= excess  # cutting text can re-tokenise its edges differently: shrink and retry
    return None


def encode_label(example: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict | None:
    """Tokenise one premise/hypothesis/label row; None when it does not fit in ``max_length``."""
    prompt = encode_text(tokenizer, nli_prompt(example["premise"], example["hypothesis"]))
    target = encode_text(tokenizer, label_target(example["label"]))
    return join(prompt, target) if len(prompt) + len(target) <= max_length else None


def encode_rows(
    task: str, rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[dict], int]:
    """Tokenise a task's rows; returns the examples and how many rows were dropped (too long, bad label)."""
    labels = TASK_LABELS.get(task)
    encode = encode_squad if task == "squad" else encode_label
    encoded = []
    for row in rows:
        if labels is not None and row["label"] not in labels:
            continue
        example = encode(row, tokenizer, max_length)
        if example is not None:
            encoded.append(example)
    return encoded, len(rows) - len(encoded)


def collator(tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> DataCollatorForSeq2Seq:
    """Dynamic padding to the longest example of each batch; padded labels are -100."""
    return DataCollatorForSeq2Seq(
        tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of
    )

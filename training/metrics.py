"""Task metrics: SQuAD v1.1 exact match and F1 (as the official script), accuracy and confusion matrix, and the
calibration of label probabilities (reliability bins, expected calibration error)."""
from __future__ import annotations

import math
import re
import string
from collections import Counter

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace (official v1.1 order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised prediction and reference are equal (``normalize_answer``), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1(prediction: str, reference: str) -> float:
    """Token F1 in [0, 1] between the normalised prediction and reference (bags of words)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """EM and F1 in percent, each the max over a question's references, averaged over ``references``;
    a question without a prediction scores 0 (as in the official script)."""
    em = f = 0.0
    for qid, answers in references.items():
        if qid in predictions:
            em += max(exact_match(predictions[qid], a) for a in answers)
            f += max(f1(predictions[qid], a) for a in answers)
    n = max(len(references), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f / n, "count": len(references)}


def accuracy(predictions: list[str], golds: list[str]) -> float:
    """Share of predictions equal to their gold label, in percent (0 for none). Raises ValueError when the two lists
    differ in length."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold labels")
    return 100.0 * sum(p == g for p, g in zip(predictions, golds)) / max(len(golds), 1)


def confusion_matrix(predictions: list[str], golds: list[str], labels: list[str] | tuple[str, ...]) -> list[list[int]]:
    """``matrix[i][j]`` counts rows whose gold is ``labels[i]`` and prediction ``labels[j]``. Raises KeyError for a
    gold or predicted label not in ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for p, g in zip(predictions, golds):
        matrix[index[g]][index[p]] += 1
    return matrix


ECE_BINS = 15  # Guo et al. 2017's number of equal-width confidence bins


def reliability_bins(confidences: list[float], correct: list[bool], bins: int = ECE_BINS) -> list[dict]:
    """The predictions in each of ``bins`` equal-width confidence intervals (0, 1/bins], (1/bins, 2/bins], ...,
    ((bins-1)/bins, 1] (a confidence of 0 counts in the first): per bin its bounds, ``count``, ``accuracy`` (the share
    correct, in [0, 1]) and ``confidence`` (the mean confidence), the last two None for an empty bin. ``confidences``:
    each prediction's probability of its predicted label; ``correct``: whether it was the gold one. Raises ValueError
    when the two lists differ in length or a confidence lies outside [0, 1]."""
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences for {len(correct)} outcomes")
    if any(not 0.0 <= c <= 1.0 for c in confidences):
        raise ValueError("confidences must lie in [0, 1]")
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, confidence in enumerate(confidences):
        members[max(0, min(bins - 1, math.ceil(confidence * bins) - 1))].append(i)
    return [{"low": b / bins, "high": (b + 1) / bins, "count": len(rows),
             "accuracy": sum(correct[i] for i in rows) / len(rows) if rows else None,
             "confidence": sum(confidences[i] for i in rows) / len(rows) if rows else None}
            for b, rows in enumerate(members)]


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = ECE_BINS) -> float:
    """ECE in percent (Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3): the sum over the equal-width
    confidence bins B_m of |B_m| / n * |accuracy(B_m) - mean confidence(B_m)| (``reliability_bins``); 0 for no
    predictions. Raises as ``reliability_bins``."""
    n = max(len(confidences), 1)
    return 100.0 * sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                       for b in reliability_bins(confidences, correct, bins) if b["count"])

"""SQuAD v1.1 EM/F1 and classification metrics against hand-computed cases."""
from __future__ import annotations

import pytest

from training.metrics import (
    accuracy,
    confusion_matrix,
    exact_match,
    expected_calibration_error,
    f1,
    normalize_answer,
    reliability_bins,
    squad_scores,
)


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The Denver Broncos!", "denver broncos"),
        ("  an   apple,  a pear ", "apple pear"),
        ("Theatre", "theatre"),  # 'the' only as a whole word
        ("U.S.A.", "usa"),
        ("rock 'n' roll", "rock n roll"),
        ("", ""),
    ],
)
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_ignores_case_punctuation_and_articles():
    assert exact_match("the Broncos.", "Broncos") == 1.0
    assert exact_match("Denver Broncos", "Broncos") == 0.0


def test_f1_by_hand():
    # prediction tokens: denver broncos won (3); reference: broncos (1); common 1
    # precision 1/3, recall 1, F1 = 2 * (1/3) / (4/3) = 0.5
    assert f1("Denver Broncos won", "the Broncos") == pytest.approx(0.5)
    # repeated tokens count by multiplicity: pred "a b b" -> [b, b] after the article goes, ref "b c"
    # common 1, precision 1/2, recall 1/2, F1 0.5
    assert f1("a b b", "b c") == pytest.approx(0.5)
    assert f1("nothing shared", "else") == 0.0
    assert f1("", "") == 0.0  # v1.1: no common token scores 0, even for two empty answers


def test_squad_scores_take_the_max_over_references_and_count_missing_as_zero():
    references = {
        "q1": ["Denver Broncos", "Broncos"],  # EM 1 (second reference), F1 1
        "q2": ["Carolina Panthers"],  # "Panthers": EM 0, F1 = 2 * 1 * 0.5 / 1.5 = 2/3
        "q3": ["Santa Clara"],  # no prediction: 0 and 0
    }
    predictions = {"q1": "the broncos", "q2": "Panthers", "extra": "ignored"}
    scores = squad_scores(predictions, references)
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert scores["count"] == 3


def test_accuracy_and_confusion_matrix():
    labels = ("entailment", "neutral", "contradiction")
    golds = ["entailment", "entailment", "neutral", "contradiction", "contradiction"]
    preds = ["entailment", "neutral", "neutral", "entailment", "contradiction"]
    assert accuracy(preds, golds) == pytest.approx(60.0)
    assert confusion_matrix(preds, golds, labels) == [
        [1, 1, 0],  # gold entailment
        [0, 1, 0],  # gold neutral
        [1, 0, 1],  # gold contradiction
    ]
    with pytest.raises(ValueError):
        accuracy(preds, golds[:-1])


def test_reliability_bins_are_equal_width_and_closed_on_the_right():
    # 15 bins of width 1/15: (0, 1/15], (1/15, 2/15], ... (14/15, 1]; 0 counts in the first
    bins = reliability_bins([0.0, 1 / 15, 0.07, 0.5, 1.0], [True, False, True, True, False])
    assert len(bins) == 15 and bins[0]["low"] == 0.0 and bins[-1]["high"] == 1.0
    assert [b["count"] for b in bins] == [2, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert bins[0]["accuracy"] == 0.5 and bins[0]["confidence"] == pytest.approx(1 / 30)
    assert bins[2]["accuracy"] is None and bins[2]["confidence"] is None


def test_expected_calibration_error_by_hand():
    # bin (0.6, 0.667]: confidences 0.62, 0.64, one right of two -> |0.5 - 0.63| = 0.13, weight 2/5
    # bin (0.933, 1]:   0.95, 0.97, 0.99, all right -> |1 - 0.97| = 0.03, weight 3/5
    # ECE = 0.4 * 0.13 + 0.6 * 0.03 = 0.07 -> 7 %
    confidences, correct = [0.62, 0.64, 0.95, 0.97, 0.99], [True, False, True, True, True]
    assert expected_calibration_error(confidences, correct) == pytest.approx(7.0)
    assert expected_calibration_error([0.6] * 5, [True, True, True, False, False]) == pytest.approx(0.0)
    assert expected_calibration_error([], []) == 0.0
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [True, False])
    with pytest.raises(ValueError):
        expected_calibration_error([1.5], [True])

"""Fitting the temperature of label probabilities (training/calibrate.py): the fit finds the temperature that made
the labels, and the fit's rows are the MNLI rows ``loraswap train`` held out."""
from __future__ import annotations

import gzip
import json
import os
import shutil

import pytest
import torch

from service.cli.command import UsageError
from training.calibrate import FIT_FILE, card_of, fit_temperature, fitted, held_out_rows, nll, split_of
from training.train import split_rows


def test_fit_temperature_recovers_the_temperature_that_drew_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 3, generator=generator, dtype=torch.float64) * 3
    gold = torch.multinomial((logits / 2.5).softmax(-1), 1, generator=generator).squeeze(1)
    temperature = fit_temperature(logits, gold)
    assert temperature == pytest.approx(2.5, rel=0.05)
    best = nll(logits, gold, temperature)
    assert best <= nll(logits, gold, temperature * 1.01) and best <= nll(logits, gold, temperature / 1.01)
    assert best < nll(logits, gold, 1.0)


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def test_held_out_rows_are_the_mnli_rows_train_held_out_and_never_trained_on(tmp_path):
    labels = ("entailment", "neutral", "contradiction")
    snli = [{"premise": f"s{i}", "hypothesis": f"h{i}", "label": labels[i % 3]} for i in range(40)]
    mnli = [{"premise": f"m{i % 25}", "hypothesis": f"h{i % 25}", "label": labels[i % 3],  # 5 pairs twice
             "mnli_split": ("train", "dev_mismatched", "dev_matched")[i % 3]} for i in range(45)]
    write_rows(tmp_path / "nli/snli_test.jsonl.gz", snli)
    write_rows(tmp_path / FIT_FILE, mnli)
    kept = [row for row in mnli if row["mnli_split"] != "dev_matched"]
    card = {"examples": {"validation": 20, "available": len(snli) + len(kept), "dropped_too_long_or_bad_label": 0},
            "hyperparameters": {"seed": 3}, "task": "nli"}
    rows = held_out_rows(split_of(card), tmp_path)
    pairs = {(row["premise"], row["hypothesis"]) for row in rows}
    trained, held = split_rows([*snli, *kept], 20, 3)  # the same rows in the same order: the same split
    trained_pairs = {(row["premise"], row["hypothesis"]) for row in trained}
    assert rows and all(row["premise"].startswith("m") for row in rows)  # MNLI only, never dev_matched
    assert not pairs & trained_pairs
    assert len(rows) < sum(row["premise"].startswith("m") for row in held)  # a held-out pair was also trained on
    assert pairs == {(row["premise"], row["hypothesis"]) for row in held if row["premise"].startswith("m")} - \
        trained_pairs
    with pytest.raises(UsageError, match="cannot be told"):
        held_out_rows(split_of({**card, "examples": {**card["examples"], "available": 1000}}), tmp_path)
    with pytest.raises(UsageError, match="nothing to fit"):  # trained with --eval-examples 0: a traceback was
        held_out_rows(split_of({**card, "examples": {**card["examples"], "validation": 0}}), tmp_path)
    with pytest.raises(UsageError, match="only an nli adapter"):
        held_out_rows(split_of({**card, "task": "squad"}), tmp_path)
    for broken in ({"task": "nli"}, {**card, "examples": [1]}, {**card, "hyperparameters": {}},
                   *({**card, "examples": {**card["examples"], "validation": value}} for value in ("20", 3.5, True, -1,
                                                                                              10**30))):
        with pytest.raises(UsageError, match="does not say"):  # each was a traceback
            held_out_rows(split_of(broken), tmp_path)


def test_a_temperature_at_the_lower_bound_is_not_written_and_one_inside_or_at_the_upper_is():
    with pytest.raises(UsageError, match="lower bound"):
        fitted(fit_temperature(torch.tensor([[5.0, 0.0], [0.0, 5.0]], dtype=torch.float64), torch.tensor([0, 1])), 2)
    fitted(2.5, 100)
    fitted(20.0, 100)


def test_a_card_is_read_as_the_server_reads_it(tmp_path):
    """A key named twice refuses the adapter in the server (``strict_json``); calibrate read the last value and
    --write-card wrote the card back without the other."""
    (tmp_path / "card.json").write_text('{"task": "rte", "task": "nli"}')
    with pytest.raises(UsageError, match="appears 2 times"):
        card_of(tmp_path)
    (tmp_path / "card.json").write_text('{"task": "nli"}')
    assert card_of(tmp_path) == {"task": "nli"}


@pytest.mark.parametrize("make,message", [
    (lambda card: card.mkdir(), "card.json: the adapter's card.json is not a regular file"),  # was IsADirectoryError
    (lambda card: card.symlink_to(card.name), "card.json is a symlink that cannot be followed (a loop)"),  # was ELOOP
    (lambda card: card.symlink_to(card.parent.parent / "elsewhere.json"), "card.json is a symlink to a file outside "
     "the adapter folder"),
    (lambda card: card.write_text('{"a": "' + "x" * 2**20 + '"}'), "card.json: the adapter's card.json has 1048585 "
     "bytes, more than the 1048576 it may have"),
    (lambda card: card.write_text("[1]"), "card.json is not a JSON object"),
    (lambda card: os.mkfifo(card), "card.json: the adapter's card.json is not a regular file"),  # was read forever
], ids=["folder", "loop", "outside", "too_large", "not_object", "fifo"])
def test_a_card_the_server_refuses_is_a_usage_error(tmp_path, make, message):
    """A review: calibrate read card.json whole with a plain open, not as the server reads it (``card.read_card``):
    a FIFO hung it, a folder or a symlink loop was a traceback."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (tmp_path / "elsewhere.json").write_text('{"task": "nli"}')
    make(folder / "card.json")
    with pytest.raises(UsageError) as refused:
        card_of(folder)
    assert str(refused.value) == f"{folder}/{message}"
    shutil.rmtree(folder)
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no card\.json"):
        card_of(folder)

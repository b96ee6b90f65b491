"""``loraswap calibrate`` and the ECE of ``loraswap eval`` end to end on the tiny Llama: the temperature the command
fits and writes into the card is the one the server then applies, and eval's ECE is that of the served
probabilities."""
from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import pytest

from service.cli.main import main
from service.lora.card import CALIBRATION_FIELD, CARD_FILE
from service.model.base_model import sha256_of
from service.tasks.prompts import NLI_LABELS
from training.metrics import ECE_BINS


def write_nli(path: Path, prefix: str, count: int, split: str | None = None) -> list[dict]:
    """``count`` premise/hypothesis rows (labels in turn) as gzipped JSON lines; an MNLI split if ``split``."""
    rows = [{"premise": f"{prefix} man sits on bench {i}.", "hypothesis": f"Someone sits {i % 7}.",
             "label": NLI_LABELS[i % 3], **({"mnli_split": split} if split else {})} for i in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def data_folder(root: Path) -> Path:
    """A data folder: 12 SNLI rows, MNLI 30 train, 9 dev_mismatched and 24 dev_matched rows."""
    write_nli(root / "nli/snli_test.jsonl.gz", "A", 12)
    mnli = [row for split, count in (("train", 30), ("dev_mismatched", 9), ("dev_matched", 24))
            for row in write_nli(root / f"{split}.jsonl.gz", f"M {split}", count, split)]
    with gzip.open(root / "nli/mnli.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in mnli)
    return root


def carded(source: Path, folder: Path, card: dict) -> Path:
    shutil.copytree(source, folder)
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


def run(*args: str) -> None:
    main([*args, "--device", "cpu"])


def identity(adapter: Path, card: dict | None) -> dict:
    """What a report names the adapter folder ``adapter`` by (``named_adapter.adapter_identity``), ``card`` the part of
    its card that names it."""
    return {"path": str(adapter.resolve()), "weights_sha256": sha256_of(adapter / "adapter_model.safetensors"),
            "card": card}


def test_calibrate_writes_the_temperature_the_server_then_applies(tiny_llama_dir, llama_adapters, tmp_path,
                                                                  monkeypatch):
    """A review: the report named the adapter as --adapter gave it (here a path relative to where calibrate ran), and
    the card's ``label_calibration.data`` the fit file relative to the data folder, which the report names in full."""
    data = data_folder(tmp_path / "data")
    card = {"examples": {"train": 30, "validation": 21, "dropped_too_long_or_bad_label": 0, "available": 51},
            "hyperparameters": {"seed": 0}, "task": "nli"}
    adapter = carded(llama_adapters["one"], tmp_path / "adapters" / "one", card)
    report_path, diagram = tmp_path / "calibration.json", tmp_path / "reliability.png"
    monkeypatch.chdir(tmp_path)
    run("calibrate", "--adapter", "adapters/one", "--data-dir", str(data), "--base-model", str(tiny_llama_dir),
        "--adapters-dir", str(tmp_path / "adapters"), "--write-card", "--diagram", str(diagram),
        "--json", str(report_path))
    report, written = json.loads(report_path.read_text()), json.loads((adapter / CARD_FILE).read_text())
    field = written[CALIBRATION_FIELD]
    assert field["temperature"] == pytest.approx(report["temperature"], rel=1e-5)
    assert field["labels"] == list(NLI_LABELS)
    assert report["engine"]["base_model"] == str(tiny_llama_dir) and "max_input_tokens" in report["engine"]  # as eval
    mnli = str((data / "nli" / "mnli.jsonl.gz").resolve())
    assert report["data"] == {"fit": mnli, "dev": mnli}  # the files read, wherever --data-dir put them
    assert field["data"].startswith(f"{mnli} (train+dev_mismatched): ") and field["mnli_dev_matched"]["data"] == mnli
    assert report["adapter"] == identity(adapter, {"task": "nli"})
    assert 0 < report["fit"]["count"] == field["count"] <= 21 and report["fit"]["after"] <= report["fit"]["before"]
    assert report["mnli_dev_matched"]["after"]["count"] == 24 and diagram.stat().st_size > 0
    assert written["examples"] == card["examples"]  # the rest of the card is kept

    evaluated = tmp_path / "eval.json"
    run("eval", "--task", "nli", "--adapter", str(adapter), "--base-model", str(tiny_llama_dir), "--adapters-dir",
        str(tmp_path / "adapters"), "--data", str(data / "nli/mnli.jsonl.gz"), "--json", str(evaluated))
    served = json.loads(evaluated.read_text())
    assert served["ece_bins"] == ECE_BINS and served["count"] == 24
    assert served["ece"] == pytest.approx(report["mnli_dev_matched"]["after"]["ece"], abs=1e-3)
    assert served["accuracy"] == pytest.approx(report["mnli_dev_matched"]["before"]["accuracy"])


def test_an_adapter_is_named_in_the_adapters_folder_and_a_card_that_is_not_json_is_a_usage_error(
        tiny_llama_dir, llama_adapters, tmp_path, capsys):
    """``--adapters-dir``'s help said ``--adapter NAME`` is looked up there; it was not (a review)."""
    data = data_folder(tmp_path / "data")
    card = {"examples": {"train": 30, "validation": 21, "dropped_too_long_or_bad_label": 0, "available": 51},
            "hyperparameters": {"seed": 0}, "task": "nli"}
    adapter = carded(llama_adapters["one"], tmp_path / "adapters" / "one", card)
    report = tmp_path / "report.json"
    run("calibrate", "--adapter", "one", "--adapters-dir", str(tmp_path / "adapters"), "--data-dir", str(data),
        "--base-model", str(tiny_llama_dir), "--json", str(report))
    assert json.loads(report.read_text())["adapter"] == identity(adapter, {"task": "nli"})
    (adapter / CARD_FILE).write_text("{not json")
    with pytest.raises(SystemExit) as exited:
        run("calibrate", "--adapter", str(adapter), "--data-dir", str(data), "--base-model", str(tiny_llama_dir))
    assert exited.value.code == 2 and "card.json cannot be read" in capsys.readouterr().err


def test_calibrates_start_warnings_name_its_settings_as_given(tiny_llama_dir, llama_adapters, tmp_path, caplog):
    """A review: its runtime's warnings named Settings fields (nli_adapter, max_input_tokens), which calibrate takes
    from their variables."""
    card = {"examples": {"train": 30, "validation": 21, "dropped_too_long_or_bad_label": 0, "available": 51},
            "hyperparameters": {"seed": 0}, "task": "nli"}
    adapter = carded(llama_adapters["one"], tmp_path / "adapters" / "one", card)
    caplog.set_level(logging.WARNING, logger="service.runtime")
    run("calibrate", "--adapter", str(adapter), "--data-dir", str(data_folder(tmp_path / "data")), "--base-model",
        str(tiny_llama_dir), "--adapters-dir", str(tmp_path / "adapters"))
    warned = [record.getMessage() for record in caplog.records if record.name == "service.runtime"]
    assert any(line.endswith("tokens, not LORASWAP_MAX_INPUT_TOKENS 1024") for line in warned), warned
    assert any(line.startswith("LORASWAP_NLI_ADAPTER 'nli' is not registered") for line in warned), warned


def test_a_folder_named_as_the_bare_base_is_calibrated_as_the_folder_it_is(tiny_llama_dir, llama_adapters, tmp_path,
                                                                          monkeypatch):
    """A review: ``--adapter Base --adapters-dir DIR`` (and ``--adapter none``, a folder of that name in the working
    directory) scored the bare base, and ``--write-card`` wrote the base's temperature into the adapter's card."""
    data = data_folder(tmp_path / "data")
    card = {"examples": {"train": 30, "validation": 21, "dropped_too_long_or_bad_label": 0, "available": 51},
            "hyperparameters": {"seed": 0}, "task": "nli"}
    adapters = tmp_path / "adapters"
    for name in ("Base", "none"):
        carded(llama_adapters["one"], adapters / name, card)
    monkeypatch.chdir(adapters)
    scores = {}
    for given in ("Base", "none", str(adapters / "Base")):
        report = tmp_path / f"{len(scores)}.json"
        run("calibrate", "--adapter", given, "--adapters-dir", str(adapters), "--data-dir", str(data),
            "--base-model", str(tiny_llama_dir), "--json", str(report))
        given_scores = json.loads(report.read_text())["scores"]
        scores[given] = [score for rows in ("fit", "mnli_dev_matched") for row in given_scores[rows] for score in row]
    folder = scores[str(adapters / "Base")]  # the engine batches as requests come: float rounding differs a little
    assert scores["Base"] == pytest.approx(folder, abs=1e-4) and scores["none"] == pytest.approx(folder, abs=1e-4)


def test_an_adapter_with_no_held_out_pairs_is_a_usage_error_not_a_traceback(tiny_llama_dir, llama_adapters,
                                                                             tmp_path, capsys):
    """Trained with ``--eval-examples 0``, an adapter has no pairs to fit on: exit status 2 and one line."""
    data = data_folder(tmp_path / "data")
    card = {"examples": {"train": 51, "validation": 0, "dropped_too_long_or_bad_label": 0, "available": 51},
            "hyperparameters": {"seed": 0}, "task": "nli"}
    adapter = carded(llama_adapters["one"], tmp_path / "adapters" / "one", card)
    with pytest.raises(SystemExit) as exited:
        run("calibrate", "--adapter", str(adapter), "--data-dir", str(data), "--base-model", str(tiny_llama_dir))
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("loraswap calibrate: error: loraswap train held")


@pytest.mark.parametrize("temperature, ece", [
    (1e-4, lambda accuracy: 100.0 - accuracy),  # every probability 0 or 1: confidence 1 in one bin
    (1e4, lambda accuracy: abs(accuracy - 100.0 / 3)),  # all three near 1/3: confidence 1/3 in one bin
])
def test_eval_reports_the_ece_of_the_probabilities_the_cards_temperature_gives(tiny_llama_dir, llama_adapters,
                                                                                tmp_path, temperature, ece):
    data = data_folder(tmp_path / "data")
    card = {CALIBRATION_FIELD: {"temperature": temperature, "labels": list(NLI_LABELS)}}
    adapter = carded(llama_adapters["two"], tmp_path / "adapters" / "two", card)
    out = tmp_path / "eval.json"
    run("eval", "--task", "nli", "--adapter", str(adapter), "--base-model", str(tiny_llama_dir), "--adapters-dir",
        str(tmp_path / "adapters"), "--data", str(data / "nli/mnli.jsonl.gz"), "--json", str(out))
    report = json.loads(out.read_text())
    assert report["ece"] == pytest.approx(ece(report["accuracy"]), abs=0.05)

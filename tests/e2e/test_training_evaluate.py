"""``loraswap eval`` end to end on the tiny Llama: a limited NLI run scores a sample that holds every label, and
its confusion matrix names its axes (rows: gold label, columns: predicted label); predictions come in the data file's
order, each example samples alike however it is drawn, and data or settings it cannot evaluate are usage errors."""
from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import pytest

from service.cli.main import main
from service.tasks.prompts import NLI_LABELS
from training.evaluate import confusion_table


def nli_file(path: Path) -> Path:
    """An MNLI dev_matched file of 20 pairs whose first 16 hold no neutral one."""
    golds = ["entailment"] * 8 + ["contradiction"] * 8 + ["neutral"] * 4
    path.write_text("".join(json.dumps({"premise": f"A man sits on bench {i}.", "hypothesis": f"Someone sits {i}.",
                                        "label": label, "mnli_split": "dev_matched"}) + "\n"
                            for i, label in enumerate(golds)))
    return path


def test_a_limited_nli_eval_scores_every_label_and_names_the_matrix_axes(tiny_llama_dir, tmp_path, capsys):
    data = nli_file(tmp_path / "mnli.jsonl")
    out = tmp_path / "eval.json"
    main(["eval", "--task", "nli", "--adapter", "none", "--base-model", str(tiny_llama_dir), "--adapters-dir",
          str(tmp_path), "--device", "cpu", "--data", str(data), "--limit", "6", "--sample-seed", "3",
          "--json", str(out)])
    report = json.loads(out.read_text())
    matrix = report["confusion_matrix"]
    assert (matrix["rows"], matrix["columns"], matrix["labels"]) == ("gold", "predicted", list(NLI_LABELS))
    assert report["count"] == 6 and (report["limit"], report["sample_seed"]) == (6, 3)
    assert all(sum(counts) > 0 for counts in matrix["counts"])  # every gold label is in the sample
    assert sum(map(sum, matrix["counts"])) == 6
    correct = sum(matrix["counts"][i][i] for i in range(len(NLI_LABELS)))
    assert report["accuracy"] == 100.0 * correct / 6
    printed = capsys.readouterr().out
    assert confusion_table(matrix) in printed and "gold \\ predicted" in printed


def test_the_confusion_table_puts_gold_labels_on_rows():
    table = confusion_table({"rows": "gold", "columns": "predicted", "labels": ["yes", "no"], "counts": [[3, 1],
                                                                                                      [0, 12]]})
    assert [line.split() for line in table.splitlines()] == [["gold", "\\", "predicted", "yes", "no"],
                                                             ["yes", "3", "1"], ["no", "0", "12"]]


def test_an_adapter_is_evaluated_alike_from_its_folder_and_by_name_in_the_adapters_dir(tiny_llama_dir, llama_adapters,
                                                                                        tmp_path):
    adapters_dir = tmp_path / "adapters"
    shutil.copytree(llama_adapters["one"], adapters_dir / "one")
    data = nli_file(tmp_path / "mnli.jsonl")

    def predictions(adapter: str) -> dict[str, str]:
        out = tmp_path / "predictions.json"
        main(["eval", "--task", "nli", "--adapter", adapter, "--base-model", str(tiny_llama_dir), "--adapters-dir",
              str(adapters_dir), "--device", "cpu", "--data", str(data), "--predictions", str(out)])
        return json.loads(out.read_text())

    by_folder = predictions(str(llama_adapters["one"]))
    assert len(by_folder) == 20 and set(by_folder.values()) <= set(NLI_LABELS)
    assert predictions("one") == by_folder
    assert predictions("none") != by_folder, "the adapter changes no prediction: was it served?"


def squad_file(path: Path) -> Path:
    """An official SQuAD v1.1 file of 6 questions over two contexts, one with multi-byte characters."""
    contexts = [("The Normans gave their name to Normandy, a region in France.", "Who named Normandy?", "The Normans"),
                ("Zoë paid 3 € for a café crème in Coimbra in 2015.", "What did Zoë pay?", "3 €")]
    paragraphs = [{"context": context, "qas": [{"id": f"{c}-{q}", "question": f"{question} ({q})",
                                                "answers": [{"text": answer, "answer_start": context.index(answer)}]}
                                               for q in range(3)]}
                  for c, (context, question, answer) in enumerate(contexts)]
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def test_a_squad_eval_reports_every_answer_a_span_under_the_constraint_and_fewer_without(tiny_llama_dir, tmp_path):
    data = squad_file(tmp_path / "squad.json")

    def report(*flags: str) -> dict:
        out = tmp_path / "eval.json"
        main(["eval", "--task", "squad", "--adapter", "none", "--base-model", str(tiny_llama_dir), "--adapters-dir",
              str(tmp_path), "--device", "cpu", "--data", str(data), "--json", str(out), *flags])
        return json.loads(out.read_text())

    spans, free = report(), report("--no-extractive")
    assert (spans["count"], spans["extractive"], spans["span_rate"]) == (6, True, 100.0)
    assert free["extractive"] is False and free["span_rate"] < 100.0  # a random model's own text is rarely a span


def run_eval(tiny_llama_dir: Path, tmp_path: Path, *flags: str) -> None:
    """``loraswap eval`` on the tiny Llama on the CPU, the adapters dir ``tmp_path`` unless ``flags`` name another."""
    main(["eval", "--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path), "--device", "cpu", *flags])


def test_nli_predictions_are_keyed_by_row_in_the_data_files_order(tiny_llama_dir, llama_adapters, tmp_path):
    """The labels were written as a bare list in the order of the premises' lengths, not the file's. Here the file's
    premises grow shorter, each of its own length: written reversed, the same rows get the same labels, their keys
    reversed."""
    pairs = [(f"A man {'very ' * (12 - i)}slowly sits on bench {i}.", f"Someone sits {i}.", NLI_LABELS[i % 3])
             for i in range(12)]

    def predictions(name: str, rows: list[tuple[str, str, str]], *flags: str) -> dict[str, str]:
        data, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.json"
        data.write_text("".join(json.dumps({"premise": premise, "hypothesis": hypothesis, "label": label}) + "\n"
                                for premise, hypothesis, label in rows))
        run_eval(tiny_llama_dir, tmp_path, "--task", "nli", "--adapter", str(llama_adapters["one"]), "--data",
                 str(data), "--predictions", str(out), "--max-batch", "1", *flags)
        return json.loads(out.read_text())

    forward, backward = predictions("forward", pairs), predictions("backward", pairs[::-1])
    assert list(forward) == list(backward) == [str(i) for i in range(12)]
    assert len(set(forward.values())) > 1, "one label for every row: the order is not tested"
    assert [backward[str(11 - i)] for i in range(12)] == list(forward.values())
    limited = predictions("limited", pairs, "--limit", "5", "--sample-seed", "1")
    assert list(limited) == sorted(limited, key=int) and len(limited) == 5


def test_a_sampled_squad_example_samples_alike_whatever_else_is_drawn(tiny_llama_dir, tmp_path):
    """--seed + i with i the example's index in the file: the seed was the index among the drawn rows sorted by
    context length, so a question drawn by --limit sampled differently than in the whole file."""
    data = squad_file(tmp_path / "squad.json")

    def answers(*flags: str) -> dict[str, str]:
        out = tmp_path / "predictions.json"
        run_eval(tiny_llama_dir, tmp_path, "--task", "squad", "--adapter", "none", "--data", str(data),
                 "--strategy", "temperature", "--temperature", "2", "--no-extractive", "--max-new-tokens", "8",
                 "--seed", "7", "--predictions", str(out), *flags)
        return json.loads(out.read_text())

    every = answers()
    assert list(every) == [f"{c}-{q}" for c in range(2) for q in range(3)]  # the file's order
    assert len(set(every.values())) == 6, "answers alike whatever the seed: the seeds are not tested"
    drawn = answers("--limit", "3", "--sample-seed", "0", "--max-batch", "1")
    assert len(drawn) == 3 and drawn == {qid: every[qid] for qid in drawn}


def usage_error(capsys, call, before_the_model: bool = True) -> str:
    """The one line of the usage error ``call`` ends with (status 2), found before the base model loads if
    ``before_the_model``."""
    with pytest.raises(SystemExit) as exit_:
        call()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert ("Loading weights" in err) != before_the_model, err
    return err.splitlines()[-1]


@pytest.mark.parametrize("task,name,content", [("nli", "empty.jsonl", "\n"), ("rte", "rte.jsonl", ""),
                                               ("squad", "squad.json", '{"data": []}')])
def test_data_without_rows_is_a_usage_error_before_the_model_loads(task, name, content, tiny_llama_dir, tmp_path,
                                                                   capsys):
    """It scored nothing and reported accuracy (or exact match) 0 and ece 0 with status 0."""
    data = tmp_path / name
    data.write_text(content)
    line = usage_error(capsys, lambda: run_eval(tiny_llama_dir, tmp_path, "--task", task, "--adapter", "none",
                                                "--data", str(data)))
    assert line == f"loraswap eval: error: {data} holds no {task} rows to evaluate"


def test_an_empty_default_dev_set_is_a_usage_error(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "nli").mkdir()
    with gzip.open(tmp_path / "nli" / "rte_dev.jsonl.gz", "wt"):
        pass
    monkeypatch.setenv("LORASWAP_DATA_DIR", str(tmp_path))
    line = usage_error(capsys, lambda: run_eval(tiny_llama_dir, tmp_path, "--task", "rte", "--adapter", "none"))
    assert line == "loraswap eval: error: the rte dev set holds no rte rows to evaluate"


def test_an_unknown_label_is_a_usage_error_naming_it_before_the_model_loads(tiny_llama_dir, tmp_path, capsys):
    """It was a KeyError: 'maybe' from the confusion matrix, once every row was scored."""
    data = nli_file(tmp_path / "nli.jsonl")
    rows = data.read_text().splitlines()
    rows[3] = rows[3].replace('"entailment"', '"maybe"')
    data.write_text("\n".join(rows) + "\n")
    line = usage_error(capsys, lambda: run_eval(tiny_llama_dir, tmp_path, "--task", "nli", "--adapter", "none",
                                                "--data", str(data), "--limit", "4"))
    assert line == (f"loraswap eval: error: {data}: row 3 (from 0) has label 'maybe', not one of entailment, neutral, "
                    "contradiction")


def test_more_new_tokens_than_the_base_has_positions_is_a_usage_error(tiny_llama_dir, tmp_path, capsys):
    """The engine's own bound (the base's positions) was a ValueError's traceback; it is found from the base's config,
    before the weights load."""
    data = squad_file(tmp_path / "squad.json")
    line = usage_error(capsys, lambda: run_eval(tiny_llama_dir, tmp_path, "--task", "squad", "--adapter", "none",
                                                "--data", str(data), "--max-new-tokens", "100000"))
    assert line.startswith("loraswap eval: error: the base model cannot run as asked: --max-new-tokens 100000 leaves "
                           "0 of the base model's 512 positions")


def test_an_adapter_the_engine_refuses_is_a_usage_error_giving_the_reason(tiny_llama_dir, llama_adapters, tmp_path,
                                                                          capsys):
    """An adapter of --adapters-dir skipped at start was an 'unknown adapter', the reason only in a warning."""
    adapters_dir = tmp_path / "adapters"
    shutil.copytree(llama_adapters["one"], adapters_dir / "odd")
    config = adapters_dir / "odd" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": float("nan")}))
    line = usage_error(capsys, lambda: run_eval(
        tiny_llama_dir, tmp_path, "--task", "nli", "--adapter", "odd", "--adapters-dir", str(adapters_dir),
        "--data", str(nli_file(tmp_path / "nli.jsonl"))), before_the_model=False)
    assert line == (f"loraswap eval: error: adapter 'odd' in {adapters_dir} cannot be served: adapter lora_alpha nan "
                    "must be a finite number")


def test_evals_start_warnings_name_its_settings_as_given(tiny_llama_dir, tmp_path, caplog):
    """A review: eval's (and calibrate's: the same start) runtime warnings named Settings fields (max_new_tokens,
    max_input_tokens), which eval takes from an option and a variable."""
    caplog.set_level(logging.WARNING, logger="service.runtime")
    run_eval(tiny_llama_dir, tmp_path, "--task", "nli", "--adapter", "none", "--data", str(nli_file(tmp_path / "nli")),
             "--limit", "3", "--max-new-tokens", "12")
    warned = [record.getMessage() for record in caplog.records if record.name == "service.runtime"]
    assert ("--max-new-tokens 12 leaves 500 of the base model's 512 positions for a prompt: prompts are limited to 500 "
            "tokens, not LORASWAP_MAX_INPUT_TOKENS 1024") in warned, warned

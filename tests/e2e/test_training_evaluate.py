"""``loraswap eval`` end to end on the tiny Llama: a limited NLI run scores a sample that holds every label, and
its confusion matrix names its axes (rows: gold label, columns: predicted label)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

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

    def predictions(adapter: str) -> list[str]:
        out = tmp_path / "predictions.json"
        main(["eval", "--task", "nli", "--adapter", adapter, "--base-model", str(tiny_llama_dir), "--adapters-dir",
              str(adapters_dir), "--device", "cpu", "--data", str(data), "--predictions", str(out)])
        return json.loads(out.read_text())

    by_folder = predictions(str(llama_adapters["one"]))
    assert len(by_folder) == 20 and set(by_folder) <= set(NLI_LABELS)
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

"""``loraswap eval`` end to end on the tiny Llama: a limited NLI run scores a sample that holds every label, and
its confusion matrix names its axes (rows: gold label, columns: predicted label)."""
from __future__ import annotations

import json

from service.cli.main import main
from service.prompts import NLI_LABELS
from training.evaluate import confusion_table


def test_a_limited_nli_eval_scores_every_label_and_names_the_matrix_axes(tiny_llama_dir, tmp_path, capsys):
    golds = ["entailment"] * 8 + ["contradiction"] * 8 + ["neutral"] * 4  # the first 16 hold no neutral pair
    data = tmp_path / "mnli.jsonl"
    data.write_text("".join(json.dumps({"premise": f"A man sits on bench {i}.", "hypothesis": f"Someone sits {i}.",
                                        "label": label, "mnli_split": "dev_matched"}) + "\n"
                            for i, label in enumerate(golds)))
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

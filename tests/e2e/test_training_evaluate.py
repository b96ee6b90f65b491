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

"""``loraswap calibrate``: fit the temperature of an NLI adapter's label probabilities and measure their calibration,
through the serving engine.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks", section 4.2): one scalar T > 0 that
minimises the mean negative log-likelihood of the gold labels under softmax(z / T), z the labels' scores as the server
computes them (the log-probabilities of each label's first token after the prompt). It is fitted on the MNLI pairs of
the adapter's training files that ``loraswap train`` held out for validation (never trained on), never on MNLI
dev_matched, where the expected calibration error before and after is only measured. ``--write-card`` stores T in
the adapter's card (``label_calibration``), which the server reads when it registers the adapter.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from service.cli.command import UsageError, run_until_stopped, spare_inputs
from service.errors import AdapterError
from service.lora.adapter_files import AdapterWeights
from service.lora.bounded_read import adapter_file
from service.lora.card import CALIBRATION_FIELD, CARD_FILE, read_card
from service.runtime import Runtime
from service.tasks.prompts import NLI_LABELS
from training.data import TASK_TRAIN_FILES, data_dir, naming_default_data, read_eval, read_nli
from training.evaluate import (
    bounded,
    engine_settings,
    named_as_given,
    served_adapter,
    start_runtime,
    stopped_after,
)
from training.metrics import ECE_BINS, expected_calibration_error, reliability_bins
from training.named_adapter import adapter_folder, adapter_identity

FIT_FILE = "nli/mnli.jsonl.gz"  # the fit takes the held-out rows of this training file only
DEV_FILE = "nli/mnli.jsonl.gz"  # its dev_matched split measures the calibration
DATA_FILES = dict.fromkeys([*(name for name, _ in TASK_TRAIN_FILES["nli"]), DEV_FILE])  # all calibrate reads
LOG_T_RANGE = (math.log(0.05), math.log(20.0))  # where the fitted temperature is looked for


def card_of(folder: Path) -> dict:
    """The ``card.json`` of the adapter ``folder``, read as the server reads it (``card.read_card``, the file found
    as ``bounded_read.adapter_file`` finds it): FileNotFoundError without one, UsageError, in one line, for one that
    is no regular file inside the folder (a FIFO was read until something wrote to it, a folder or a symlink loop was
    a traceback), is too large, is not a JSON object or names a key twice in one."""
    try:
        card = read_card(adapter_file(folder, CARD_FILE))
    except AdapterError as exc:  # each names the card's path
        raise UsageError(str(exc)) from None
    if card is None:
        raise FileNotFoundError(f"{folder} has no {CARD_FILE}: calibrate needs the card loraswap train wrote")
    return card


def split_of(card: dict) -> tuple[int, int, int]:
    """The rows ``loraswap train`` had, held out and shuffled with: the card's ``examples.available``,
    ``examples.validation`` and ``hyperparameters.seed``. UsageError for a card that is not an nli adapter's, or
    does not hold them as whole numbers (validation at most available), or whose adapter dropped rows (its
    validation count is then not the number held out)."""
    if card.get("task") != "nli":
        raise UsageError(f"the adapter was trained for {card.get('task')!r}: only an nli adapter's labels calibrate")
    examples, hyperparameters = card.get("examples"), card.get("hyperparameters")
    if not isinstance(examples, dict) or not isinstance(hyperparameters, dict):
        raise UsageError("the adapter's card does not say how loraswap train split its rows")
    split = examples.get("available"), examples.get("validation"), hyperparameters.get("seed")
    if not all(type(value) is int and value >= 0 for value in split) or split[1] > split[0]:
        raise UsageError("the adapter's card does not say how loraswap train split its rows: examples.available, "
                         f"examples.validation (at most available) and hyperparameters.seed are {split}")
    if examples.get("dropped_too_long_or_bad_label"):
        raise UsageError("the card's adapter dropped rows, so its validation count is not the number held out")
    return split


def held_out_rows(split: tuple[int, int, int], root: Path) -> list[dict]:
    """The rows of ``FIT_FILE`` (its MNLI train and dev_mismatched splits) that ``loraswap train`` held out for
    validation when it made the adapter whose card gives ``split`` (``split_of``: rows available, held out, seed): its
    ``split_rows`` again, with that seed and validation count, over the task's training files read in the same order,
    less any pair (premise and hypothesis) that also occurs among the rows trained on. Raises UsageError when the
    data holds another number of rows than the card's (the held-out rows cannot be told), and when no MNLI pair was
    held out (trained with ``--eval-examples 0``): nothing to fit on."""
    from training.train import split_rows  # imports the Trainer: only when needed

    available, validation, seed = split
    rows = [{**row, "file": name} for name, splits in TASK_TRAIN_FILES["nli"] for row in read_nli(root / name, splits)]
    if len(rows) != available:
        raise UsageError(f"{root} holds {len(rows)} training rows, the card's adapter was trained from "
                         f"{available}: its held-out rows cannot be told")
    trained, held = split_rows(rows, validation, seed)
    seen = {(row["premise"], row["hypothesis"]) for row in trained}
    fit = [row for row in held if row["file"] == FIT_FILE and (row["premise"], row["hypothesis"]) not in seen]
    if not fit:
        raise UsageError(f"loraswap train held out no {FIT_FILE} pair it did not train on ({validation} validation "
                         "rows in all): there is nothing to fit the temperature on")
    return fit


def label_logits(rt: Runtime, adapter: AdapterWeights | None, rows: list[dict]) -> torch.Tensor:
    """[rows, 3] the uncalibrated scores of ``NLI_LABELS`` for each row (``Tasks.label_scores``: log-probabilities of
    the labels' first tokens), float64, in the order of ``rows`` (they are queued shortest premise first, so that a
    batch's prompts need less padding)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["premise"]))
    scored = run_until_stopped(bounded((rt.tasks.label_scores(rows[i]["premise"], rows[i]["hypothesis"], adapter)
                                  for i in order), rt.settings.max_queue))
    logits = torch.empty(len(rows), len(NLI_LABELS), dtype=torch.float64)
    logits[order] = torch.tensor([scores.logprobs for scores in scored], dtype=torch.float64)
    return logits


def gold_labels(rows: list[dict]) -> torch.Tensor:
    """[rows] the index of each row's gold label in ``NLI_LABELS``."""
    return torch.tensor([NLI_LABELS.index(row["label"]) for row in rows])


def nll(logits: torch.Tensor, gold: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood (nats) of ``gold`` [n] under softmax(``logits`` [n, k] / ``temperature``)."""
    return F.cross_entropy(logits / temperature, gold).item()


def fit_temperature(logits: torch.Tensor, gold: torch.Tensor, steps: int = 80) -> float:
    """The T in ``LOG_T_RANGE`` that minimises ``nll``: a golden-section search over log T. The NLL is convex in 1 / T
    (a log-sum-exp of linear functions of it, less a linear one), so it has one minimum along log T, which the search
    brackets to within 1e-16 of the range in 80 steps."""
    ratio = (math.sqrt(5) - 1) / 2
    low, high = LOG_T_RANGE
    for _ in range(steps):
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        if nll(logits, gold, math.exp(left)) <= nll(logits, gold, math.exp(right)):
            high = right
        else:
            low = left
    return math.exp((low + high) / 2)


def summary(logits: torch.Tensor, gold: torch.Tensor, temperature: float) -> dict:
    """Accuracy (percent), NLL (nats), ECE (percent, ``ECE_BINS`` bins) and the reliability bins of the labels'
    probabilities softmax(``logits`` / ``temperature``) against ``gold``."""
    probabilities = (logits / temperature).softmax(-1)
    confidence, predicted = probabilities.max(-1)
    correct = (predicted == gold).tolist()
    return {"count": len(gold), "accuracy": 100.0 * sum(correct) / max(len(gold), 1),
            "nll": nll(logits, gold, temperature), "ece": expected_calibration_error(confidence.tolist(), correct),
            "bins": reliability_bins(confidence.tolist(), correct)}


def reliability_diagram(path: Path, curves: dict[str, dict], title: str) -> None:
    """A PNG at ``path``: for each of ``curves`` (a name -> a ``summary``) a panel of the accuracy of each confidence
    bin against its mean confidence (bars at the bins, the diagonal where they would be perfectly calibrated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4.6), sharey=True)
    for ax, (name, curve) in zip(axes, curves.items()):
        full = [b for b in curve["bins"] if b["count"]]
        width = 1 / len(curve["bins"])
        ax.bar([b["low"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
               edgecolor="black", label="accuracy")
        ax.bar([b["low"] for b in full], [b["confidence"] - b["accuracy"] for b in full], width=width,
               bottom=[b["accuracy"] for b in full], align="edge", color="red", alpha=0.3, label="gap")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (probability of the predicted label)",
               title=f"{name}: ECE {curve['ece']:.2f}%, accuracy {curve['accuracy']:.2f}%")
        ax.legend(loc="upper left")
    axes[0].set_ylabel("accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def data_files(root: Path) -> dict[str, str]:
    """The files calibrate reads in the data folder ``root``, in full (absolute, links resolved): ``fit``, the one the
    temperature is fitted on (``FIT_FILE``), and ``dev``, the one it is measured on (``DEV_FILE``)."""
    return {"fit": str((root / FIT_FILE).resolve()), "dev": str((root / DEV_FILE).resolve())}


def command_of(args: argparse.Namespace) -> str:
    """The ``loraswap calibrate`` command line that ``args`` come from (the options given or changed)."""
    given = {"--adapter": args.adapter, "--data-dir": args.data_dir, "--diagram": args.diagram, "--json": args.json,
             "--base-model": None if args.base_model == "smollm2" else args.base_model,
             "--device": None if args.device == "auto" else args.device, "--max-batch": args.max_batch}
    options = [f"{name} {value}" for name, value in given.items() if value is not None]
    return " ".join(["loraswap calibrate", *options, *(["--write-card"] if args.write_card else [])])


def calibration_field(temperature: float, fit: dict, dev: dict, seed: int, device: str, args: argparse.Namespace,
                      files: dict[str, str]) -> dict:
    """The card's ``label_calibration``: T, the label set it holds for, and how it was fitted (``fit``: count, NLL
    before and after, on the file ``files["fit"]``) and what it did on dev_matched (``dev``: ``summary`` before and
    after, of ``files["dev"]``), on ``device``; the files named in full, as the report names them (``data_files``)."""
    return {
        "temperature": round(temperature, 6),
        "labels": list(NLI_LABELS),
        "scored_by": "the first token of each label's completion, as served by default",
        "method": "temperature scaling (Guo et al. 2017): T minimising the mean NLL of the gold label under "
                  "softmax(z / T), z the labels' first-token log-probabilities; golden-section search over log T",
        "data": f"{files['fit']} (train+dev_mismatched): its pairs among those loraswap train held out for validation "
                f"(training.train.split_rows, seed {seed}), less pairs also trained on; never MNLI dev_matched",
        "count": fit["count"], "seed": seed,
        "nll_before": round(fit["before"], 6), "nll_after": round(fit["after"], 6),
        "mnli_dev_matched": {"data": files["dev"], "count": dev["before"]["count"], "bins": ECE_BINS,
                             "ece_before": round(dev["before"]["ece"], 4), "ece_after": round(dev["after"]["ece"], 4),
                             "accuracy_before": round(dev["before"]["accuracy"], 4),
                             "accuracy_after": round(dev["after"]["accuracy"], 4)},
        "command": command_of(args),
        "device": device,
    }


def scores_of(args: argparse.Namespace, folder: Path, row_sets: list[list[dict]]) -> tuple:
    """``label_logits`` of each of ``row_sets`` from the adapter in ``folder`` served as ``args`` say, then the device
    they ran on, in words, and the engine's settings (``engine_settings``)."""
    with stopped_after(start_runtime(args, folder)) as rt, named_as_given(args):
        adapter = served_adapter(rt, args, folder)
        logits = [label_logits(rt, adapter, rows) for rows in row_sets]
    device = rt.registry.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return (*logits, f"{name}, {rt.registry.dtype}", engine_settings(rt))


def run(args: argparse.Namespace) -> dict:
    """``loraswap calibrate``: fit T on the adapter's held-out MNLI training pairs, measure dev_matched before and
    after, print the report; ``--write-card`` stores T in the card, ``--diagram`` draws the reliability diagram,
    ``--json`` writes the report with the reliability bins and every row's scores (uncalibrated) and gold label. Raises
    UsageError where ``--adapter`` names no adapter folder, or two (``adapter_folder``), FileNotFoundError for an
    adapter folder without a card or absent data, UsageError for a card that cannot be read as the server reads it
    (``card_of``) or does not say how its rows were split (``split_of``), when its held-out rows cannot be told or there
    are none (``held_out_rows``), and, with ``--write-card``, for a temperature at the search's lower bound (``fitted``;
    the report is printed first), and, before the work, for a ``--json`` or ``--diagram`` that names a data file it
    reads (``spare_inputs``: the report was written over it), AdapterError for an adapter the base cannot serve."""
    root = Path(args.data_dir) if args.data_dir else data_dir()
    spare_inputs([("--json", args.json), ("--diagram", args.diagram)],
                 [(f"the data file {root / name}", root / name) for name in DATA_FILES])
    folder = adapter_folder(args)
    card = card_of(folder)
    split = split_of(card)
    with naming_default_data({"--data-dir": args.data_dir}):
        fit_rows, dev_rows = held_out_rows(split, root), read_eval("nli", root / DEV_FILE)
    seed = split[2]
    fit_logits, dev_logits, device, engine = scores_of(args, folder, [fit_rows, dev_rows])
    fit_gold, dev_gold = gold_labels(fit_rows), gold_labels(dev_rows)
    temperature = fit_temperature(fit_logits, fit_gold)
    fit = {"count": len(fit_rows), "before": nll(fit_logits, fit_gold, 1.0),
           "after": nll(fit_logits, fit_gold, temperature)}
    dev = {"before": summary(dev_logits, dev_gold, 1.0), "after": summary(dev_logits, dev_gold, temperature)}
    report = {"adapter": adapter_identity(folder), "data": data_files(root),
              "temperature": temperature, "fit": fit,
              "mnli_dev_matched": {when: {k: v for k, v in s.items() if k != "bins"} for when, s in dev.items()},
              "engine": engine}
    print(json.dumps(report, indent=2))
    if args.diagram:
        reliability_diagram(args.diagram, {"uncalibrated (T = 1)": dev["before"],
                                           f"calibrated (T = {temperature:.3f})": dev["after"]},
                            f"{folder.name} on MNLI dev_matched ({len(dev_rows)} pairs), {ECE_BINS} bins")
    if args.json:
        scores = {"labels": list(NLI_LABELS), "fit": fit_logits.tolist(), "fit_gold": fit_gold.tolist(),
                  "mnli_dev_matched": dev_logits.tolist(), "mnli_dev_matched_gold": dev_gold.tolist()}
        args.json.write_text(json.dumps({**report, "bins": {k: s["bins"] for k, s in dev.items()},
                                         "scores": scores}, indent=1))
    if args.write_card:
        fitted(temperature, len(fit_rows))
        card[CALIBRATION_FIELD] = calibration_field(temperature, fit, dev, seed, device, args, report["data"])
        (folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return report


def fitted(temperature: float, count: int) -> None:
    """UsageError when ``temperature`` lies at the lower bound of ``LOG_T_RANGE`` (within 0.1 %): the ``count``
    held-out pairs are told apart so easily (too few of them, as a card of 5 validation rows gave 2) that the NLL only
    falls as T does, and the card would make every label probability near 0 or 1 (a review: dev_matched ECE 25 to 61
    percent). At the upper bound T says the scores carry nothing: the probabilities become uniform, which is kept."""
    if math.log(temperature) < LOG_T_RANGE[0] + 1e-3:
        raise UsageError(f"the fitted temperature {temperature:.4g} lies at the lower bound of the search: the {count} "
                         "held-out pairs are told apart too easily to fit one; the card is left as it was")

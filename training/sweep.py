"""``loraswap sweep``: a grid over LoRA rank, learning rate and target modules at a fixed step budget.

Each run is an ordinary ``loraswap train`` into ``OUT/<run>``; a run whose ``card.json``
exists is read back, not repeated, so an interrupted sweep resumes. The results go to
``OUT/sweep.csv``, ``OUT/sweep.md`` and ``OUT/sweep.png`` (validation loss against
trainable parameters).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import re
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from training import train

COLUMNS = [
    "run", "targets", "target_modules", "rank", "lr", "trainable_parameters", "steps",
    "final_train_loss", "final_validation_loss", "validation_token_accuracy", "validation_sequence_accuracy",
    "train_seconds",
]


def meta_model(model_or_config) -> torch.nn.Module:
    """A weightless (meta device) copy of the architecture of a model or its config: enough to resolve and count
    targets."""
    config = model_or_config if isinstance(model_or_config, PretrainedConfig) else model_or_config.config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def trainable_parameters(model_or_config, rank: int, targets: str | list[str]) -> int:
    """How many LoRA parameters peft trains for ``targets`` (a preset or module names) at ``rank``. Raises
    ValueError for a preset on an architecture of no known family."""
    model = meta_model(model_or_config)
    spec = targets if isinstance(targets, str) else ",".join(targets)
    peft_model = get_peft_model(model, train.lora_config(model, rank, None, 0.0, spec))
    return peft_model.get_nb_trainable_parameters()[0]


def grid(args: argparse.Namespace, config: PretrainedConfig) -> list[dict]:
    """The runs to make, one dict per run (name, targets, the modules they resolve to, rank, lr) over ``--targets``
    x ``--ranks`` x ``--lrs``; target presets that resolve to the same modules (Llama's attention_mlp and
    all_linear) are kept once. Raises ValueError as ``trainable_parameters`` does."""
    model = meta_model(config)
    runs, seen = [], set()
    for spec in args.targets:
        modules = train.resolve_targets(spec.replace("+", ","), model)
        if tuple(sorted(modules)) in seen:
            continue
        seen.add(tuple(sorted(modules)))
        for rank in args.ranks:
            for lr in args.lrs:
                name = re.sub(r"\W", "_", f"{spec}_r{rank}_lr{lr:g}")  # a plain identifier, as adapter names are
                runs.append({"run": name, "targets": spec, "target_modules": " ".join(modules), "rank": rank, "lr": lr})
    return runs


def run_one(args: argparse.Namespace, spec: dict) -> dict:
    """One row of the tables: ``spec`` and the run's card values of ``COLUMNS`` (seconds, losses in nats per
    target token). The card of a finished run (its ``card.json`` exists) is read back; else the run is trained
    into ``--out``/run (errors as ``train.train_adapter``)."""
    out = args.out / spec["run"]
    if (out / "card.json").is_file():
        card = json.loads((out / "card.json").read_text())
    else:
        run_args = argparse.Namespace(**vars(args))
        run_args.out, run_args.rank, run_args.lr = out, spec["rank"], spec["lr"]
        run_args.target_modules = spec["targets"].replace("+", ",")
        card = train.train_adapter(run_args)
    return {**spec, **{k: card.get(k) for k in COLUMNS if k in card}}


def cell(value) -> str:
    """A value as a markdown table cell: floats to 4 significant digits, None empty."""
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))


def write_tables(rows: list[dict], out: Path) -> None:
    """Write the rows as ``out/sweep.csv`` and as the markdown table ``out/sweep.md``, a column per ``COLUMNS``."""
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Write a PNG to ``path``: each run's validation loss against its trainable parameters (log scale), a line per
    learning rate and target set; runs without a validation loss are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = dict(zip(dict.fromkeys(r["targets"] for r in rows), "osD^v*"))
    for lr in sorted({r["lr"] for r in rows}):
        for targets, marker in markers.items():
            points = sorted((r["trainable_parameters"], r["final_validation_loss"]) for r in rows
                            if r["lr"] == lr and r["targets"] == targets and r.get("final_validation_loss") is not None)
            if points:
                ax.plot(*zip(*points), marker=marker, label=f"lr {lr:g}, {targets}")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="validation loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_sweep(args: argparse.Namespace) -> list[dict]:
    """Train every run of the grid (or read back its card) and write the tables and the plot; returns the rows.
    Raises FileNotFoundError when ``--base-model`` is no model directory or the data is absent."""
    from service.model.base_model import resolve_base_dir
    from service.settings import Settings

    args.out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(resolve_base_dir(str(args.base_model), Settings().cache_dir))
    rows = []
    for spec in grid(args, config):
        rows.append(run_one(args, spec))
        write_tables(rows, args.out)  # after every run, so a cut-off sweep still leaves its tables
    plot(rows, args.out / "sweep.png", f"{args.task}: {args.max_steps} steps")
    return rows


def run(args: argparse.Namespace) -> None:
    """``loraswap sweep``: run the sweep (see ``run_sweep``) and print where its tables are."""
    rows = run_sweep(args)
    print(f"{len(rows)} runs; tables in {args.out / 'sweep.md'} and {args.out / 'sweep.csv'}")

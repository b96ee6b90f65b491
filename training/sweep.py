"""``loraswap sweep``: a grid over LoRA rank, learning rate and target modules at a fixed step budget.

Each run is an ordinary ``loraswap train`` into ``OUT/<run>``; a run whose ``card.json``
records the settings this sweep trains it with is read back, not repeated, so an interrupted
sweep resumes (a card of other settings is a usage error, never written over). The results go to
``OUT/sweep.csv``, ``OUT/sweep.md`` and ``OUT/sweep.png`` (validation loss against
trainable parameters). A run that diverges (its training loss or weights not finite: ``train.Diverged``) writes no
adapter and is a row of the tables saying at which step, and the sweep goes on; it ends with a usage error only where
every run diverged.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shlex
import typing
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoConfig

from service.cli.command import UsageError
from service.errors import AdapterError
from service.lora.bounded_read import adapter_file
from service.lora.card import CARD_FILE, read_card
from training import train
from training.data import data_dir

# hyperparameters cards hold only since a503d3a (max_examples, eval_examples) and 90e3967 (eval_every): an older
# card's are read from the command line it records (``recorded_hyperparameters``)
LATE_HYPERPARAMETERS = ("max_examples", "eval_examples", "eval_every")
# the hyperparameters a recorded command line must give as its card holds them to be taken for the run's
COMMAND_CHECKS = ("dropout", "epochs", "batch_size", "grad_accum", "warmup", "seed", "quantize")
COLUMNS = [
    "run", "targets", "target_modules", "rank", "lr", "trainable_parameters", "steps",
    "final_train_loss", "final_validation_loss", "validation_token_accuracy", "validation_sequence_accuracy",
    "train_seconds", "diverged",
]


def trainable_parameters(model_or_config, rank: int, targets: str | list[str]) -> int:
    """How many LoRA parameters peft trains for ``targets`` (a preset or module names) at ``rank``. Raises as
    ``train.resolve_targets`` does (UsageError for a preset on an architecture of no known family, or for names no
    linear layer has)."""
    model = train.meta_model(model_or_config)
    spec = targets if isinstance(targets, str) else ",".join(targets)
    peft_model = get_peft_model(model, train.lora_config(model, rank, None, 0.0, spec))
    return peft_model.get_nb_trainable_parameters()[0]


def grid(args: argparse.Namespace, model: torch.nn.Module) -> list[dict]:
    """The runs to make, one dict per run (name, targets, the modules they resolve to, rank, lr) over ``--targets``
    x ``--ranks`` x ``--lrs`` on ``model`` (a ``train.meta_model``); target presets that resolve to the same modules
    (Llama's attention_mlp and all_linear) are kept once. Raises as ``train.resolve_targets`` does, and UsageError
    for a rank above a target layer's (``train.check_rank``)."""
    runs, seen = [], set()
    for spec in args.targets:
        modules = train.resolve_targets(spec.replace("+", ","), model)
        if tuple(sorted(modules)) in seen:
            continue
        seen.add(tuple(sorted(modules)))
        for rank in args.ranks:
            train.check_rank(rank, model, modules, "--ranks")
            for lr in args.lrs:
                name = re.sub(r"\W", "_", f"{spec}_r{rank}_lr{lr:g}")  # a plain identifier, as adapter names are
                runs.append({"run": name, "targets": spec, "target_modules": " ".join(modules), "rank": rank, "lr": lr})
    return runs


def check_options(args: argparse.Namespace) -> None:
    """Raise UsageError, before anything loads, for learning rates that differ only past the 6 significant digits
    that name their runs' folders (``grid``: two runs would share one). (A ``--ranks``, ``--lrs`` or ``--targets``
    that lists a value twice, and an ``--out`` that is a file, a symlink to nothing, empty or an adapter folder, are
    refused when parsed: ``command.comma_list``, ``command.report_folder``.) Raises UsageError too for a --warmup where
    the runs' --max-steps is 1 (``train.check_warmup``)."""
    train.check_warmup(args.warmup, args.max_steps, f"--max-steps {args.max_steps}")
    named: dict[str, float] = {}
    for lr in args.lrs:
        if named.setdefault(f"{lr:g}", lr) != lr:
            raise UsageError(f"--lrs {named[f'{lr:g}']!r} and {lr!r} both print as {lr:g} (6 significant digits), "
                             "which names a run's folder: two runs would share one; give learning rates that differ "
                             "in those digits")


def run_options(args: argparse.Namespace, spec: dict) -> argparse.Namespace:
    """The ``loraswap train`` options of the run ``spec`` of the grid: the sweep's, with the run's folder in
    ``--out``, its rank, learning rate and target modules."""
    options = argparse.Namespace(**vars(args))
    options.out, options.rank, options.lr = args.out / spec["run"], spec["rank"], spec["lr"]
    options.target_modules = spec["targets"].replace("+", ",")
    return options


def changes(recorded: dict, expected: dict) -> list[str]:
    """'name recorded (this sweep: expected)' for each setting of ``train.trained_as`` that differs, the
    hyperparameters by their own names."""
    def flat(settings: dict) -> dict:
        inner = settings.get("hyperparameters")
        return {**settings, **(inner if isinstance(inner, dict) else {})}

    old, new = flat(recorded), flat(expected)
    return [f"{name} {old.get(name)} (this sweep: {value})" for name, value in new.items()
            if name != "hyperparameters" and old.get(name) != value]


def finished_card(options: argparse.Namespace, model: torch.nn.Module) -> dict | None:
    """The card of the run trained before into ``options.out`` with ``options`` (``run_options``), None where the run
    has no folder or an empty one (not trained yet, or cut off: a run is written beside its folder, then moved there
    whole). Raises UsageError for a card that cannot be read as the server reads it (``card.read_card``: a symlink
    to nothing, a FIFO, a folder), for a run folder that holds files but no card, and for a card that records other
    settings (``train.trained_as`` on ``model``, a ``train.meta_model``): a sweep never reports nor writes over
    another's run, nor trains a run only to find it cannot be put in its folder."""
    try:
        card = read_card(adapter_file(options.out, CARD_FILE))
    except AdapterError as exc:
        raise UsageError(f"{exc}: not the card of a run this command reads") from None
    if card is None:
        if os.path.lexists(options.out) and not empty_folder(options.out):
            raise UsageError(f"--out {options.out.parent} holds {options.out.name}, which is not an empty folder and "
                             f"has no {CARD_FILE}: not a run of a sweep; move it away or name a new folder")
        return None
    config = train.lora_config(model, options.rank, options.alpha, options.dropout, options.target_modules)
    expected = {**train.trained_as(options, config), "data_dir": str(options.data_dir or data_dir())}
    data = card.get("data")
    recorded = {**{key: card.get(key) for key in expected},
                "hyperparameters": recorded_hyperparameters(card, options.out),
                "data_dir": data.get("dir") if isinstance(data, dict) else None}
    recorded, expected = unread_settings_dropped(recorded, expected)
    if recorded != expected:
        raise UsageError(f"--out {options.out.parent} holds runs of other settings: {options.out.name} was trained "
                         f"with {', '.join(changes(recorded, expected))}; name a new folder for this sweep")
    return card


def recorded_hyperparameters(card: dict, run: Path) -> object:
    """The ``hyperparameters`` of ``card`` (the card of the run in folder ``run``), with those it is too old to hold
    (``LATE_HYPERPARAMETERS``) read from the command line it records (``recorded_command``). Raises UsageError, saying
    how to go on, for a card too old to hold some whose command cannot tell them."""
    hyperparameters = card.get("hyperparameters")
    if not isinstance(hyperparameters, dict):
        return hyperparameters
    missing = [name for name in LATE_HYPERPARAMETERS if name not in hyperparameters]
    if not missing:
        return hyperparameters
    command = recorded_command(card)
    if command is None:
        raise UsageError(f"{run / CARD_FILE} was written before cards recorded {', '.join(missing)}, and the command "
                         f"it records ({card.get('command')!r}) is not the loraswap train or sweep of its run: "
                         "what its run was trained with is unknown; name a new folder for this sweep (or, knowing "
                         "the values, add them to the card's hyperparameters)")
    return {**hyperparameters, **{name: getattr(command, name) for name in missing}}


class RecordedCommandParser(argparse.ArgumentParser):
    """A parser of a recorded command line: what it cannot parse is a ValueError, not a message and an exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(message)


def recorded_command(card: dict) -> argparse.Namespace | None:
    """The options shared by train and sweep (``options.add_run_options``) of the ``loraswap train`` or ``sweep``
    command line that ``card`` records in ``command`` (its argv: an option not given took its default, and the
    defaults of these have not changed since the first card); None where it records no such command line, or one
    whose task, base model, or any hyperparameter set by an option both have, differs from the card's own (a card
    written by hand, or by an older version that recorded the argv of a program calling ``main``)."""
    from training.options import add_run_options

    if not isinstance(card.get("command"), str):
        return None
    try:
        argv = shlex.split(card["command"])
    except ValueError:  # unbalanced quotes
        return None
    if argv[:1] != ["loraswap"] or argv[1:2] not in (["train"], ["sweep"]):
        return None
    parser = RecordedCommandParser(add_help=False)
    add_run_options(parser)
    try:
        command, _ = parser.parse_known_args(argv[2:])  # the options of train or of sweep alone are left over
    except ValueError:
        return None
    hyperparameters = card["hyperparameters"]
    if (command.task, str(command.base_model)) != (card.get("task"), card.get("base_model")) or any(
            hyperparameters.get(name) != getattr(command, name) for name in COMMAND_CHECKS):
        return None
    return command


def unread_settings_dropped(recorded: dict, expected: dict) -> tuple[dict, dict]:
    """``recorded`` and ``expected`` (``train.trained_as`` and the data folder), without ``eval_every`` where both
    hold out no validation examples (``eval_examples`` 0): it is never read then, and cannot tell the runs apart."""
    def dropped(settings: dict) -> dict:
        inner = {name: value for name, value in settings["hyperparameters"].items() if name != "eval_every"}
        return {**settings, "hyperparameters": inner}

    held_out = [settings["hyperparameters"].get("eval_examples") if isinstance(settings["hyperparameters"], dict)
                else None for settings in (recorded, expected)]
    return (dropped(recorded), dropped(expected)) if held_out == [0, 0] else (recorded, expected)


def empty_folder(path: Path) -> bool:
    """Whether ``path`` is a folder (not a symlink to one) that holds nothing."""
    try:
        return not path.is_symlink() and path.is_dir() and not any(path.iterdir())
    except OSError:  # a folder it may not read
        return False


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
    """Train every run of the grid (or read back its card: ``finished_card``) and write the tables and the plot;
    returns the rows, ``COLUMNS`` each (seconds, losses in nats per target token). Raises, before any run trains,
    UsageError as ``check_options``, ``grid`` and ``finished_card`` do or for an ``--out`` that cannot be made,
    FileNotFoundError when ``--base-model`` is no model directory; then as ``train.train_adapter`` does (absent or
    unusable data), but for a run that diverges, which is a row (``trained_row``)."""
    from service.model.base_model import resolve_base_dir
    from service.settings import setting

    check_options(args)
    model = train.meta_model(AutoConfig.from_pretrained(resolve_base_dir(str(args.base_model), setting("cache_dir"))))
    specs = grid(args, model)
    runs = [run_options(args, spec) for spec in specs]
    cards = [finished_card(options, model) for options in runs]  # every folder checked before a run trains
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on its path, no permission
        raise UsageError(f"--out {args.out} cannot be made: {exc.strerror or exc}") from None
    rows = []
    for spec, options, card in zip(specs, runs, cards):
        rows.append({**spec, **(card_row(card) if card else trained_row(options, model, spec))})
        write_tables(rows, args.out)  # after every run, so a cut-off sweep still leaves its tables
    plot(rows, args.out / "sweep.png", f"{args.task}: {args.max_steps} steps")
    return rows


def card_row(card: dict) -> dict:
    """The table's cells a run's card gives (``COLUMNS``)."""
    return {k: card.get(k) for k in COLUMNS if k in card}


def trained_row(options: argparse.Namespace, model: torch.nn.Module, spec: dict) -> dict:
    """Train the run ``options`` (``train.train_adapter``) and return its table cells; a run that diverges
    (``train.Diverged``: its loss or weights no longer finite, no adapter written) is a row that says so, ``diverged``
    ``at step N: what``, with its trainable parameters, and the sweep goes on (a review: it stopped there)."""
    try:
        return card_row(train.train_adapter(options))
    except train.Diverged as exc:
        return {"trainable_parameters": trainable_parameters(model, spec["rank"], spec["target_modules"].split()),
                "steps": exc.step, "diverged": f"at step {exc.step}: {exc.what}"}


def run(args: argparse.Namespace) -> None:
    """``loraswap sweep``: run the sweep (see ``run_sweep``) and print where its tables are and how many runs
    diverged. UsageError (exit status 2), once the tables are written, where every run diverged: nothing was
    trained to compare; a sweep where some did is a result (status 0), their rows say so."""
    rows = run_sweep(args)
    failed = [row["run"] for row in rows if row.get("diverged")]
    tables = f"tables in {args.out / 'sweep.md'} and {args.out / 'sweep.csv'}"
    if failed and len(failed) == len(rows):
        raise UsageError(f"every run diverged (its training loss or weights not finite; a smaller --lrs may keep them "
                         f"finite); {tables}")
    diverged = f" ({len(failed)} diverged: {', '.join(failed)})" if failed else ""
    print(f"{len(rows)} runs{diverged}; {tables}")

"""``loraswap eval``: score an adapter on SQuAD, NLI or RTE through the serving engine and its tasks."""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from service.cli.command import UsageError
from service.engine.sampling import Decoding
from service.engine.strategies import READ_BY
from service.errors import InputTooLong, UnknownAdapter
from service.lora.adapter_files import BASE_LABEL, CONFIG_FILE, adapter_or_base
from service.runtime import Runtime
from service.settings import Settings
from service.tasks.prompts import NLI_LABELS, RTE_LABELS
from training.data import hidden_in_documents, read_eval
from training.metrics import ECE_BINS, accuracy, confusion_matrix, expected_calibration_error, squad_scores

EVALUATED = "evaluated"  # the name an adapter given as a folder is registered under


def adapter_folder(args: argparse.Namespace) -> Path | None:
    """The folder ``--adapter`` names, or None when it names the bare base ('none', 'base') or an adapter in
    ``--adapters-dir``. Raises UnknownAdapter when it names none of these; it reads no data and loads no model, so
    ``run`` checks the adapter first."""
    if adapter_or_base(args.adapter) is None:
        return None
    path = Path(args.adapter)
    if (path / CONFIG_FILE).is_file():
        return path
    if (args.adapters_dir / args.adapter / CONFIG_FILE).is_file():  # --adapters-dir is a Path
        return None
    raise UnknownAdapter(f"unknown adapter {args.adapter!r}: not '{BASE_LABEL}' or 'base', an adapter folder, "
                         f"or one in {args.adapters_dir}")


def start_runtime(args: argparse.Namespace, folder: Path | None) -> Runtime:
    """The server's runtime (model, registry, engine, tasks), started, with ``folder`` (an adapter folder or None)
    among its adapter roots. Raises FileNotFoundError when ``--base-model`` is no model directory."""
    settings = Settings(
        base_model=args.base_model, adapters_dir=args.adapters_dir, device=args.device, dtype=args.dtype,
        quantize=args.quantize, max_batch=args.max_batch, batch_window_ms=20,
        max_queue=4 * args.max_batch * Settings().max_answer_windows,  # room for every window of 4 batches' answers
        max_queue_wait=0,  # the evaluation keeps max_queue requests in flight: they wait their turn, however long
        max_new_tokens=args.max_new_tokens, auto_merge=False,
        adapter_roots=[folder.resolve().parent] if folder is not None else [],
    )
    rt = Runtime(settings)
    rt.start()
    return rt


def served_adapter(rt: Runtime, args: argparse.Namespace, folder: Path | None) -> str | None:
    """The name ``rt`` serves the evaluated adapter under (None: the bare base), after loading ``folder`` if it is
    one. Raises AdapterError for a folder the base cannot serve, UnknownAdapter for an adapter of ``--adapters-dir``
    that was skipped at start (it does not fit the base)."""
    if adapter_or_base(str(args.adapter)) is None:  # calibrate takes a folder (a Path)
        return None
    if folder is not None:
        rt.load_adapter(EVALUATED, folder)
        return EVALUATED
    rt.registry.require(args.adapter)
    return args.adapter


async def bounded(coroutines, limit: int) -> list:
    """Await all, at most ``limit`` in flight (the engine's queue is bounded)."""
    gate = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with gate:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines))


def evaluate_squad(rt: Runtime, adapter: str | None, rows: list[dict], args: argparse.Namespace) -> tuple[dict, dict]:
    """Answer every SQuAD row through ``rt``'s /answer task, decoded as ``args`` say (row i sampled with seed
    ``--seed`` + i; under the span constraint unless ``--no-extractive``); returns the scores (``squad_scores``: exact
    match and F1 in percent, count; and ``span_rate``) and the predictions, ``{question id: answer}``. Raises
    InputTooLong for a prompt over the runtime's input limit, EngineFailed if the engine thread dies."""
    def decoding(i: int) -> Decoding:
        return Decoding(args.strategy, args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed + i)

    answers = asyncio.run(bounded(
        (rt.tasks.answer(row["context"], row["question"], adapter, decoding(i), args.extractive, args.prompt_style)
         for i, row in enumerate(rows)), rt.settings.max_queue // rt.settings.max_answer_windows))
    predictions = {row["id"]: answer.answer for row, answer in zip(rows, answers)}
    metrics = squad_scores(predictions, {row["id"]: row["answers"] for row in rows})
    return {**metrics, "span_rate": span_rate(rows, answers)}, predictions


def span_rate(rows: list[dict], answers: list) -> float:
    """The share of ``answers`` (``tasks.Answer``) that are a non-empty span of their row's context at the offsets
    they give, in percent (0 for none)."""
    spans = sum(bool(answer.answer) and answer.start is not None
                and row["context"][answer.start:answer.end] == answer.answer for row, answer in zip(rows, answers))
    return 100.0 * spans / max(len(rows), 1)


def evaluate_labels(rt: Runtime, adapter: str | None, rows: list[dict], labels: tuple[str, ...],
                    style: str) -> tuple[dict, list]:
    """Score every premise/hypothesis row through ``rt``'s /nli task, asked in prompt ``style``, and predict its
    likeliest of ``labels``; returns the metrics (accuracy in percent; ``ece``, the expected calibration error in
    percent over ``ECE_BINS`` confidence bins of the probabilities as served, calibrated by the adapter's card if it
    holds a temperature and the style is the adapter's; count; the confusion matrix: rows gold, columns predicted)
    and the predicted labels in row order. Raises InputTooLong for a prompt over the runtime's input limit,
    EngineFailed if the engine thread dies."""
    scored = asyncio.run(bounded(
        (rt.tasks.nli(row["premise"], row["hypothesis"], adapter, labels, style) for row in rows),
        rt.settings.max_queue))
    predictions = [max(probs, key=probs.get) for probs in scored]
    golds = [row["label"] for row in rows]
    matrix = {"rows": "gold", "columns": "predicted", "labels": list(labels),
              "counts": confusion_matrix(predictions, golds, labels)}
    ece = expected_calibration_error([max(probs.values()) for probs in scored],
                                     [p == g for p, g in zip(predictions, golds)])
    return {"accuracy": accuracy(predictions, golds), "ece": ece, "ece_bins": ECE_BINS, "count": len(rows),
            "confusion_matrix": matrix}, predictions


def confusion_table(matrix: dict) -> str:
    """The confusion matrix of ``evaluate_labels`` as aligned text, its axes named: a row per gold label."""
    lines = [[f"{matrix['rows']} \\ {matrix['columns']}", *matrix["labels"]],
             *([label, *map(str, counts)] for label, counts in zip(matrix["labels"], matrix["counts"]))]
    widths = [max(map(len, column)) for column in zip(*lines)]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


def score(rt: Runtime, adapter: str | None, rows: list[dict], args: argparse.Namespace) -> tuple[dict, dict | list]:
    """The task's metrics on ``rows`` and the predictions (see ``evaluate_squad`` and ``evaluate_labels``)."""
    if args.task == "squad":
        return evaluate_squad(rt, adapter, rows, args)
    return evaluate_labels(rt, adapter, rows, NLI_LABELS if args.task == "nli" else RTE_LABELS, args.prompt_style)


def eval_report(args: argparse.Namespace, metrics: dict) -> dict:
    """What was evaluated, how (the prompt style, the sample, the decoding of a sampled SQuAD run) and ``metrics``."""
    report = {"task": args.task, "adapter": args.adapter, "data": str(args.data or f"default {args.task} dev"),
              "prompt_style": args.prompt_style, "strategy": args.strategy, **metrics}
    if args.limit:
        report.update(limit=args.limit, sample_seed=args.sample_seed)
    if args.task == "squad":
        report.update(extractive=args.extractive, distractors=args.distractors)
    if args.task == "squad" and args.strategy != "greedy":
        report.update({name: getattr(args, name) for name in sorted(READ_BY[args.strategy])}, seed=args.seed)
    return report


def run(args: argparse.Namespace) -> dict:
    """``loraswap eval``: print the report (and the confusion matrix of nli and rte), write ``--predictions`` and
    ``--json`` if given, and return the report. The adapter is checked before the data is read and the model loaded.
    Raises UnknownAdapter or AdapterError for an adapter it cannot evaluate, FileNotFoundError for absent data or
    base model, UsageError for data that is not the task's, --distractors with another task than squad, more than
    the data has, or making an example longer than the server takes."""
    if args.distractors and args.task != "squad":
        raise UsageError(f"--distractors hides SQuAD paragraphs among others: not for --task {args.task}")
    folder = adapter_folder(args)
    text = "context" if args.task == "squad" else "premise"
    try:
        rows = read_eval(args.task, args.data, args.limit, args.sample_seed)
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as exc:  # not the task's format (JSON, fields), unreadable
        source = args.data or f"the {args.task} dev set"
        raise UsageError(f"{source}: not a {args.task} file this command reads: {exc!r}") from None
    if args.distractors:
        paragraphs = list(dict.fromkeys((row["title"], row["context"]) for row in read_eval(args.task, args.data)))
        try:
            rows = hidden_in_documents(rows, paragraphs, args.distractors, args.sample_seed)
        except ValueError as exc:
            raise UsageError(f"--distractors {args.distractors}: {exc}") from None
    rows = sorted(rows, key=lambda row: len(row[text]))  # less padding
    rt = start_runtime(args, folder)
    try:
        metrics, predictions = score(rt, served_adapter(rt, args, folder), rows, args)
    except InputTooLong as exc:
        fewer = f" (fewer --distractors than {args.distractors})" if args.distractors else ""
        raise UsageError(f"an example is longer than the server takes{fewer}: {exc}") from None
    finally:
        rt.stop()
    report = eval_report(args, metrics)
    print(json.dumps(report, indent=2))
    if "confusion_matrix" in report:
        print(confusion_table(report["confusion_matrix"]))
    if args.predictions:
        args.predictions.write_text(json.dumps(predictions, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report

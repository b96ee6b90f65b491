"""``loraswap eval``: score an adapter on SQuAD, NLI or RTE through the serving engine and its tasks."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.cli.command import UsageError, command_settings, naming, run_until_stopped, spare_inputs
from service.engine.sampling import Decoding
from service.engine.strategies import READ_BY
from service.errors import AdapterError, InputTooLong, NonFiniteLogits
from service.lora.adapter_files import BASE_LABEL, AdapterWeights, adapter_or_base
from service.runtime import Runtime
from service.settings import Settings
from service.tasks.prompts import NLI_LABELS, RTE_LABELS
from training import named_adapter
from training.data import BadRow, eval_path, eval_sample, hidden_in_documents, naming_default_data, read_eval
from training.metrics import ECE_BINS, accuracy, confusion_matrix, expected_calibration_error, squad_scores

# the HTTP server's settings, which an evaluation does not run (the keys are secrets): not in its report
SERVER_ONLY = frozenset({"host", "port", "admin_key", "api_key", "max_body_bytes", "drain_seconds"})
EVALUATED = "evaluated"  # the name an adapter given as a folder is registered under
LABELS = {"nli": NLI_LABELS, "rte": RTE_LABELS}  # the labels each label-scoring task predicts


def adapter_folder(args: argparse.Namespace) -> Path | None:
    """The adapter folder ``--adapter`` names as a path (``named_adapter.adapter_folder``), or None when it names the
    bare base ('none', 'base') or an adapter in ``--adapters-dir`` by its name (loaded at start, served by that name).
    Raises UsageError when it names none of these, or two adapters; it reads no data and loads no model, so ``run``
    checks the adapter first."""
    if adapter_or_base(args.adapter) is None:
        return None
    folder = named_adapter.adapter_folder(args, besides=f"'{BASE_LABEL}' or 'base', ")
    return folder if folder == Path(args.adapter) else None


def runtime_settings(args: argparse.Namespace, folder: Path | None) -> Settings:
    """The settings of the runtime ``start_runtime`` starts (``command_settings``): the options' (``--base-model``,
    ``--max-batch``...), those the command sets itself (``options.ENGINE_SETS``; calibrate's ``max_new_tokens`` too),
    ``folder`` (an adapter folder, or None) the parent of the one adapter root, and every other from its ``LORASWAP_``
    variable, else its default."""
    return command_settings(args, adapter_roots=[folder.resolve().parent] if folder is not None else [])


@contextmanager
def stopped_after(rt: Runtime) -> Iterator[Runtime]:
    """``rt``, stopped (``Runtime.stop``: what the engine queued finished) once the block ends, but for a stop
    (KeyboardInterrupt): the command's process then ends at once (``server_process.end_stopped``), its engine thread,
    a daemon, with it, not waited for (a review: eval stopped during a long prompt's prefill waited for the engine
    10 s, then said so in an error line)."""
    stopped = False
    try:
        yield rt
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        if not stopped:
            rt.stop()


def start_runtime(args: argparse.Namespace, folder: Path | None) -> Runtime:
    """The server's runtime (model, registry, engine, tasks) with ``runtime_settings``, started. Raises
    FileNotFoundError when ``--base-model`` is no model directory, UsageError for settings the base model cannot run
    (``--max-new-tokens`` leaving too few of its positions for a prompt, a ``--max-batch`` whose KV cache cannot
    exist: ``runtime.check_settings_fit``, from its config before it loads). Its start's warnings name the settings
    as ``args`` gave them (``command.naming``: ``--max-new-tokens``, ``LORASWAP_MAX_INPUT_TOKENS``, ``eval's own
    max_queue``); its failure is not logged, but raised for the command to report once."""
    settings = runtime_settings(args, folder)
    rt = Runtime(settings, naming(args))
    try:
        rt.start(log_failure=False)  # what fails it is the command's to report: a usage error, or its traceback
    except ValueError as exc:  # the runtime's settings that cannot work (runtime.EXPECTED_START_FAILURES)
        raise UsageError(f"the base model cannot run as asked: {exc}") from None
    return rt


@contextmanager
def named_as_given(args: argparse.Namespace) -> Iterator[None]:
    """NonFiniteLogits raised inside naming the adapter as ``--adapter`` gave it (a review: a folder's is served as
    ``EVALUATED``, and 'adapter 'evaluated' gave NaN' named that internal name)."""
    try:
        yield
    except NonFiniteLogits:
        raise NonFiniteLogits(args.adapter) from None


def served_adapter(rt: Runtime, args: argparse.Namespace, folder: Path | None) -> AdapterWeights | None:
    """The weights ``rt`` serves the evaluated adapter with, after loading ``folder`` if it is one (calibrate's
    always is: a folder named ``none`` or ``base`` is served as the folder it is); None, the bare base, for
    ``--adapter none`` or ``base`` without a folder (``adapter_folder`` gives none for these). Raises AdapterError for
    a folder the base cannot serve, and for an adapter of ``--adapters-dir`` that was skipped at start, with the
    reason the engine refuses it (loaded again to say why)."""
    if folder is not None:
        rt.load_adapter(EVALUATED, folder)
        return rt.registry.lookup(EVALUATED)
    if adapter_or_base(args.adapter) is None:
        return None
    if not rt.registry.registered(args.adapter):  # skipped at start, the reason only logged
        try:
            rt.load_adapter(args.adapter, args.adapters_dir / args.adapter)
        except AdapterError as exc:
            raise AdapterError(f"adapter {args.adapter!r} in {args.adapters_dir} cannot be served: {exc}") from None
    return rt.registry.lookup(args.adapter)


def engine_settings(rt: Runtime) -> dict:
    """The settings ``rt`` ran with, for a report to record, so that its result can be reproduced (an evaluation
    takes every serving setting it does not set from its ``LORASWAP_`` variable: ``LORASWAP_MAX_INPUT_TOKENS`` and
    ``LORASWAP_DRAFT_TOKENS`` can change its results): every Settings field but the HTTP server's (``SERVER_ONLY``),
    the device and dtype the base runs on, and the values the engine gave those unset (its device's defaults:
    ``draft_tokens``, ``prefill_chunk``, ``batch_window_ms``, ``max_prefill_tokens``, null for no bound)."""
    engine = rt.engine
    return {**rt.settings.model_dump(mode="json", exclude=SERVER_ONLY), "device": str(rt.registry.device),
            "dtype": str(rt.registry.dtype).removeprefix("torch."), "draft_tokens": engine.draft_tokens,
            "prefill_chunk": engine.prefill_chunk, "batch_window_ms": engine.batch_window_ms,
            "max_prefill_tokens": None if math.isinf(engine.prefill_tokens) else engine.prefill_tokens}


async def bounded(coroutines, limit: int) -> list:
    """Await all, at most ``limit`` in flight (the engine's queue is bounded)."""
    gate = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with gate:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines))


def shortest_first(rows: list[dict], text: str, call, limit: int) -> list:
    """Await ``call(row)`` for every row, at most ``limit`` in flight, started in order of ``row[text]``'s length
    (less padding in a batch); the results in ``rows``' order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][text]))
    results = run_until_stopped(bounded((call(rows[i]) for i in order), limit))
    return [result for _, result in sorted(zip(order, results))]


def evaluate_squad(rt: Runtime, adapter: AdapterWeights | None, rows: list[dict],
                   args: argparse.Namespace) -> tuple[dict, dict]:
    """Answer every SQuAD row through ``rt``'s /answer task, decoded as ``args`` say (a row sampled with seed
    ``--seed`` + its ``index`` in the data file; under the span constraint unless ``--no-extractive``); returns the
    scores (``squad_scores``: exact match and F1 in percent, count; and ``span_rate``) and the predictions,
    ``{question id: answer}`` in ``rows``' order. Raises InputTooLong for a prompt over the runtime's input limit,
    EngineFailed if the engine thread dies."""
    def answer(row: dict):
        decoding = Decoding(args.strategy, args.temperature, args.top_k, args.top_p, args.max_new_tokens,
                            args.seed + row["index"])
        return rt.tasks.answer(row["context"], row["question"], adapter, decoding, args.extractive, args.prompt_style)

    answers = shortest_first(rows, "context", answer, rt.settings.max_queue // rt.settings.max_answer_windows)
    predictions = {row["id"]: answer.answer for row, answer in zip(rows, answers)}
    metrics = squad_scores(predictions, {row["id"]: row["answers"] for row in rows})
    return {**metrics, "span_rate": span_rate(rows, answers)}, predictions


def span_rate(rows: list[dict], answers: list) -> float:
    """The share of ``answers`` (``tasks.Answer``) that are a non-empty span of their row's context at the offsets
    they give, in percent (0 for none)."""
    spans = sum(bool(answer.answer) and answer.start is not None
                and row["context"][answer.start:answer.end] == answer.answer for row, answer in zip(rows, answers))
    return 100.0 * spans / max(len(rows), 1)


def evaluate_labels(rt: Runtime, adapter: AdapterWeights | None, rows: list[dict], labels: tuple[str, ...],
                    style: str) -> tuple[dict, dict]:
    """Score every premise/hypothesis row through ``rt``'s /nli task, asked in prompt ``style``, and predict its
    likeliest of ``labels``; returns the metrics (accuracy in percent; ``ece``, the expected calibration error in
    percent over ``ECE_BINS`` confidence bins of the probabilities as served, calibrated by the adapter's card if it
    holds a temperature and the style is the adapter's; count; the confusion matrix: rows gold, columns predicted)
    and the predicted labels, ``{row index in the data file: label}`` in ``rows``' order. Raises InputTooLong for a
    prompt over the runtime's input limit, EngineFailed if the engine thread dies."""
    scored = shortest_first(rows, "premise", lambda row: rt.tasks.nli(row["premise"], row["hypothesis"], adapter,
                                                                      labels, style), rt.settings.max_queue)
    predictions = [max(probs, key=probs.get) for probs in scored]
    golds = [row["label"] for row in rows]
    matrix = {"rows": "gold", "columns": "predicted", "labels": list(labels),
              "counts": confusion_matrix(predictions, golds, labels)}
    ece = expected_calibration_error([max(probs.values()) for probs in scored],
                                     [p == g for p, g in zip(predictions, golds)])
    return {"accuracy": accuracy(predictions, golds), "ece": ece, "ece_bins": ECE_BINS, "count": len(rows),
            "confusion_matrix": matrix}, {row["index"]: label for row, label in zip(rows, predictions)}


def confusion_table(matrix: dict) -> str:
    """The confusion matrix of ``evaluate_labels`` as aligned text, its axes named: a row per gold label."""
    lines = [[f"{matrix['rows']} \\ {matrix['columns']}", *matrix["labels"]],
             *([label, *map(str, counts)] for label, counts in zip(matrix["labels"], matrix["counts"]))]
    widths = [max(map(len, column)) for column in zip(*lines)]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


def score(rt: Runtime, adapter: AdapterWeights | None, rows: list[dict], args: argparse.Namespace) -> tuple[dict, dict]:
    """The task's metrics on ``rows`` and the predictions (see ``evaluate_squad`` and ``evaluate_labels``)."""
    if args.task == "squad":
        return evaluate_squad(rt, adapter, rows, args)
    return evaluate_labels(rt, adapter, rows, LABELS[args.task], args.prompt_style)


def eval_report(args: argparse.Namespace, adapter: AdapterWeights | None, metrics: dict, engine: dict) -> dict:
    """What was evaluated (``adapter``: the folder of the weights served, ``named_adapter.adapter_identity``, null for
    the bare base, however --adapter named it; ``data``: the file read, ``eval_path``, wherever --data or
    LORASWAP_DATA_DIR placed it), how (the prompt style, the sample, the decoding of a sampled SQuAD run, the
    ``engine``'s settings: ``engine_settings``) and ``metrics``."""
    report = {"task": args.task, "adapter": None if adapter is None else named_adapter.adapter_identity(adapter.path),
              "data": str(eval_path(args.task, args.data).resolve()),
              "prompt_style": args.prompt_style, "strategy": args.strategy, **metrics}
    if args.limit:
        report.update(limit=args.limit, sample_seed=args.sample_seed)
    if args.task == "squad":
        report.update(extractive=args.extractive, distractors=args.distractors)
    if args.task == "squad" and args.strategy != "greedy":
        report.update({name: getattr(args, name) for name in sorted(READ_BY[args.strategy])}, seed=args.seed)
    return {**report, "engine": engine}


def check_labels(rows: list[dict], labels: tuple[str, ...], source: str) -> None:
    """UsageError naming the first row (by its index in ``source``, from 0) whose label is not one of ``labels``."""
    for i, row in enumerate(rows):
        if row["label"] not in labels:
            raise UsageError(f"{source}: row {i} (from 0) has label {row['label']!r}, not one of "
                             f"{', '.join(labels)}")


def evaluated_rows(args: argparse.Namespace) -> list[dict]:
    """The rows ``args`` evaluate, in the data file's order, each with its ``index`` among the file's rows (from 0):
    the ``--limit`` sample (``eval_sample``), each SQuAD context hidden among ``--distractors`` paragraphs. Raises
    FileNotFoundError for absent data (UsageError where no --data gave it: ``naming_default_data``), UsageError for
    data that is not the task's (a row that is not: naming its file, row and field), holds no rows or a label the
    task does not have, and for more --distractors than it has."""
    source = args.data or f"the {args.task} dev set"
    try:
        with naming_default_data({"--data": args.data}):
            every = read_eval(args.task, args.data)
    except (FileNotFoundError, UsageError):
        raise
    except BadRow as exc:  # names the file, the row and the field
        raise UsageError(str(exc)) from None
    except (ValueError, KeyError, TypeError, OSError) as exc:  # not the task's format (JSON, fields), unreadable
        raise UsageError(f"{source}: not a {args.task} file this command reads: {exc!r}") from None
    if not every:
        raise UsageError(f"{source} holds no {args.task} rows to evaluate")
    if args.task in LABELS:
        check_labels(every, LABELS[args.task], source)
    rows = eval_sample(args.task, [{**row, "index": i} for i, row in enumerate(every)], args.limit, args.sample_seed)
    if not args.distractors:
        return rows
    try:
        return hidden_in_documents(rows, list(dict.fromkeys((row["title"], row["context"]) for row in every)),
                                   args.distractors, args.sample_seed)
    except ValueError as exc:
        raise UsageError(f"--distractors {args.distractors}: {exc}") from None


def run(args: argparse.Namespace) -> dict:
    """``loraswap eval``: print the report (and the confusion matrix of nli and rte), write ``--predictions`` and
    ``--json`` if given, and return the report. The adapter is checked before the data is read, the data
    (``evaluated_rows``) before the model is loaded. Raises UsageError (``adapter_folder``) or AdapterError for an
    adapter it cannot evaluate, FileNotFoundError for absent data or base model, UsageError for data that is not the
    task's or holds no rows or an unknown label, --distractors with another task than squad or more than the data has,
    settings the base model cannot run, or making an example longer than the server takes, and for a report that would
    be written over the default data (``spare_inputs``)."""
    if args.distractors and args.task != "squad":
        raise UsageError(f"--distractors hides SQuAD paragraphs among others: not for --task {args.task}")
    if args.data is None:  # a --data file is checked with every option's (service.cli.main.check_inputs_spared)
        spare_inputs([("--predictions", args.predictions), ("--json", args.json)],
                     [(f"the {args.task} dev set", eval_path(args.task))])
    folder = adapter_folder(args)
    rows = evaluated_rows(args)
    try:
        with stopped_after(start_runtime(args, folder)) as rt, named_as_given(args):
            adapter = served_adapter(rt, args, folder)
            metrics, predictions = score(rt, adapter, rows, args)
    except InputTooLong as exc:
        fewer = f" (fewer --distractors than {args.distractors})" if args.distractors else ""
        raise UsageError(f"an example is longer than the server takes{fewer}: {exc}") from None
    report = eval_report(args, adapter, metrics, engine_settings(rt))
    print(json.dumps(report, indent=2))
    if "confusion_matrix" in report:
        print(confusion_table(report["confusion_matrix"]))
    if args.predictions:
        args.predictions.write_text(json.dumps(predictions, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report

"""``loraswap eval``: score an adapter on SQuAD, NLI or RTE through the serving engine and its tasks."""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from service.lora.adapter_files import BASE_LABEL, CONFIG_FILE, adapter_or_base
from service.engine.sampling import Decoding
from service.errors import UnknownAdapter
from service.prompts import NLI_LABELS, RTE_LABELS
from service.runtime import Runtime
from service.settings import Settings
from training.data import read_eval
from training.metrics import accuracy, confusion_matrix, squad_scores


def start_runtime(args: argparse.Namespace) -> tuple[Runtime, str | None]:
    """The server's runtime (model, registry, engine, tasks) and the adapter to evaluate."""
    adapter_path = Path(args.adapter)
    is_folder = (adapter_path / CONFIG_FILE).is_file()
    in_adapters_dir = (args.adapters_dir / args.adapter / CONFIG_FILE).is_file()  # --adapters-dir is a Path
    if adapter_or_base(args.adapter) is not None and not is_folder and not in_adapters_dir:
        raise UnknownAdapter(f"unknown adapter {args.adapter!r}: not '{BASE_LABEL}' or 'base', an adapter folder, "
                             f"or one in {args.adapters_dir}")  # before the model is loaded
    settings = Settings(
        base_model=args.base_model, adapters_dir=args.adapters_dir, device=args.device, dtype=args.dtype,
        quantize=args.quantize, max_batch=args.max_batch, max_queue=4 * args.max_batch, batch_window_ms=20,
        max_new_tokens=args.max_new_tokens, max_input_tokens=4096, auto_merge=False,
        adapter_roots=[adapter_path.resolve().parent] if is_folder else [],
    )
    rt = Runtime(settings)
    rt.start()
    if adapter_or_base(args.adapter) is None:
        return rt, None
    if is_folder:
        name = "evaluated"
        rt.load_adapter(name, adapter_path)
        return rt, name
    rt.registry.require(args.adapter)
    return rt, args.adapter


async def bounded(coroutines, limit: int) -> list:
    """Await all, at most ``limit`` in flight (the engine's queue is bounded)."""
    gate = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with gate:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines))


def evaluate_squad(rt: Runtime, adapter: str | None, rows: list[dict], args) -> tuple[dict, dict]:
    def decoding(i: int) -> Decoding:
        return Decoding(args.strategy, args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed + i)

    answers = asyncio.run(bounded(
        (rt.tasks.answer(row["context"], row["question"], adapter, decoding(i)) for i, row in enumerate(rows)),
        rt.settings.max_queue))
    predictions = {row["id"]: answer.answer for row, answer in zip(rows, answers)}
    metrics = squad_scores(predictions, {row["id"]: row["answers"] for row in rows})
    return metrics, predictions


def evaluate_labels(rt: Runtime, adapter: str | None, rows: list[dict], labels: tuple[str, ...]) -> tuple[dict, list]:
    scored = asyncio.run(bounded(
        (rt.tasks.nli(row["premise"], row["hypothesis"], adapter, labels) for row in rows), rt.settings.max_queue))
    predictions = [max(probs, key=probs.get) for probs in scored]
    golds = [row["label"] for row in rows]
    matrix = {"rows": "gold", "columns": "predicted", "labels": list(labels),
              "counts": confusion_matrix(predictions, golds, labels)}
    return {"accuracy": accuracy(predictions, golds), "count": len(rows), "confusion_matrix": matrix}, predictions


def confusion_table(matrix: dict) -> str:
    """The confusion matrix of ``evaluate_labels`` as aligned text, its axes named: a row per gold label."""
    lines = [[f"{matrix['rows']} \\ {matrix['columns']}", *matrix["labels"]],
             *([label, *map(str, counts)] for label, counts in zip(matrix["labels"], matrix["counts"]))]
    widths = [max(map(len, column)) for column in zip(*lines)]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


def run(args: argparse.Namespace) -> dict:
    text = "context" if args.task == "squad" else "premise"
    rows = read_eval(args.task, args.data, args.limit, args.sample_seed)
    rows = sorted(rows, key=lambda row: len(row[text]))  # less padding
    rt, adapter = start_runtime(args)
    try:
        if args.task == "squad":
            metrics, predictions = evaluate_squad(rt, adapter, rows, args)
        else:
            metrics, predictions = evaluate_labels(rt, adapter, rows, NLI_LABELS if args.task == "nli" else RTE_LABELS)
    finally:
        rt.stop()
    report = {"task": args.task, "adapter": args.adapter, "data": str(args.data or f"default {args.task} dev"),
              "strategy": args.strategy, **metrics}
    if args.limit:
        report.update(limit=args.limit, sample_seed=args.sample_seed)
    if args.task == "squad" and args.strategy != "greedy":
        report.update(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, seed=args.seed)
    print(json.dumps(report, indent=2))
    if "confusion_matrix" in report:
        print(confusion_table(report["confusion_matrix"]))
    if args.predictions:
        args.predictions.write_text(json.dumps(predictions, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report

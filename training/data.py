"""Readers for the task data (SQuAD v1.1 JSON, NLI JSON lines) and the files each task trains on."""
from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

# files each task trains on, relative to data_dir(): (file, MNLI splits to keep or None for all)
TASK_TRAIN_FILES: dict[str, list[tuple[str, tuple[str, ...] | None]]] = {
    "squad": [("squad/train-v1.1.json.gz", None)],
    # the suggested protocol: MNLI dev_matched stays unseen, it is the reported metric
    "nli": [("nli/snli_test.jsonl.gz", None), ("nli/mnli.jsonl.gz", ("train", "dev_mismatched"))],
    "rte": [("nli/rte_train.jsonl.gz", None)],
}
# the file each task is evaluated on by default (for nli: the MNLI dev_matched split)
TASK_EVAL_FILES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "squad": ("squad/dev-v1.1.json.gz", None),
    "nli": ("nli/mnli.jsonl.gz", ("dev_matched",)),
    "rte": ("nli/rte_dev.jsonl.gz", None),
}


def data_dir() -> Path:
    """``$LORASWAP_DATA_DIR``, else ``shared/data`` beside the repository."""
    env = os.environ.get("LORASWAP_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _open_text(path: Path):
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_squad(path: str | Path) -> list[dict]:
    """Flatten an official SQuAD v1.1 JSON file (``data[].paragraphs[].qas[]``, gzipped if it ends in .gz) to one
    dict per question: id, title, context, question, answers and their character offsets. Raises
    FileNotFoundError for an absent file, KeyError or json's JSONDecodeError for one not in that format."""
    with _open_text(path) as f:
        articles = json.load(f)["data"]
    return [
        {
            "id": qa["id"],
            "title": article["title"],
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": [a["text"] for a in qa["answers"]],
            "answer_starts": [a["answer_start"] for a in qa["answers"]],
        }
        for article in articles
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]


def nli_lines(path: str | Path) -> list[dict]:
    """Every row of a JSON-lines file (gzipped if it ends in .gz) as it is written, blank lines skipped. Raises
    FileNotFoundError for an absent file, JSONDecodeError for a line that is no JSON."""
    with _open_text(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def nli_rows(lines: list[dict], splits: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """The premise/hypothesis/label rows of ``nli_lines``; ``splits`` keeps only those ``mnli_split`` values.
    Raises KeyError or TypeError for a line that is no such row."""
    return [{"premise": row["premise"], "hypothesis": row["hypothesis"], "label": row["label"]} for row in lines
            if splits is None or row.get("mnli_split") in splits]


def read_nli(path: str | Path, splits: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """Premise/hypothesis/label rows of a JSON-lines file (gzipped if it ends in .gz); ``splits`` keeps only those
    ``mnli_split`` values. Raises FileNotFoundError for an absent file, KeyError or JSONDecodeError for a line that
    is no such row."""
    return nli_rows(nli_lines(path), splits)


def read_task(task: str, root: Path | None = None) -> tuple[list[dict], list[str]]:
    """All training rows of a task and the data files they came from (relative to the data dir, with the MNLI
    splits kept). Raises FileNotFoundError when one is absent."""
    root = Path(root) if root else data_dir()
    rows: list[dict] = []
    files = []
    for name, splits in TASK_TRAIN_FILES[task]:
        rows += read_squad(root / name) if task == "squad" else read_nli(root / name, splits)
        files.append(name + (f" ({'+'.join(splits)})" if splits else ""))
    return rows, files


def sample(rows: list[dict], limit: int | None, seed: int, key: str | None = None) -> list[dict]:
    """A random sample of ``limit`` rows drawn with ``seed``, in their original order (all rows when ``limit`` is
    None or not below their count). With ``key``, it holds a row of every value of ``key`` (a label) while the
    limit allows: the first row of each value in the seeded shuffle comes first, then the rest of the shuffle."""
    if limit is None or limit >= len(rows):
        return list(rows)
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    if key is not None:
        firsts: dict = {}  # each value's first row in the shuffle, in the order they come
        for i in order:
            firsts.setdefault(rows[i][key], i)
        chosen = set(firsts.values())
        order = list(firsts.values()) + [i for i in order if i not in chosen]
    return [rows[i] for i in sorted(order[:limit])]


def read_eval(task: str, path: str | Path | None = None) -> list[dict]:
    """The rows a task is evaluated on: ``path``, else the task's dev file. For nli, a file whose rows name their
    MNLI split (``mnli_split``, as mnli.jsonl.gz's do) is cut to its dev_matched rows, whatever the file is called;
    one of no such field is read whole. Raises FileNotFoundError when the file is absent."""
    name, splits = TASK_EVAL_FILES[task]
    path = Path(path) if path else data_dir() / name
    if task == "squad":
        return read_squad(path)
    lines = nli_lines(path)
    named = splits is not None and any(isinstance(row, dict) and "mnli_split" in row for row in lines)
    return nli_rows(lines, splits if named else None)


def eval_sample(task: str, rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """The ``limit`` of a task's evaluation ``rows`` (``read_eval``'s) drawn with ``seed`` (see ``sample``): for
    NLI/RTE, every label while the limit allows."""
    return sample(rows, limit, seed, key=None if task == "squad" else "label")


def hidden_in_documents(rows: list[dict], paragraphs: list[tuple[str, str]], distractors: int,
                        seed: int) -> list[dict]:
    """SQuAD ``rows``, each with its context hidden among ``distractors`` paragraphs of other articles (drawn from
    ``paragraphs``, (title, context) pairs, with ``seed``), at a random place, paragraphs a blank line apart; the
    answers' character offsets move with it. Raises ValueError when fewer paragraphs of other articles exist."""
    generator, documents = random.Random(seed), []
    for row in rows:
        others = [context for title, context in paragraphs if title != row["title"]]
        if len(others) < distractors:
            raise ValueError(f"only {len(others)} paragraphs of articles other than {row['title']!r}, "
                             f"not {distractors}")
        parts = generator.sample(others, distractors)
        at = generator.randint(0, distractors)
        parts.insert(at, row["context"])
        shift = sum(len(part) + 2 for part in parts[:at])
        documents.append({**row, "context": "\n\n".join(parts),
                          "answer_starts": [start + shift for start in row["answer_starts"]]})
    return documents

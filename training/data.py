"""Readers for the task data (SQuAD v1.1 JSON, NLI JSON lines) and the files each task trains on."""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
from pathlib import Path

from service.cli.command import UsageError
from service.settings import DATA_DIR_VARIABLE, usable_path

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


DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"  # LORASWAP_DATA_DIR unset


def data_dir() -> Path:
    """``$LORASWAP_DATA_DIR``, else ``DEFAULT_DATA_DIR``, ``shared/data`` beside the repository. UsageError naming the
    variable where the file system refuses its path (``usable_path``: a name too long)."""
    env = os.environ.get(DATA_DIR_VARIABLE)
    try:
        return Path(usable_path(env)) if env else DEFAULT_DATA_DIR
    except OSError as exc:
        raise UsageError(f"{DATA_DIR_VARIABLE}: the file system refuses this path: {exc.strerror or exc}") from None


@contextlib.contextmanager
def naming_default_data(given: dict[str, object]):
    """Re-raise a FileNotFoundError for a file of the data folder (``data_dir``) that a command read because one of
    its data options, ``given`` (option: its value), gave none (None) as a UsageError naming what set the folder and
    what to set instead: ``LORASWAP_DATA_DIR PATH: No such file or directory: FILE (or give --data-dir)``, or, the
    variable unset, ``the default data folder PATH: ...: give --data-dir or set LORASWAP_DATA_DIR`` (a review: the
    path alone was said, naming no option or variable). ``given`` empty: a program with no data option, whose data
    the variable alone places (``... (or give ...)`` and ``give ... or`` left out)."""
    try:
        yield
    except FileNotFoundError as exc:
        root, failed = data_dir(), Path(exc.filename or "")
        unset = " or ".join(option for option, value in given.items() if value is None)
        if (given and not unset) or exc.filename is None or (failed != root and root not in failed.parents):
            raise
        env, give = os.environ.get(DATA_DIR_VARIABLE), f"give {unset}" if unset else ""
        where, hint = ((f"{DATA_DIR_VARIABLE} {env}", f" (or {give})" if give else "") if env else
                       (f"the default data folder {root}", f": {give + ' or ' if give else ''}set {DATA_DIR_VARIABLE}"))
        raise UsageError(f"{where}: {exc.strerror}: {exc.filename}{hint}") from None


def _open_text(path: Path):
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


class BadRow(ValueError):
    """A row of a task's data file that the task cannot read: a field absent or of another kind than the task's
    (a number for a premise, a SQuAD answer's text), or a SQuAD question of no answer. Its message is one line that
    names the file, the row and the field."""


def json_kind(value: object) -> str:
    """``value`` (parsed JSON) in words, with its start: 'a number (5)', 'an empty list ([])'."""
    kind = ("null" if value is None else "a boolean" if isinstance(value, bool) else
            "a number" if isinstance(value, (int, float)) else "a string" if isinstance(value, str) else
            "a list" if isinstance(value, list) else "an object")
    shown = json.dumps(value, ensure_ascii=False)
    return f"{kind} ({shown if len(shown) <= 40 else shown[:37] + '...'})"


def checked_field(record: object, key: str, kind: type, what: str, where: str):
    """``record[key]``, checked to be a ``kind`` (a bool is no number); BadRow at ``where`` (the file and row) for a
    record that is no JSON object, a field absent or of another kind, ``what`` saying which kind it must be."""
    if not isinstance(record, dict):
        raise BadRow(f"{where} is {json_kind(record)}, not a JSON object")
    if key not in record:
        raise BadRow(f"{where}: no {key} field")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRow(f"{where}: {key} is {json_kind(value)}, not {what}")
    return value


def read_squad(path: str | Path) -> list[dict]:
    """Flatten an official SQuAD v1.1 JSON file (``data[].paragraphs[].qas[]``, gzipped if it ends in .gz) to one
    dict per question: id, title, context, question, answers and their character offsets. Raises
    FileNotFoundError for an absent file, json's JSONDecodeError for one that is no JSON, BadRow naming the first
    question (or article, paragraph) not of that layout: a field absent or not a string (answer_start not a whole
    number), or no answer (SQuAD v2's unanswerable questions)."""
    with _open_text(path) as f:
        document = json.load(f)
    rows = []
    for a, article in enumerate(checked_field(document, "data", list, "a list of articles", str(path))):
        where = f"{path}: article {a}"
        title = checked_field(article, "title", str, "a string", where)
        for p, paragraph in enumerate(checked_field(article, "paragraphs", list, "a list", where)):
            context = checked_field(paragraph, "context", str, "a string", f"{where}, paragraph {p}")
            for q, qa in enumerate(checked_field(paragraph, "qas", list, "a list", f"{where}, paragraph {p}")):
                at = f"{where}, paragraph {p}, question {q} (from 0)"
                qid = checked_field(qa, "id", str, "a string", at)
                at = f"{at[:-1]}; id {qid})"
                question = checked_field(qa, "question", str, "a string", at)
                answers = checked_field(qa, "answers", list, "a list", at)
                if not answers:
                    raise BadRow(f"{at}: answers is empty: a SQuAD v1.1 question has an answer (SQuAD v2's "
                                 "unanswerable questions are not read)")
                for k, answer in enumerate(answers):
                    checked_field(answer, "text", str, "a string", f"{at}, answer {k}")
                    checked_field(answer, "answer_start", int, "a whole number", f"{at}, answer {k}")
                rows.append({"id": qid, "title": title, "context": context, "question": question,
                             "answers": [answer["text"] for answer in answers],
                             "answer_starts": [answer["answer_start"] for answer in answers]})
    return rows


def nli_lines(path: str | Path) -> list[dict]:
    """Every row of a JSON-lines file (gzipped if it ends in .gz) as it is written, blank lines skipped, each
    checked to hold a string premise, hypothesis and label. Raises FileNotFoundError for an absent file, BadRow
    naming the first line that is no JSON object or lacks such a field."""
    rows = []
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadRow(f"{where} is no JSON ({exc.msg} at column {exc.colno})") from None
            for key in ("premise", "hypothesis", "label"):
                checked_field(row, key, str, "a string", where)
            rows.append(row)
    return rows


def nli_rows(lines: list[dict], splits: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """The premise/hypothesis/label rows of ``nli_lines``; ``splits`` keeps only those ``mnli_split`` values."""
    return [{"premise": row["premise"], "hypothesis": row["hypothesis"], "label": row["label"]} for row in lines
            if splits is None or row.get("mnli_split") in splits]


def read_nli(path: str | Path, splits: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """Premise/hypothesis/label rows of a JSON-lines file (gzipped if it ends in .gz); ``splits`` keeps only those
    ``mnli_split`` values. Raises FileNotFoundError for an absent file, BadRow for a line that is no such row
    (``nli_lines``)."""
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


def eval_path(task: str, path: str | Path | None = None) -> Path:
    """The file a task is evaluated on: ``path``, else the task's dev file in the data folder."""
    return Path(path) if path else data_dir() / TASK_EVAL_FILES[task][0]


def read_eval(task: str, path: str | Path | None = None) -> list[dict]:
    """The rows a task is evaluated on: ``path``, else the task's dev file. For nli, a file whose rows name their
    MNLI split (``mnli_split``, as mnli.jsonl.gz's do) is cut to its dev_matched rows, whatever the file is called;
    one of no such field is read whole. Raises FileNotFoundError when the file is absent."""
    splits = TASK_EVAL_FILES[task][1]
    path = eval_path(task, path)
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

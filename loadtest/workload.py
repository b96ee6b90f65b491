"""The requests of the side-by-side comparison (``loadtest.side_by_side``): the first questions of SQuAD dev and the
first MNLI dev_matched pairs, as prompts built with the service's own templates, so that every system is sent the
very text loraswap's task routes build."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from service.tasks.prompts import NLI_LABELS, answer_prompt, nli_prompt
from training.data import TASK_EVAL_FILES, read_nli, read_squad

MODES = ("squad", "mixed")  # squad: questions only; mixed: questions and NLI pairs, taking turns


@dataclass(frozen=True)
class Item:
    """One request of the load. ``task``: "squad" or "nli"; ``prompt``: the text a completion endpoint is sent;
    ``fields``: the body of loraswap's task route (context and question, or premise and hypothesis);
    ``references``: the reference answers, or the one gold label."""

    task: str
    prompt: str
    fields: dict[str, str]
    references: tuple[str, ...]


def squad_items(path: Path, count: int) -> list[Item]:
    """The first ``count`` questions of a SQuAD v1.1 file, in the file's order. Raises FileNotFoundError for an
    absent file."""
    return [Item("squad", answer_prompt(q["context"], q["question"]),
                 {"context": q["context"], "question": q["question"]}, tuple(q["answers"]))
            for q in read_squad(path)[:count]]


def nli_items(path: Path, splits: tuple[str, ...] | None, count: int) -> list[Item]:
    """The first ``count`` pairs of an NLI file (of ``splits``) whose label is one of NLI_LABELS. Raises
    FileNotFoundError for an absent file."""
    rows = [row for row in read_nli(path, splits) if row["label"] in NLI_LABELS][:count]
    return [Item("nli", nli_prompt(row["premise"], row["hypothesis"]),
                 {"premise": row["premise"], "hypothesis": row["hypothesis"]}, (row["label"],))
            for row in rows]


def take_turns(first: list, second: list) -> list:
    """``first[0], second[0], first[1], second[1], ...``, then the rest of the longer list."""
    merged = []
    for i in range(max(len(first), len(second))):
        merged += first[i:i + 1] + second[i:i + 1]
    return merged


def shares(mode: str, count: int) -> tuple[int, int]:
    """The SQuAD questions and NLI pairs in ``count`` requests of ``mode``: all questions for "squad"; for "mixed"
    half questions (rounded up), the rest pairs. Raises ValueError for another mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    questions = count if mode == "squad" else (count + 1) // 2
    return questions, count - questions


def data_files(root: Path) -> list[Path]:
    """The files of the data folder ``root`` the workloads read: SQuAD dev and MNLI."""
    return [root / TASK_EVAL_FILES[task][0] for task in ("squad", "nli")]


def workload(mode: str, count: int, root: Path) -> list[Item]:
    """``count`` requests: for "squad", the first ``count`` SQuAD dev questions; for "mixed", the first half of them
    (rounded up) taking turns with the first MNLI dev_matched pairs. ``root``: the data folder. Raises ValueError
    for another mode, FileNotFoundError when a data file is absent."""
    questions, pairs = shares(mode, count)
    squad_file, _ = TASK_EVAL_FILES["squad"]
    asked = squad_items(root / squad_file, questions)
    if mode == "squad":
        return asked
    nli_file, splits = TASK_EVAL_FILES["nli"]
    return take_turns(asked, nli_items(root / nli_file, splits, pairs))


def workloads(modes: Sequence[str], count: int, skip: int, root: Path) -> list[list[Item]]:
    """A workload of ``count`` requests per entry of ``modes`` (each in MODES), in order, as ``workload`` builds them
    but of SQuAD questions and MNLI pairs that no other holds and that are not among the first ``skip`` of either
    (the warm-up's): each takes the next ones of the files. Raises ValueError where the files hold too few.
    FileNotFoundError for an absent file."""
    split = [shares(mode, count) for mode in modes]
    questions, pairs = sum(taken for taken, _ in split), sum(paired for _, paired in split)
    squad_file, _ = TASK_EVAL_FILES["squad"]
    nli_file, splits = TASK_EVAL_FILES["nli"]
    squad = squad_items(root / squad_file, skip + questions)[skip:]
    nli = nli_items(root / nli_file, splits, skip + pairs)[skip:] if pairs else []
    if len(squad) < questions or len(nli) < pairs:
        raise ValueError(f"{len(modes)} loads of {count} requests, none asked twice, need {questions} SQuAD "
                         f"questions and {pairs} NLI pairs after the warm-up's {skip}; the data holds "
                         f"{len(squad)} and {len(nli)}")
    built = []
    for taken, paired in split:  # a squad load has no pairs: take_turns leaves its questions as they are
        asked, squad, matched, nli = squad[:taken], squad[taken:], nli[:paired], nli[paired:]
        built.append(take_turns(asked, matched))
    return built

"""Write the corpus the tiny test tokenizer trains on, a small sample of the real task data kept in ``tests/data``.

    python -m tests.data.make_corpus [DATA_DIR]

DATA_DIR is the real data folder (``training.data.data_dir()`` when omitted). The sample is the first question of
each of the first ``N_PARAGRAPHS`` SQuAD v1.1 dev paragraphs, in SQuAD's official layout, and the first ``N_PAIRS``
SNLI 1.0 test pairs as JSON lines; both are gzipped without a timestamp, so the same input gives the same bytes.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from training.data import data_dir, read_nli

CORPUS_DIR = Path(__file__).resolve().parent
SQUAD_SAMPLE = CORPUS_DIR / "squad_dev_sample.json.gz"
NLI_SAMPLE = CORPUS_DIR / "snli_test_sample.jsonl.gz"
SOURCES = {SQUAD_SAMPLE.name: "squad/dev-v1.1.json.gz", NLI_SAMPLE.name: "nli/snli_test.jsonl.gz"}
N_PARAGRAPHS = 300
N_PAIRS = 300


def squad_sample(doc: dict, n_paragraphs: int) -> dict:
    """The first ``n_paragraphs`` paragraphs of an official SQuAD document, each with its first question only."""
    articles = []
    for article in doc["data"]:
        room = n_paragraphs - sum(len(a["paragraphs"]) for a in articles)
        if room <= 0:
            break
        paragraphs = [{"context": p["context"], "qas": p["qas"][:1]} for p in article["paragraphs"][:room]]
        articles.append({"title": article["title"], "paragraphs": paragraphs})
    return {"version": doc["version"], "data": articles}


def write_gzip(path: Path, text: str) -> None:
    """``text`` as gzipped UTF-8, with no timestamp or file name in the header (reproducible bytes)."""
    path.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))


def write_corpus(data: Path, out: Path) -> list[Path]:
    """Write both samples of the real data folder ``data`` into ``out``; returns their paths.

    Raises FileNotFoundError when ``data`` lacks a source file."""
    with gzip.open(data / SOURCES[SQUAD_SAMPLE.name], "rt", encoding="utf-8") as f:
        squad = squad_sample(json.load(f), N_PARAGRAPHS)
    pairs = read_nli(data / SOURCES[NLI_SAMPLE.name])[:N_PAIRS]
    out.mkdir(parents=True, exist_ok=True)
    write_gzip(out / SQUAD_SAMPLE.name, json.dumps(squad, ensure_ascii=False, indent=1) + "\n")
    write_gzip(out / NLI_SAMPLE.name, "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))
    return [out / SQUAD_SAMPLE.name, out / NLI_SAMPLE.name]


if __name__ == "__main__":
    for written in write_corpus(Path(sys.argv[1]) if len(sys.argv) > 1 else data_dir(), CORPUS_DIR):
        print(f"{written}: {written.stat().st_size} bytes")

"""Task data readers and tokenisation: loss masks, the SQuAD truncation rules and the collator."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from service.tasks.prompts import answer_prompt, answer_target, label_target, nli_prompt
from training.data import data_dir, eval_sample, hidden_in_documents, read_eval, read_nli, read_squad
from training.prepare import IGNORE_INDEX, answer_window, collator, encode_label, encode_rows, encode_squad

FILLER = "The river flows past the old mill and the farmers bring their grain to town every week. "


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def squad_row(context: str, answer: str, question: str = "What is the capital of the province?") -> dict:
    return {"id": "q", "title": "t", "context": context, "question": question,
            "answers": [answer], "answer_starts": [context.find(answer)]}


def decode(tok, token_ids) -> str:
    return tok.decode(token_ids, clean_up_tokenization_spaces=False)


def split(tok, example: dict) -> tuple[str, str]:
    """(prompt text, target text) of an encoded example, cut where the labels start."""
    n_prompt = example["labels"].count(IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in example["labels"][:n_prompt])
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    return decode(tok, example["input_ids"][:n_prompt]), decode(tok, example["input_ids"][n_prompt:])


def kept_context(prompt: str) -> str:
    assert prompt.startswith("Context: ")
    return prompt[len("Context: ") : prompt.index("\nQuestion: ")]


# ---- readers ------------------------------------------------------------------------------------
def test_read_squad_flattens_the_official_layout(tmp_path):
    doc = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "Ann met Bob.", "qas": [
        {"id": "a1", "question": "Who met Bob?", "answers": [{"text": "Ann", "answer_start": 0},
                                                            {"text": "Ann", "answer_start": 0}]},
        {"id": "a2", "question": "Whom did Ann meet?", "answers": [{"text": "Bob", "answer_start": 8}]},
    ]}]}]}
    path = tmp_path / "squad.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(doc, f)
    rows = read_squad(path)
    assert rows[0] == {"id": "a1", "title": "T", "context": "Ann met Bob.", "question": "Who met Bob?",
                       "answers": ["Ann", "Ann"], "answer_starts": [0, 0]}
    assert rows[1]["answers"] == ["Bob"] and rows[1]["answer_starts"] == [8]


def test_read_nli_filters_mnli_splits(tmp_path):
    path = tmp_path / "mnli.jsonl"
    lines = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": "neutral", "mnli_split": split}
             for i, split in enumerate(["train", "dev_matched", "dev_mismatched"])]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert [r["premise"] for r in read_nli(path)] == ["p0", "p1", "p2"]
    assert read_nli(path, ["train", "dev_mismatched"]) == [
        {"premise": "p0", "hypothesis": "h0", "label": "neutral"},
        {"premise": "p2", "hypothesis": "h2", "label": "neutral"},
    ]


@pytest.mark.parametrize("name", ["mnli.jsonl", "MNLI_copy.jsonl.gz", "dev.jsonl", "my_mnli.jsonl"])
def test_an_nli_file_whose_rows_name_their_split_is_evaluated_on_dev_matched_whatever_its_name(name, tmp_path):
    """A review: ``eval --task nli --data MNLI_copy.jsonl.gz`` (a copy of mnli.jsonl.gz) evaluated every split, its
    train rows too: the rows were cut to dev_matched only in a file whose name began with "mnli". A file of no split
    field (SNLI's, a user's own) is read whole, as before."""
    path = tmp_path / name
    lines = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": "neutral", "mnli_split": split}
             for i, split in enumerate(["train", "dev_matched", "dev_mismatched", "dev_matched"])]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    with (gzip.open(path, "wt") if name.endswith(".gz") else open(path, "w")) as f:
        f.write(text)
    assert [row["premise"] for row in read_eval("nli", path)] == ["p1", "p3"]
    assert [row["premise"] for row in read_eval("rte", path)] == ["p0", "p1", "p2", "p3"]  # rte has no splits
    plain = tmp_path / f"plain_{name}"
    with (gzip.open(plain, "wt") if name.endswith(".gz") else open(plain, "w")) as f:
        f.write("".join(json.dumps({k: v for k, v in line.items() if k != "mnli_split"}) + "\n" for line in lines))
    assert [row["premise"] for row in read_eval("nli", plain)] == ["p0", "p1", "p2", "p3"]


def test_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASWAP_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv("LORASWAP_DATA_DIR")
    assert data_dir() == Path(__file__).resolve().parents[3] / "shared" / "data"



def write_mnli_dev(path: Path, labels: list[str]) -> list[dict]:
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": label} for i, label in enumerate(labels)]
    path.write_text("".join(json.dumps({**row, "mnli_split": "dev_matched"}) + "\n" for row in rows))
    return rows


def drawn(task: str, path: Path, limit: int | None = None, seed: int = 0) -> list[dict]:
    """The rows ``loraswap eval --task TASK --data PATH --limit LIMIT --sample-seed SEED`` evaluates."""
    return eval_sample(task, read_eval(task, path), limit, seed)


def test_an_nli_limit_draws_a_seeded_sample_that_holds_every_label(tmp_path):
    """As in MNLI dev_matched, whose first 100 pairs hold no neutral one: a limit is not the first rows."""
    path = tmp_path / "mnli.jsonl"
    rows = write_mnli_dev(path, ["entailment"] * 60 + ["contradiction"] * 40 + ["neutral"] * 20)
    for limit in (3, 10, 100):
        for seed in range(4):
            sample = drawn("nli", path, limit, seed)
            assert len(sample) == limit
            assert {row["label"] for row in sample} == {"entailment", "contradiction", "neutral"}
            assert sample == [row for row in rows if row in sample]  # distinct rows, in the file's order
    assert len({row["label"] for row in drawn("nli", path, 2, 0)}) == 2
    assert drawn("nli", path, 10, 0) == drawn("nli", path, 10, 0) != drawn("nli", path, 10, 1)
    assert drawn("nli", path) == drawn("nli", path, 500, 0) == rows


def test_a_squad_limit_draws_a_seeded_sample_of_questions(tmp_path):
    answers = [{"text": "Ann", "answer_start": 0}]
    qas = [{"id": f"q{i}", "question": f"Question {i}?", "answers": answers} for i in range(50)]
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "Ann met Bob.", "qas": qas}]}]}))
    ids = [[row["id"] for row in drawn("squad", path, 5, seed)] for seed in (0, 0, 1)]
    assert ids[0] == ids[1] != ids[2] and len(set(ids[0])) == 5
    assert ids[0] != [f"q{i}" for i in range(5)]
    assert ids[0] == sorted(ids[0], key=lambda qid: int(qid[1:]))  # in the file's order

# ---- SQuAD tokenisation ---------------------------------------------------------------------------
def test_squad_loss_only_on_the_answer_and_the_stop_newline(tok):
    row = squad_row("Paris is the capital of France.", "Paris", "What is the capital of France?")
    example = encode_squad(row, tok, max_length=256)
    prompt, target = split(tok, example)
    assert prompt == answer_prompt(row["context"], row["question"])
    assert target == answer_target("Paris") == " Paris\n"
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_squad_answer_near_the_end_of_a_long_context(tok):
    context = FILLER * 30 + "The capital of the province is Zorbaville."
    example = encode_squad(squad_row(context, "Zorbaville"), tok, max_length=96)
    assert len(example["input_ids"]) <= 96
    prompt, target = split(tok, example)
    kept = kept_context(prompt)
    assert target == " Zorbaville\n"
    assert prompt.endswith("\nQuestion: What is the capital of the province?\nAnswer:")  # the whole question
    assert "Zorbaville" in kept and context.endswith(kept)  # the window runs up to the context's end
    assert len(kept) < len(context) / 4  # the front was dropped
    assert len(example["input_ids"]) >= 90  # and the budget was used, not wasted


def test_squad_answer_at_the_start_of_a_long_context(tok):
    context = "Zorbaville is the capital of the province. " + FILLER * 30
    example = encode_squad(squad_row(context, "Zorbaville"), tok, max_length=96)
    prompt, target = split(tok, example)
    kept = kept_context(prompt)
    assert len(example["input_ids"]) <= 96 and target == " Zorbaville\n"
    assert kept.startswith("Zorbaville is the capital") and len(kept) < len(context) / 4


def test_squad_answer_in_the_middle_keeps_text_on_both_sides(tok):
    context = FILLER * 15 + "The capital of the province is Zorbaville. " + FILLER * 15
    example = encode_squad(squad_row(context, "Zorbaville"), tok, max_length=96)
    kept = kept_context(split(tok, example)[0])
    assert len(example["input_ids"]) <= 96
    assert kept.strip() in context and "Zorbaville" in kept
    before, after = kept.split("Zorbaville")
    assert len(before) > 50 and len(after) > 50  # a window centred on the answer


def test_squad_fixes_a_wrong_answer_start_and_drops_what_cannot_fit(tok):
    row = squad_row("Ann met Bob in Paris.", "Paris")
    row["answer_starts"] = [0]
    assert split(tok, encode_squad(row, tok, 256))[1] == " Paris\n"
    row["answers"] = ["London"]
    assert encode_squad(row, tok, 256) is None  # the answer is not in the context
    long_question = squad_row(FILLER * 3 + "Zorbaville.", "Zorbaville", question="Which? " * 80)
    assert encode_squad(long_question, tok, 64) is None  # question + answer alone exceed the budget


def test_answer_window_is_centred_and_shifts_at_the_edges():
    assert answer_window(50, 52, 100, 10) == (46, 56)
    assert answer_window(1, 3, 100, 10) == (0, 10)
    assert answer_window(97, 100, 100, 10) == (90, 100)
    assert answer_window(0, 100, 100, 100) == (0, 100)


# ---- NLI tokenisation and batching ----------------------------------------------------------------
def test_nli_loss_only_on_the_label(tok):
    row = {"premise": "A man sleeps.", "hypothesis": "A man is awake.", "label": "contradiction"}
    prompt, target = split(tok, encode_label(row, tok, 128))
    assert prompt == nli_prompt(row["premise"], row["hypothesis"])
    assert target == label_target("contradiction")
    assert encode_label(row, tok, 8) is None


def test_encode_rows_drops_unknown_labels(tok):
    rows = [{"premise": "p", "hypothesis": "h", "label": label} for label in ("neutral", "-", "not_entailment")]
    assert len(encode_rows("nli", rows, tok, 64)[0]) == 1
    assert len(encode_rows("rte", rows, tok, 64)[0]) == 1


def test_collator_pads_to_the_longest_with_ignored_labels(tok):
    rows = [{"premise": "A dog.", "hypothesis": "An animal.", "label": "entailment"},
            {"premise": "A dog runs across the big green field.", "hypothesis": "A cat sleeps.", "label": "neutral"}]
    examples, _ = encode_rows("nli", rows, tok, 128)
    batch = collator(tok)(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, longest)
    short = len(examples[0]["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (longest - short)
    assert batch["labels"][0, short:].tolist() == [IGNORE_INDEX] * (longest - short)
    assert batch["labels"][0, :short].tolist() == examples[0]["labels"]


def test_a_paragraph_hidden_among_others_keeps_its_answers_at_their_offsets():
    paragraphs = [(f"article {i % 5}", f"Paragraph {i} says {i * 7}.") for i in range(30)]
    rows = [{"id": str(i), "title": title, "context": context, "question": "q", "answers": [f"{i * 7}"],
             "answer_starts": [context.index(f"{i * 7}")]} for i, (title, context) in enumerate(paragraphs[:6])]
    documents = hidden_in_documents(rows, paragraphs, 20, seed=1)
    assert documents == hidden_in_documents(rows, paragraphs, 20, seed=1)  # seeded
    for row, document in zip(rows, documents):
        parts = document["context"].split("\n\n")
        assert len(parts) == 21 and row["context"] in parts
        assert not {context for title, context in paragraphs if title == row["title"]} & set(parts) - {row["context"]}
        start = document["answer_starts"][0]
        assert document["context"][start:start + len(row["answers"][0])] == row["answers"][0]
    with pytest.raises(ValueError):
        hidden_in_documents(rows, paragraphs, 25, seed=1)  # 24 paragraphs of other articles

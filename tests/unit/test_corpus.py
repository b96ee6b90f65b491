"""The committed corpus of the tiny tokenizer: it is all the tokenizer needs, and it is what its generator writes."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tests.conftest import missing_real_data
from tests.data.make_corpus import NLI_SAMPLE, SOURCES, SQUAD_SAMPLE, write_corpus
from tests.tiny_models import build_tokenizer
from training.data import data_dir


def test_the_tokenizer_trains_without_the_real_data(monkeypatch, tmp_path, tiny_tokenizer_dir):
    monkeypatch.setenv("LORASWAP_DATA_DIR", str(tmp_path / "absent"))
    build_tokenizer(tmp_path / "tokenizer")
    built, session = (AutoTokenizer.from_pretrained(path) for path in (tmp_path / "tokenizer", tiny_tokenizer_dir))
    assert built.get_vocab() == session.get_vocab()


def test_a_real_data_test_skips_when_its_file_is_absent(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASWAP_DATA_DIR", str(tmp_path))
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "dev.json").write_text("{}")
    assert missing_real_data(("squad/dev.json",)) is None
    reason = missing_real_data(("squad/dev.json", "nli/mnli.jsonl.gz"))
    assert "nli/mnli.jsonl.gz" in reason and "squad/dev.json" not in reason and str(tmp_path) in reason


@pytest.mark.real_data(*SOURCES.values())
def test_the_committed_sample_is_what_the_generator_writes(tmp_path):
    written = write_corpus(data_dir(), tmp_path)
    assert [path.name for path in written] == [SQUAD_SAMPLE.name, NLI_SAMPLE.name]
    for path in written:
        assert path.read_bytes() == (SQUAD_SAMPLE.parent / path.name).read_bytes(), path.name

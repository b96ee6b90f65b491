"""Session fixtures: tiny real tokenizer, GPT-2 and Llama bases, and LoRA adapters on them; module
fixtures over both bases with the three ranked adapters of ``tests.lora_helpers``."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.lora_helpers import BASES, make_ranked_adapters
from tests.tiny_models import build_gpt2, build_llama, build_tokenizer, make_adapter


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (vocab 1000) trained on SQuAD and MNLI text."""
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

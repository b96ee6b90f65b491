"""Adapter folders built to hurt: files that are folders, configs nested past any parser's depth, and symlinked
files inside an adapter root that lead out of it. Each is refused with a clear AdapterError and the registry is
left as it was; none raises anything else."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from service.errors import AdapterError, AdapterPathRefused
from service.http.errors import status_of
from service.lora.adapter_files import CONFIG_FILE, WEIGHTS_FILE
from service.lora.registry import AdapterRegistry
from tests.lora_helpers import load_model


def folder_as_config(folder: Path, _: Path) -> None:
    (folder / CONFIG_FILE).unlink()
    (folder / CONFIG_FILE).mkdir()


def deeply_nested_config(folder: Path, _: Path) -> None:
    (folder / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)


def linked_out(name: str):
    """``name`` in the adapter folder becomes a symlink to a copy of it outside every root."""
    def link(folder: Path, outside: Path) -> None:
        target = outside / f"{folder.name}_{name}"
        shutil.move(folder / name, target)
        os.symlink(target, folder / name)
    return link


HOSTILE = {
    "folder_as_config": (folder_as_config, AdapterError, "cannot be read"),
    "deeply_nested_config": (deeply_nested_config, AdapterError, "not valid JSON"),
    "weights_linked_out": (linked_out(WEIGHTS_FILE), AdapterPathRefused, "symlink to a file outside"),
    "config_linked_out": (linked_out(CONFIG_FILE), AdapterPathRefused, "symlink to a file outside"),
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_adapter_folders_are_refused_and_change_nothing(kind, tiny_llama_dir, llama_adapters, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    folder = shutil.copytree(llama_adapters["one"], root / kind)
    shutil.copytree(llama_adapters["two"], root / "good")
    make, error, fragment = HOSTILE[kind]
    make(folder, outside)
    registry = AdapterRegistry(load_model(tiny_llama_dir), roots=[root], max_resident=2, max_rank=64)
    registry.register("good", root / "good")
    before = registry.describe()
    with pytest.raises(error, match=fragment) as refused:
        registry.register("hostile", folder)
    assert 400 <= status_of(type(refused.value)) < 500
    assert registry.describe() == before


def test_a_symlink_that_stays_inside_the_folder_is_read(tiny_llama_dir, llama_adapters, tmp_path):
    folder = shutil.copytree(llama_adapters["one"], tmp_path / "root" / "linked")
    shutil.move(folder / WEIGHTS_FILE, folder / "weights.safetensors")
    os.symlink(folder / "weights.safetensors", folder / WEIGHTS_FILE)
    registry = AdapterRegistry(load_model(tiny_llama_dir), roots=[tmp_path / "root"], max_resident=2, max_rank=64)
    registry.register("linked", folder)
    assert registry.names() == ["linked"]

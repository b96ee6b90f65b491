"""Adapter folders built to hurt: files that are folders, configs nested past any parser's depth, and symlinked
files inside an adapter root that lead out of it. Each is refused with a clear AdapterError and the registry is
left as it was; none raises anything else."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from service.errors import AdapterError, AdapterPathRefused
from service.http.errors import status_of
from service.lora.adapter_files import CONFIG_FILE, WEIGHTS_FILE
from service.lora.card import CARD_FILE
from service.lora.registry import AdapterRegistry
from tests.lora_helpers import load_model


def folder_as_config(folder: Path, _: Path) -> None:
    (folder / CONFIG_FILE).unlink()
    (folder / CONFIG_FILE).mkdir()


def deeply_nested_config(folder: Path, _: Path) -> None:
    (folder / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)


def key_twice(name: str, key: str | None = None):
    """``name`` (JSON) in the adapter folder names ``key`` (default: its first) twice in one object, the second
    time with another value where it can: JSON leaves open which one counts."""
    def repeat(folder: Path, _: Path) -> None:
        path = folder / name
        data = path.read_bytes()
        at, text = (8, data[8:8 + int.from_bytes(data[:8], "little")]) if name == WEIGHTS_FILE else (0, data)
        document = json.loads(text)
        named = key or next(name for name in document if name != "__metadata__")
        value = document[named] * 2 if isinstance(document[named], int | float) else document[named]
        repeated = text.rstrip()[:-1] + f', {json.dumps(named)}: {json.dumps(value)}}}'.encode()
        path.write_bytes(len(repeated).to_bytes(8, "little") + repeated + data[at + len(text):] if at else repeated)
    return repeat


def card_key_twice(folder: Path, _: Path) -> None:
    calibration = '{"temperature": %s, "labels": ["entailment", "neutral", "contradiction"]}'
    (folder / CARD_FILE).write_text(f'{{"label_calibration": {calibration % 1.5}, "label_calibration": '
                                    f'{calibration % 0.5}}}')


def linked_out(name: str):
    """``name`` in the adapter folder becomes a symlink to a copy of it outside every root."""
    def link(folder: Path, outside: Path) -> None:
        target = outside / f"{folder.name}_{name}"
        shutil.move(folder / name, target)
        os.symlink(target, folder / name)
    return link


def in_a_loop(name: str):
    """``name`` in the adapter folder becomes a symlink to itself (pathlib's resolve raised RuntimeError for it)."""
    def link(folder: Path, _: Path) -> None:
        (folder / name).unlink(missing_ok=True)
        os.symlink(name, folder / name)
    return link


HOSTILE = {
    "folder_as_config": (folder_as_config, AdapterError, "adapter_config.json is not a regular file"),
    "deeply_nested_config": (deeply_nested_config, AdapterError, "not valid JSON"),
    "config_key_twice": (key_twice(CONFIG_FILE, "lora_alpha"), AdapterError, '"lora_alpha" appears 2 times'),
    "tensor_named_twice": (key_twice(WEIGHTS_FILE), AdapterError, "appears 2 times"),  # safetensors takes it
    "card_key_twice": (card_key_twice, AdapterError, '"label_calibration" appears 2 times'),
    "weights_linked_out": (linked_out(WEIGHTS_FILE), AdapterPathRefused, "symlink to a file outside"),
    "config_linked_out": (linked_out(CONFIG_FILE), AdapterPathRefused, "symlink to a file outside"),
    "card_in_a_loop": (in_a_loop(CARD_FILE), AdapterError, "card.json is a symlink that cannot be followed"),
    "config_in_a_loop": (in_a_loop(CONFIG_FILE), AdapterError, "adapter_config.json is a symlink that cannot"),
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

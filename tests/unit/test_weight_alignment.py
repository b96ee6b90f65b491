"""Aligning the data of a safetensors file (service.model.weight_alignment), and the embedded base's weights served
from it aligned."""
import os
import struct
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from service.model.base_model import align_weights, load_base
from service.model.weight_alignment import ALIGNMENT, align, data_start
from service.settings import Settings

TENSORS = {"a.weight": torch.arange(12.0).view(3, 4), "b.bias": torch.arange(5, dtype=torch.float16),
           "c": torch.tensor([7], dtype=torch.int64)}


def saved(path, metadata=None):
    """``TENSORS`` saved at ``path``; without ``metadata``, with a note whose length puts the data off alignment
    (safetensors pads the header to 8 bytes only)."""
    for length in range(ALIGNMENT):
        save_file(TENSORS, path, metadata=metadata or {"note": "x" * length})
        if metadata or data_start(path) % ALIGNMENT:
            return path
    raise AssertionError("no note put the data off alignment")


def loaded(path):
    with safe_open(path, "pt") as handle:
        return load_file(path), handle.metadata()


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"note": "x" * 9}, {"note": "y" * 64},
                                      {"note": "z" * 4000}])
def test_aligning_moves_the_data_to_a_multiple_of_64_and_changes_no_tensor(tmp_path, metadata):
    path = saved(tmp_path / "model.safetensors", metadata)
    before, start = path.read_bytes(), data_start(path)
    assert align(path) is bool(start % ALIGNMENT)
    assert data_start(path) % ALIGNMENT == 0 and path.read_bytes()[data_start(path):] == before[start:]
    tensors, kept = loaded(path)
    assert (kept == metadata or metadata is None) and tensors.keys() == TENSORS.keys()
    assert all(torch.equal(tensors[name], TENSORS[name]) and tensors[name].dtype == TENSORS[name].dtype
               for name in TENSORS)


def test_an_aligned_file_is_left_as_it_is(tmp_path):
    path = saved(tmp_path / "model.safetensors")
    align(path)
    stat = path.stat()
    assert align(path) is False
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_the_header_is_padded_with_spaces_and_the_mode_kept(tmp_path):
    path = saved(tmp_path / "model.safetensors")
    start, header = data_start(path), path.read_bytes()[8:data_start(path)]
    os.chmod(path, 0o600)
    assert start % ALIGNMENT and align(path)
    assert path.read_bytes()[8:data_start(path)] == header + b" " * (data_start(path) - start)
    assert path.stat().st_mode & 0o777 == 0o600
    assert not path.with_name("model.safetensors.aligning").exists()


def test_a_copy_left_by_a_killed_aligner_is_replaced(tmp_path):
    path = saved(tmp_path / "model.safetensors")
    path.with_name("model.safetensors.aligning").write_bytes(b"half a file")
    assert data_start(path) % ALIGNMENT and align(path)
    assert not path.with_name("model.safetensors.aligning").exists() and loaded(path)[0].keys() == TENSORS.keys()


def test_a_failed_alignment_leaves_the_file_and_no_half_copy(tmp_path, monkeypatch):
    """A full disk or a file that cannot be replaced left the half-written copy beside the cache (review)."""
    path = saved(tmp_path / "model.safetensors")
    before = path.read_bytes()

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("service.model.weight_alignment.shutil.copyfileobj", full)
    with pytest.raises(OSError, match="No space"):
        align(path)
    assert path.read_bytes() == before and not path.with_name("model.safetensors.aligning").exists()


def test_processes_aligning_one_file_at_once_align_it_once(tmp_path):
    path = saved(tmp_path / "model.safetensors")
    results = []
    threads = [threading.Thread(target=lambda: results.append(align(path))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, False, False, True] and data_start(path) % ALIGNMENT == 0


@pytest.mark.parametrize("content", [b"", b"\x01\x02", struct.pack("<Q", 100) + b"{}", struct.pack("<Q", 2**63)])
def test_a_file_without_a_whole_header_is_a_value_error_and_left_as_it_is(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a safetensors file"):
        align(path)
    assert path.read_bytes() == content and not path.with_name("model.safetensors.aligning").exists()


def test_a_folder_that_cannot_be_written_is_served_unaligned_with_a_warning(tmp_path, caplog, monkeypatch):
    path = saved(tmp_path / "model.safetensors")
    before = path.read_bytes()

    def refuse(*_):
        raise PermissionError("read-only file system")

    monkeypatch.setattr("service.model.weight_alignment.os.replace", refuse)
    align_weights(tmp_path)
    assert path.read_bytes() == before and "serving them unaligned" in caplog.text


@pytest.mark.smollm2
def test_the_embedded_base_is_served_from_aligned_weights():
    """Every weight of SmolLM2 as loaded on the CPU (views of its converted cache) starts at a multiple of 64 bytes:
    before, the file's data began 40 bytes past a 64-byte boundary, and so did every weight."""
    model, _ = load_base(Settings(device="cpu"))
    misaligned = {name: parameter.data_ptr() % ALIGNMENT for name, parameter in model.named_parameters()
                  if parameter.data_ptr() % ALIGNMENT}
    assert not misaligned

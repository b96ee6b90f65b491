"""Pages of a file map leave memory and come back unchanged; anonymous memory is never touched."""
from __future__ import annotations

import mmap

import torch

from loadtest.host_memory import rss_bytes
from service.model.file_pages import mapped_copy, private_file_maps, release

SIZE = 64 * 2**20  # bytes


def test_a_private_file_map_gives_its_pages_back_and_reads_them_again(tmp_path):
    path = tmp_path / "weights.bin"
    expected = torch.arange(SIZE // 4, dtype=torch.float32)
    expected.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=SIZE // 4, dtype=torch.float32)  # MAP_PRIVATE
    assert torch.equal(mapped, expected)  # every page read, so resident
    before = rss_bytes()
    assert release(mapped[1:], private_file_maps())  # a view that starts mid-page: its whole pages only
    assert before - rss_bytes() > 0.9 * SIZE
    assert torch.equal(mapped, expected)  # read back from the file


def test_anonymous_memory_is_left_alone():
    tensor = torch.arange(SIZE // 4, dtype=torch.float32)
    assert not release(tensor, private_file_maps())
    assert torch.equal(tensor, torch.arange(SIZE // 4, dtype=torch.float32))


def _maps_starting_at(address: int) -> list[str]:
    return [line for line in open("/proc/self/maps") if int(line.split("-")[0], 16) == address]


def test_a_mapped_copy_is_equal_and_its_memory_leaves_with_it():
    original = torch.arange(SIZE // 4, dtype=torch.float32).view(-1, 1024).t()  # not contiguous
    copy = mapped_copy(original)
    assert torch.equal(copy, original) and copy.is_contiguous() and copy.dtype == original.dtype
    address = copy.data_ptr()
    assert address % mmap.PAGESIZE == 0 and len(_maps_starting_at(address)) == 1  # a map of its own
    before = rss_bytes()
    del copy
    assert not _maps_starting_at(address)
    assert before - rss_bytes() > 0.9 * SIZE  # unmapped, not kept as free space by malloc


def test_a_mapped_copy_of_an_empty_or_odd_sized_tensor():
    for tensor in (torch.empty(0, 3), torch.arange(5, dtype=torch.int8), torch.ones(3, dtype=torch.bfloat16)):
        copy = mapped_copy(tensor)
        assert copy.shape == tensor.shape and copy.dtype == tensor.dtype and torch.equal(copy, tensor)

"""Pages of a file map leave memory and come back unchanged; anonymous memory is never touched; copies and zeros in maps
of their own leave memory with them, and zeros take memory only where written."""
from __future__ import annotations

import mmap
from pathlib import Path

import torch

from loadtest.host_memory import rss_bytes
from service.model.file_pages import mapped_copy, mapped_zeros, private_file_maps, release

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


def _resident_in_map(address: int) -> int:
    """Bytes resident in the map that starts at ``address`` (its ``Rss`` in /proc/self/smaps): the map's own pages,
    whatever else the process allocates meanwhile (a reduction's temporaries)."""
    found = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split()[0]:  # a map's first line: its address range
            found = int(line.split("-")[0], 16) == address
        elif found and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no map starts at {address:#x}")


def test_mapped_zeros_take_memory_only_where_written_and_leave_with_their_tensor():
    zeros = mapped_zeros((4, SIZE // 16), torch.float32)  # SIZE bytes
    address = zeros.data_ptr()
    assert zeros.is_contiguous() and address % mmap.PAGESIZE == 0 and len(_maps_starting_at(address)) == 1
    assert not zeros.any() and _resident_in_map(address) < 0.1 * SIZE  # read, never written: the kernel's zero page
    zeros[1].fill_(1.0)  # a quarter written
    assert 0.2 * SIZE < _resident_in_map(address) < 0.3 * SIZE and zeros.sum() == SIZE // 16
    before = rss_bytes()
    del zeros
    assert not _maps_starting_at(address) and before - rss_bytes() > 0.2 * SIZE  # the written quarter left


def test_mapped_zeros_of_any_shape_and_dtype():
    for shape, dtype in (((0, 3), torch.float32), ((5,), torch.int8), ((2, 3, 4), torch.bfloat16)):
        zeros = mapped_zeros(shape, dtype)
        assert zeros.shape == shape and zeros.dtype == dtype and not zeros.any()

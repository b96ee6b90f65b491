"""Pages of a file map leave memory and come back unchanged; anonymous memory is never touched."""
from __future__ import annotations

import torch

from loadtest.host_memory import rss_bytes
from service.model.file_pages import private_file_maps, release

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

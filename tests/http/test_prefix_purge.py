"""Deleting an adapter drops its prefix cache blocks (``Engine.purge_prefixes``), those computed through its slot and
those computed while it was merged, on the engine thread, and leaves every other weights' blocks; on a live in-process
server over the tiny Llama."""
from __future__ import annotations

import pytest

from tests.server_helpers import ADMIN, ask, ready_client, settings_in


@pytest.fixture
def client(tiny_llama_dir, llama_adapters, tmp_path):
    with ready_client(settings_in(tmp_path, tiny_llama_dir, llama_adapters, prefix_block_tokens=8)) as client:
        yield client


def chains(cache) -> dict[tuple[int, bool], int]:
    """The cache's chains by the weights key of their first block: how many first blocks each has."""
    firsts = [block.key[0] for block in cache._blocks.values() if isinstance(block.key[0], tuple)]
    return {key: firsts.count(key) for key in firsts}


@pytest.mark.parametrize("merged", [False, True])
def test_deleting_an_adapter_purges_its_prefix_cache_blocks(client, merged):
    runtime = client.app.state.runtime
    cache, serial = runtime.engine.prefix_cache, runtime.registry.lookup("one").serial
    for adapter in ("one", "two", None):
        ask(client, adapter)
    if merged:  # its blocks computed with it merged into the base are kept apart, under (serial, True)
        client.post("/adapters/one/merge", headers=ADMIN).raise_for_status()
        ask(client, "one")
    kept = {key: count for key, count in chains(cache).items() if key[0] != serial}
    assert (serial, False) in chains(cache) and ((serial, True) in chains(cache)) == merged and len(kept) == 2
    client.delete("/adapters/one", headers=ADMIN).raise_for_status()
    runtime.engine.call(lambda: None).result()  # controls run in order: the purge has run
    assert chains(cache) == kept
    assert cache.nbytes == sum(block.kv.nbytes for block in cache._blocks.values())

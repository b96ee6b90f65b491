"""The memory registered adapters take (service.lora.adapter_memory), held against what the registry and the LoRA
layers allocate on the tiny bases: a host copy is its weights file's elements in the banks' dtype, the banks at
their widest (a power of two of slots, at most max_resident, and the zero slot, x the largest rank x every target's
bytes a rank) are what the layers allocate; a registration past the room is refused, the registry unchanged."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from service.errors import NoRoomForAdapter
from service.lora.adapter_files import packed_bytes
from service.lora.adapter_memory import AdapterRoom, bank_bytes, bank_slots, rank_bytes
from service.lora.registry import AdapterRegistry
from service.model.device_room import adapters_dir_bytes
from service.settings import Settings
from tests.lora_helpers import activate, engine_model, load_model


def held_by_banks(registry: AdapterRegistry) -> int:
    """Bytes the layers' banks hold now: each input group's A bank and each layer's B^T bank."""
    layers = registry.layers.modules.values()
    groups = {layer.group: None for layer in layers}
    return sum(group.a.nbytes for group in groups if group.a is not None) + sum(
        layer.b_t.nbytes for layer in layers if layer.b_t is not None)


def needed(registry: AdapterRegistry, paths: dict, names: list[str]) -> tuple[int, int]:
    """(host copies, banks at their widest) of the adapters ``names`` (of ``paths``) registered together."""
    host = sum(packed_bytes(paths[name], registry.dtype) for name in names)
    widest = max(int(name[1:]) for name in names)  # r2, r4, r8: the rank is in the name
    slots = bank_slots(len(names), registry.max_resident)
    return host, bank_bytes(slots, widest, rank_bytes(registry.layers.shapes, registry.dtype))


def test_a_host_copy_is_its_weights_files_elements_in_the_banks_dtype(base_dir, ranked):
    _, registry = engine_model(base_dir, ranked)
    for name, path in ranked.items():
        adapter = registry.lookup(name)
        per_rank = sum(fan_in + fan_out for _, fan_in, fan_out in adapter.layout.values())
        assert adapter.nbytes == packed_bytes(path, torch.float32) == adapter.rank * per_rank * 4, name


@pytest.mark.parametrize("max_resident", [2, 8])
def test_the_banks_at_their_widest_are_what_the_layers_allocate(base_dir, ranked, max_resident):
    """r8 targets every module, so every bank is allocated at rank 8 from the first; then each adapter made resident
    grows the banks to a power of two of slots, at most ``max_resident``."""
    _, registry = engine_model(base_dir, ranked, max_resident=max_resident)
    per_rank = rank_bytes(registry.layers.shapes, torch.float32)
    for count, name in enumerate(["r8", "r2", "r4"][:max_resident], 1):
        registry.place([registry.lookup(name)])
        assert held_by_banks(registry) == bank_bytes(bank_slots(count, max_resident), 8, per_rank), name
    assert registry.layers.banks.slots == bank_slots(3, max_resident)


def test_a_registration_past_the_room_is_refused_and_changes_nothing(base_dir, ranked):
    """Room for r8 and r2 on the CPU (one memory): both are taken, r4 is refused before its weights load, with the
    bytes needed and left; the registry and the banks are as they were, and r8 and r2 still serve."""
    registry = AdapterRegistry(load_model(base_dir), roots=[ranked["r8"].parent], max_resident=4, max_rank=64)
    room = sum(needed(registry, ranked, ["r8", "r2"]))
    registry.room = AdapterRoom(room, None, shared=True)
    for name in ("r8", "r2"):
        registry.register(name, ranked[name])
    activate(registry, ["r8", "r2"])
    before, banks = registry.describe(), held_by_banks(registry)
    with pytest.raises(NoRoomForAdapter) as refused:
        registry.register("r4", ranked["r4"])
    host, widest = needed(registry, ranked, ["r8", "r2", "r4"])
    assert f"need {host + widest} bytes for the host copies and the LoRA banks ({host} of host copies, {widest} of " \
           f"LoRA banks at their widest), more than the {room} bytes the server has left for them; delete an " \
           "adapter" in str(refused.value), refused.value
    with pytest.raises(NoRoomForAdapter):  # in place of r2: r8's and r4's copies need more than r8's and r2's
        registry.add(registry.prepare("r2", ranked["r4"], replace=True)[0], replace=True)
    assert registry.describe() == before and held_by_banks(registry) == banks
    assert activate(registry, ["r2", "r8"]) == []


def test_one_byte_short_is_refused(base_dir, ranked):
    registry = AdapterRegistry(load_model(base_dir), roots=[ranked["r8"].parent], max_resident=4, max_rank=64)
    registry.room = AdapterRoom(sum(needed(registry, ranked, ["r8"])) - 1, None, shared=True)
    with pytest.raises(NoRoomForAdapter):
        registry.register("r8", ranked["r8"])
    assert registry.names() == []


@pytest.mark.parametrize(("short", "what"), [("banks", "the LoRA banks"), ("host", "the host copies")])
def test_on_a_gpu_each_part_counts_against_its_own_memory(short, what):
    """The banks against the GPU's memory, the host copies against the host's: either short refuses, naming it."""
    room = {"banks": 100, "host": 100} | {short: 99}
    AdapterRoom(100, 100, shared=False).check(100, 100, "x")
    with pytest.raises(NoRoomForAdapter, match=f"need 100 bytes for {what} "):
        AdapterRoom(room["banks"], room["host"], shared=False).check(100, 100, "x")
    with pytest.raises(NoRoomForAdapter, match="need 200 bytes for the host copies and the LoRA banks "):
        AdapterRoom(199, None, shared=True).check(100, 100, "x")


@pytest.mark.parametrize("max_resident", [2, 8])
def test_the_start_check_counts_the_adapters_folder_as_the_registry_does(base_dir, ranked, max_resident, tmp_path):
    """A review: the check before the start counted none of the adapters folder's adapters (the banks at rank 1 on one
    layer), so a setting it advised under a container limit failed the start, the shipped squad and nli past the room
    left. It counts them as the registry bounds them once registered: their host copies and the banks at their widest
    (the folder's files as the start registers them; a config the server refuses is skipped, not counted)."""
    folder = ranked["r8"].parent
    (tmp_path / "refused").mkdir()
    (tmp_path / "refused" / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    settings = Settings(adapters_dir=folder, max_resident=max_resident, device="cpu")
    config = AutoConfig.from_pretrained(base_dir)
    registry = AdapterRegistry(load_model(base_dir), roots=[folder], max_resident=max_resident, max_rank=64)
    host, banks = needed(registry, ranked, ["r2", "r4", "r8"])
    counted, words = adapters_dir_bytes(settings, config, torch.float32, torch.device("cpu"))
    assert counted == host + banks and f"its 3 adapters at their most: {host} bytes of their host copies" in words
    assert adapters_dir_bytes(settings.model_copy(update={"adapters_dir": tmp_path}), config, torch.float32,
                              torch.device("cpu")) == (0, "no adapter in it")
    gpu, _ = adapters_dir_bytes(settings, config, torch.float32, torch.device("cuda"))
    assert gpu == banks  # on a GPU the host copies take the host's memory, not the device's

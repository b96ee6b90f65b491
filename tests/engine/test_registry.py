"""The adapter registry: LRU residency in device slots, unregistering, merge/unmerge, and what it refuses."""
from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import pytest
import torch

from service.errors import AdapterError
from service.http.errors import status_of
from service.lora.registry import AdapterRegistry
from tests.lora_helpers import (
    FP32_TOLERANCE,
    activate,
    batched_logits,
    engine_model,
    load_model,
    load_nf4_or_skip,
    peft_logits,
    random_ids,
)


def states(registry: AdapterRegistry) -> dict[str, str]:
    return {entry["name"]: entry["state"] for entry in registry.describe()}


def filled_slots(registry: AdapterRegistry) -> set[int]:
    """Bank slots that hold any non-zero LoRA weight in any layer."""
    return {
        slot
        for layer in registry.layers.modules.values() if layer.a is not None
        for slot in range(layer.a.shape[0]) if layer.a[slot].any() or layer.b_t[slot].any()
    }


@pytest.fixture(scope="module")
def expected(base_dir, ranked) -> tuple[torch.Tensor, dict]:
    """Three prompts and peft's logits for them under each adapter alone (and the bare base)."""
    ids = random_ids(3, 8, seed=5)
    return ids, {name: peft_logits(base_dir, ranked.get(name), ids) for name in (None, *ranked)}


def assert_serves(model, registry, rows, expected):
    ids, reference = expected
    ours = batched_logits(model, registry, rows, ids[: len(rows)])
    for row, name in enumerate(rows):
        error = (ours[row] - reference[name][row]).abs().max().item()
        assert error < FP32_TOLERANCE, f"row {row} ({name}) differs from peft by {error:.2e}"


def test_lru_eviction_reuses_slots_without_leaking_the_previous_adapter(base_dir, ranked, expected):
    """r8 targets every module at rank 8; r4 and r2 target fewer modules at lower ranks, so a slot that
    r8 held must be cleared where the newcomer has no weights (and beyond its rank), or outputs go wrong."""
    model, registry = engine_model(base_dir, ranked, max_resident=2)
    assert_serves(model, registry, ["r8"], expected)
    assert_serves(model, registry, ["r2"], expected)
    assert states(registry) == {"r2": "resident", "r4": "loaded", "r8": "resident"}
    assert_serves(model, registry, ["r4"], expected)  # r8 is the least recently used: r4 takes its slot
    assert states(registry) == {"r2": "resident", "r4": "resident", "r8": "loaded"}
    assert_serves(model, registry, ["r8", "r4"], expected)  # r2 evicted; the batch runs at rank 8
    assert states(registry) == {"r2": "loaded", "r4": "resident", "r8": "resident"}
    assert_serves(model, registry, ["r8"], expected)  # touch r8: r4 becomes the least recently used
    assert_serves(model, registry, ["r2"], expected)  # r2 takes r4's slot
    assert states(registry) == {"r2": "resident", "r4": "loaded", "r8": "resident"}
    assert_serves(model, registry, ["r2", "r8", None], expected)
    assert registry.resident_count == 2


def test_a_batch_needing_more_slots_than_exist_is_refused_and_the_registry_recovers(base_dir, ranked, expected):
    model, registry = engine_model(base_dir, ranked, max_resident=2)
    with pytest.raises(AdapterError) as refused:
        activate(registry, ["r2", "r4", "r8"])
    assert status_of(type(refused.value)) == 503
    assert registry.resident_count <= 2
    assert_serves(model, registry, ["r4", "r8", None], expected)
    assert_serves(model, registry, ["r2", None, "r4"], expected)


def test_unregister_forgets_the_adapter_and_clears_its_slot(base_dir, ranked, expected):
    model, registry = engine_model(base_dir, ranked, max_resident=4)
    assert_serves(model, registry, ["r2", "r8"], expected)
    assert len(filled_slots(registry)) == 2
    held = weakref.ref(registry.lookup("r8"))  # the host copy of the weights
    registry.unregister("r8")
    assert "r8" not in registry.names() and "r8" not in states(registry)
    with pytest.raises(AdapterError) as unknown:
        registry.require("r8")
    assert status_of(type(unknown.value)) == 404
    with pytest.raises(AdapterError):
        registry.unregister("r8")
    assert activate(registry, ["r8", "r2"]) == [0]  # row 0 asks for the adapter that is gone
    assert len(filled_slots(registry)) == 1  # only r2's slot still holds weights
    gc.collect()
    assert held() is None, "the unregistered adapter's host weights are still referenced"
    assert_serves(model, registry, ["r2", None], expected)
    registry.unregister("r2")
    activate(registry, [None])
    assert all(layer.a is None and layer.b_t is None for layer in registry.layers.modules.values()), "banks not freed"
    registry.register("r8", ranked["r8"])
    assert_serves(model, registry, [None, "r8"], expected)


def test_registering_leaves_no_thread_behind(base_dir, ranked, expected):
    """The threads that pack an adapter end with its registration: a thread that ran torch ops keeps an OpenMP team
    while it lives, and more teams than CPUs slow every torch op on the engine thread (service.lora.adapter_files)."""
    model, registry = engine_model(base_dir, {"r4": ranked["r4"]})
    registry.register("r8", ranked["r8"])
    registry.register("r2", ranked["r2"])
    left = [thread.name for thread in threading.enumerate() if thread.name.startswith("loraswap-pack")]
    assert not left, left
    assert_serves(model, registry, ["r8", "r2"], expected)


def test_a_name_registered_again_serves_its_new_weights(base_dir, ranked, expected):
    model, registry = engine_model(base_dir, {"r4": ranked["r4"]}, max_resident=2)
    registry.register("x", ranked["r2"])
    ids, reference = expected
    assert torch.allclose(batched_logits(model, registry, ["x"], ids[:1])[0], reference["r2"][0], atol=FP32_TOLERANCE)
    registry.unregister("x")
    registry.register("x", ranked["r8"])  # same name, other weights, before the engine activates again
    ours = batched_logits(model, registry, ["x", "r4"], ids[:2])
    assert torch.allclose(ours[0], reference["r8"][0], atol=FP32_TOLERANCE)
    assert torch.allclose(ours[1], reference["r4"][1], atol=FP32_TOLERANCE)


def test_merge_then_unmerge_restores_every_base_weight_exactly(base_dir, ranked, expected):
    model, registry = engine_model(base_dir, ranked)
    original = {name: param.detach().clone() for name, param in model.named_parameters()}
    assert_serves(model, registry, ["r2", "r4", None], expected)  # slots filled before merging
    registry.merge("r8")
    assert registry.merged == "r8" and states(registry)["r8"] == "merged"
    changed = [name for name, param in model.named_parameters() if not torch.equal(param, original[name])]
    assert changed, "merging changed no base weight"
    assert_serves(model, registry, ["r8"], expected)  # served by the merged base, no LoRA
    with pytest.raises(AdapterError) as busy:
        registry.unregister("r8")
    assert status_of(type(busy.value)) == 409
    registry.merge("r4")  # switching merges unmerges r8 first
    assert registry.merged == "r4"
    assert_serves(model, registry, ["r4"], expected)
    with pytest.raises(AdapterError) as unknown:
        registry.merge("nope")
    assert status_of(type(unknown.value)) == 404
    registry.unmerge()
    assert registry.merged is None and states(registry)["r4"] != "merged"
    for name, param in model.named_parameters():
        assert torch.equal(param, original[name]), f"{name} differs after unmerge"
    assert_serves(model, registry, ["r8", "r2", "r4"], expected)


def test_the_first_merge_on_the_cpu_writes_a_copy_and_keeps_the_loaded_weights_unwritten(arch, base_dir, ranked,
                                                                                        expected):
    """The loaded weights are the model file's pages, mapped copy-on-write: merging into them would copy them
    (and an unaligned model file leaves them unaligned, which made the in-place products 3x slower on a CPU). A
    module whose weight is rows of a fused weight (Llama's q/k/v and gate/up: fused_linears) is merged in place in
    that weight's own map, its loaded weight kept unwritten too."""
    model, registry = engine_model(base_dir, ranked)
    bases = {name: layer.base for name, layer in registry.layers.modules.items()}
    fused = {name for name, base in bases.items() if getattr(base, "fused", None) is not None}
    assert bool(fused) == (arch == "llama"), fused
    loaded = {name: base.fused.originals[base] if name in fused else base.weight.data for name, base in bases.items()}
    before = {name: bases[name].weight.data.data_ptr() for name in fused}
    snapshot = {name: weight.clone() for name, weight in loaded.items()}
    registry.merge("r8")
    assert_serves(model, registry, ["r8"], expected)
    for name in registry.layers.modules:
        assert torch.equal(loaded[name], snapshot[name]), f"merging wrote the loaded weight of {name}"
    assert {name: bases[name].weight.data.data_ptr() for name in fused} == before, "a fused row was copied"
    assert all(bases[name].weight.untyped_storage().data_ptr() == bases[name].fused.weight.untyped_storage().data_ptr()
               for name in fused), "a fused module's weight is not rows of its fused weight"
    merged_into = {bases[name].weight.data.data_ptr() for name in bases if name not in fused}
    assert not merged_into & {weight.data_ptr() for weight in loaded.values()}, "a module merges into its loaded weight"
    merged_maps = {(start, end) for start, end in maps() if start in merged_into}
    assert len(merged_maps) == len(merged_into), "a merged copy came from malloc, whose arenas keep it once freed"
    registry.unmerge()
    for name, layer in registry.layers.modules.items():
        assert torch.equal(layer.base.weight, snapshot[name]), f"{name} differs after unmerge"
    assert not merged_maps & maps(), "the merged copies' memory outlived the unmerge"


def maps() -> set[tuple[int, int]]:
    """The address range [start, end) of every map of this process (/proc/self/maps)."""
    return {tuple(int(address, 16) for address in line.split()[0].split("-"))
            for line in Path("/proc/self/maps").read_text().splitlines()}


def test_merge_is_refused_on_a_4bit_base(base_dir, ranked):
    model = load_nf4_or_skip(base_dir)
    registry = AdapterRegistry(model, roots=[ranked["r2"].parent], max_resident=2, max_rank=64)
    registry.register("r2", ranked["r2"])
    packed = {name: param.detach().clone() for name, param in model.named_parameters()}
    with pytest.raises(AdapterError) as refused:
        registry.merge("r2")
    assert status_of(type(refused.value)) == 409
    assert registry.merged is None
    assert all(torch.equal(param, packed[name]) for name, param in model.named_parameters())


def test_rank_above_max_rank_is_refused(base_dir, ranked):
    registry = AdapterRegistry(load_model(base_dir), roots=[ranked["r8"].parent], max_resident=2, max_rank=4)
    with pytest.raises(AdapterError, match="rank"):
        registry.register("r8", ranked["r8"])
    assert registry.names() == [] and registry.describe() == []
    registry.register("r4", ranked["r4"])  # rank == max_rank is fine
    assert registry.names() == ["r4"]


def test_refused_registrations_leave_the_registry_unchanged(tiny_llama_dir, llama_adapters, gpt2_adapters):
    roots = [llama_adapters["one"].parent, gpt2_adapters["one"].parent]
    registry = AdapterRegistry(load_model(tiny_llama_dir), roots=roots, max_resident=2, max_rank=64)
    registry.register("one", llama_adapters["one"])
    refusals = {
        ("gpt2", gpt2_adapters["one"]): 422,  # an adapter for another base
        ("one", llama_adapters["two"]): 409,  # the name is taken
        ("not-an-identifier", llama_adapters["two"]): 422,
        ("outside", llama_adapters["one"].parent.parent): 403,  # not inside an adapter root
    }
    for (name, path), status in refusals.items():
        with pytest.raises(AdapterError) as refused:
            registry.register(name, path)
        assert status_of(type(refused.value)) == status, (name, str(refused.value))
    assert registry.names() == ["one"]

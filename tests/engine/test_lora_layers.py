"""Batched multi-adapter LoRA layers: every row of a mixed batch gets exactly its own adapter's output.

The reference is stock peft running each row's adapter alone on a fresh copy of the base; the fast
path is also held to ``lora_delta_reference`` on random tensors.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loadtest.op_counts import OpCounts
from service.lora.layers import (
    Banks,
    BatchedLoraLayer,
    InputGroup,
    LoraLayers,
    lora_delta_reference,
)
from service.lora.slot_mapping import SlotMapping
from tests.lora_helpers import (
    FP32_TOLERANCE,
    activate,
    batched_logits,
    engine_model,
    load_model,
    logits_tolerance,
    peft_logits,
    random_ids,
)

MIXED_ROWS = ["r2", None, "r8", "r4", "r2", "r8"]


def assert_rows_match_peft(base_dir, adapters, rows, ids, ours, quantize="none", dtype="float32"):
    """Each row of ``ours`` equals peft's logits for that row's adapter run alone, within rounding."""
    reference = {name: peft_logits(base_dir, adapters.get(name), ids, quantize, dtype).float()
                 for name in {None, *rows}}
    base = reference[None]
    for row, name in enumerate(rows):
        expected = reference[name][row]
        tolerance = logits_tolerance(expected, quantize, dtype)
        error = (ours[row].float() - expected).abs().max().item()
        assert error < tolerance, f"row {row} ({name}): max |ours - peft| = {error:.2e}"
        if name is not None:  # the adapter really changes this row, so the equality above means something
            margin = 10 if dtype == "bfloat16" else 100  # bf16's rounding leaves less room (RELATIVE_TOLERANCE)
            assert (expected - base[row]).abs().max().item() > margin * tolerance, f"adapter {name} is a no-op"


def test_mixed_batch_equals_peft_per_row(base_dir, ranked):
    model, registry = engine_model(base_dir, ranked)
    ids = random_ids(len(MIXED_ROWS), 9)
    ours = batched_logits(model, registry, MIXED_ROWS, ids)
    assert_rows_match_peft(base_dir, ranked, MIXED_ROWS, ids, ours)


def test_a_bfloat16_base_on_the_cpu_mixed_batch_equals_peft_over_the_same_bfloat16_base(base_dir, ranked):
    """bf16 weights on the CPU (``--dtype bfloat16``: their linear layers through oneDNN where it computes bf16)."""
    model, registry = engine_model(base_dir, ranked, dtype="bfloat16")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    ids = random_ids(len(MIXED_ROWS), 9, seed=3)
    ours = batched_logits(model, registry, MIXED_ROWS, ids)
    assert ours.dtype == torch.bfloat16
    assert_rows_match_peft(base_dir, ranked, MIXED_ROWS, ids, ours, dtype="bfloat16")


@pytest.mark.parametrize("tokens", [7, 1])  # a prompt; a one-token step (which keeps its weights for the next)
def test_changing_the_row_mapping_changes_the_rows_weights(base_dir, ranked, tokens):
    """The weights gathered for one mapping are not reused for the next (nor once rows left the batch)."""
    model, registry = engine_model(base_dir, ranked)
    ids = random_ids(3, tokens, seed=1)
    first = batched_logits(model, registry, ["r2", "r4", "r8"], ids)
    swapped = batched_logits(model, registry, ["r8", None, "r2"], ids)
    activate(registry, ["r8", "r2"])  # row 1 finished: the batch shrinks to rows 0 and 2
    with torch.no_grad():
        shrunk = model(input_ids=ids[[0, 2]]).logits
    expected = {name: peft_logits(base_dir, ranked.get(name), ids) for name in ("r2", "r4", "r8", None)}
    for row, name in enumerate(["r2", "r4", "r8"]):
        assert torch.allclose(first[row], expected[name][row], atol=FP32_TOLERANCE)
    for row, name in enumerate(["r8", None, "r2"]):
        assert torch.allclose(swapped[row], expected[name][row], atol=FP32_TOLERANCE)
    assert torch.allclose(shrunk[0], expected["r8"][0], atol=FP32_TOLERANCE)
    assert torch.allclose(shrunk[1], expected["r2"][2], atol=FP32_TOLERANCE)
    activate(registry, ["r2"])  # the r8 row finished too: the r2 row runs at rank 2
    with torch.no_grad():
        alone = model(input_ids=ids[[2]]).logits
    assert registry.layers.mapping.rank == 2 and torch.allclose(alone[0], expected["r2"][2], atol=FP32_TOLERANCE)
    activate(registry, [])  # nobody left: no LoRA at all
    assert registry.layers.mapping.rank == 0 and registry.layers.mapping.slots is None


def test_nf4_base_mixed_batch_equals_peft_over_the_same_4bit_base(base_dir, ranked):
    model, registry = engine_model(base_dir, ranked, quantize="nf4")
    assert registry.quantized
    layers = registry.layers.modules.values()
    assert all(layer.base.weight.dtype == torch.uint8 for layer in layers), "base is not 4-bit"
    ids = random_ids(len(MIXED_ROWS), 9, seed=2)
    ours = batched_logits(model, registry, MIXED_ROWS, ids)
    assert_rows_match_peft(base_dir, ranked, MIXED_ROWS, ids, ours, quantize="nf4")


# ---- the fast path against the plain reference, on random tensors ---------------------------------

def random_pair(rank: int, fan_in: int, fan_out: int, gen: torch.Generator):
    return torch.randn(rank, fan_in, generator=gen), torch.randn(fan_out, rank, generator=gen)


RANKS = {0: 2, 1: 5, 2: 3, 3: 4}  # of the slots of the layer below; slot 4 is the zero slot
MAKEUPS = {  # each row's slot, for the grouped form
    "mixed": [2, 0, 4, 3, 2, 0],  # segments of widths 2 and 1, rows out of segment order, a cleared slot, a bare row
    "one adapter": [2] * 6,  # one segment: the batch in place, against the bank's own view
    "one per row": [2, 0, 1, 3],  # segments of width 1: the batch in place, slots out of order (one copy of each)
    "consecutive": [0, 0, 1, 1, 2, 2],  # in place, against views of consecutive slots
    "skewed": [0, 0, 2, 0, 4, 1, 0],  # widths 3, 1 and 1: two groups, rows out of order
}
# x's dims after the batch: a prompt of at least the rank's tokens (rows out of segment order take their own weights),
# a shorter one, a step, and a flat [B, in] (not the 3-D fast path)
SHAPES = {"prompt": (7,), "short prompt": (2,), "step": (1,), "flat": ()}
CASES = [("grouped", makeup, shape) for makeup in MAKEUPS for shape in SHAPES] + [("dense", "mixed", "step")]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize(("form", "makeup", "shape"), CASES)
def test_fast_paths_equal_reference_and_per_row_products(kind, form, makeup, shape):
    """Both forms (rows grouped by slot against one copy of each slot's weights; dense over all slots with a
    one-hot mask, one-token rows), over batches of any makeup."""
    gen = torch.Generator().manual_seed(3)
    fan_in, fan_out, num_slots = 12, 20, 4
    torch.manual_seed(3)
    base = nn.Linear(fan_in, fan_out) if kind == "linear" else Conv1D(fan_out, fan_in)
    mapping = SlotMapping(num_slots, dense_decode=form == "dense")
    layer = BatchedLoraLayer(base, mapping, Banks())
    # slot 1 has the largest rank (5): a batch without it runs at a smaller rank than the bank's;
    # slot 3 is written then cleared
    pairs = {slot: random_pair(rank, fan_in, fan_out, gen) for slot, rank in RANKS.items()}
    for slot, (lora_a, lora_b) in pairs.items():
        layer.group.reserve(len(lora_a), num_slots, torch.device("cpu"), torch.float32)
        bank_a, bank_b_t = layer.slot(slot)
        bank_a[: len(lora_a)], bank_b_t[: len(lora_a)] = lora_a, lora_b.t()
    for view in layer.slot(3):
        view.zero_()
    slots = torch.tensor(MAKEUPS[makeup])
    mapping.assign(slots, max(RANKS.get(slot, 0) for slot in slots.tolist()))  # the largest rank in the batch
    x = torch.randn(len(slots), *SHAPES[shape], fan_in, generator=gen)
    with torch.no_grad(), OpCounts() as ops:
        delta = layer(x) - base(x)
    assert ("bmm" in ops.counts) == (form == "grouped"), f"the other form ran: {ops.counts}"
    tokens = x.view(len(slots), -1, fan_in)
    reference = lora_delta_reference(tokens, layer.a, layer.b_t, slots).view(delta.shape)
    direct = torch.stack([
        x[row] @ pairs[slot][0].t() @ pairs[slot][1].t() if slot in (0, 1, 2) else torch.zeros_like(delta[row])
        for row, slot in enumerate(slots.tolist())
    ])
    assert torch.allclose(reference, direct, atol=1e-4)
    assert torch.allclose(delta, reference, atol=1e-4)
    moved = [row for row, slot in enumerate(slots.tolist()) if slot in (0, 1, 2)]
    assert delta[moved].flatten(1).abs().amax(dim=1).gt(100 * 1e-4).all()  # each adapter's rows really moved


@pytest.mark.parametrize(("form", "shape"), [("grouped", (7,)), ("grouped", (1,)), ("dense", (1,))])
def test_a_bank_of_fewer_slots_than_the_mapping_serves_bare_rows_bare(form, shape):
    """Banks hold the slots in use: rows of the zero slot (the mapping's ``num_slots``, past the bank) get no delta,
    in the form that gathers each row's own weights (a prompt, rows out of segment order), the grouped one and the
    dense one, whose mask has columns past the bank's."""
    gen = torch.Generator().manual_seed(5)
    fan_in, fan_out, num_slots = 12, 20, 8
    base = nn.Linear(fan_in, fan_out)
    mapping = SlotMapping(num_slots, dense_decode=form == "dense")
    layer = BatchedLoraLayer(base, mapping, Banks())
    layer.group.reserve(3, 2, torch.device("cpu"), torch.float32)  # two adapter slots and the zero slot
    assert layer.a.shape == (3, 3, fan_in)
    pairs = {slot: random_pair(3, fan_in, fan_out, gen) for slot in (0, 1)}
    for slot, (lora_a, lora_b) in pairs.items():
        bank_a, bank_b_t = layer.slot(slot)
        bank_a[:], bank_b_t[:] = lora_a, lora_b.t()
    slots = [1, num_slots, 0, num_slots, 1]
    mapping.assign(torch.tensor(slots), 3)
    x = torch.randn(len(slots), *shape, fan_in, generator=gen)
    with torch.no_grad():
        delta = layer(x) - base(x)
    for row, slot in enumerate(slots):
        expected = x[row] @ pairs[slot][0].t() @ pairs[slot][1].t() if slot < num_slots else torch.zeros_like(delta[0])
        assert torch.allclose(delta[row], expected, atol=1e-4), (row, slot)


def test_banks_grow_by_powers_of_two_of_the_slots_in_use(base_dir, ranked):
    """One resident adapter costs one slot's memory (and the zero slot's), not the registry's every slot; filling a
    slot past the banks' grows every bank, keeping what the others hold, and rows stay exact."""
    model, registry = engine_model(base_dir, ranked, max_resident=8)
    layer = next(iter(registry.layers.modules.values()))
    ids = random_ids(3, 5, seed=6)
    expected = {name: peft_logits(base_dir, ranked[name], ids) for name in ("r2", "r4", "r8")}
    batched_logits(model, registry, ["r2"] * 3, ids)
    assert registry.layers.banks.slots == 1 and layer.a.shape[0] == 2
    batched_logits(model, registry, ["r2", "r4"] * 2, random_ids(4, 5))
    assert registry.layers.banks.slots == 2 and layer.a.shape[0] == 3
    ours = batched_logits(model, registry, ["r2", "r4", "r8"], ids)
    assert registry.layers.banks.slots == 4 and layer.a.shape[0] == 5 and layer.a.shape[1] == 8
    for row, name in enumerate(["r2", "r4", "r8"]):
        assert torch.allclose(ours[row], expected[name][row], atol=logits_tolerance(expected[name][row]))


def test_layers_reading_one_input_share_one_masked_product():
    """Two members of an input group (as q and k): each row gets its own member's delta of its own slot, and
    the group's x A^T is masked once for both."""
    gen = torch.Generator().manual_seed(4)
    fan_in, num_slots = 12, 3
    torch.manual_seed(4)
    mapping, banks = SlotMapping(num_slots, dense_decode=True), Banks()
    layers = [BatchedLoraLayer(nn.Linear(fan_in, fan_out), mapping, banks) for fan_out in (20, 8)]
    InputGroup(layers)
    for layer in layers:
        for slot, rank in ((0, 2), (1, 4)):
            layer.group.reserve(rank, num_slots, torch.device("cpu"), torch.float32)
            lora_a, lora_b = random_pair(rank, fan_in, layer.out_features, gen)
            bank_a, bank_b_t = layer.slot(slot)
            bank_a[:rank], bank_b_t[:rank] = lora_a, lora_b.t()
    slots = torch.tensor([1, num_slots, 0, 1])
    mapping.assign(slots, 4)
    x = torch.randn(len(slots), 1, fan_in, generator=gen)
    with torch.no_grad():
        bases = [layer.base(x) for layer in layers]
        with OpCounts() as ops:
            deltas = [layer(x) - base for layer, base in zip(layers, bases)]
    assert ops.counts["mul_"] == 1, ops.counts
    for layer, delta in zip(layers, deltas):
        assert torch.allclose(delta, lora_delta_reference(x, layer.a, layer.b_t, slots), atol=1e-4)
        assert delta[[0, 2, 3]].abs().amin(dim=-1).gt(0).all() and not delta[1].any()


def test_modules_reading_one_input_are_grouped(arch, base_dir):
    """A Llama block's q/k/v and gate/up read one tensor each; GPT-2's fused c_attn and c_fc read their own."""
    layers = LoraLayers(load_model(base_dir), 2).modules
    groups = {tuple(name.rsplit(".", 1)[-1] for name, layer in layers.items() if layer.group is group)
              for group in {layer.group for layer in layers.values()}}
    expected = {"llama": {("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)},
                "gpt2": {("c_attn",), ("c_proj",), ("c_fc",)}}[arch]
    assert groups == expected

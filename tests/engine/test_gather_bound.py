"""What the LoRA layers copy out of their banks. A decoding step, or a prompt shorter than the rank, copies at most
one A and B^T of each distinct adapter in the batch, however many rows use it, and a batch of one adapter copies
nothing; the layers keep no more than that, for the last two mappings. A longer prompt whose rows are out of
segment order copies each row's weights for one module at a time and keeps none of them. (32 rows of one rank-64
adapter once kept 32 copies per mapping, for three mappings: 5.8 GB on SmolLM2.)"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.lora_helpers import (
    FP32_TOLERANCE,
    RANKED,
    activate,
    engine_model,
    logits_tolerance,
    peft_logits,
    random_ids,
)
from tests.tiny_models import make_adapter

PRODUCTS = {"mm", "bmm", "addmm", "baddbmm", "addmm_", "baddbmm_"}  # their outputs are activations, not weights


class BankGathers(TorchDispatchMode):
    """The new tensors that ops other than matrix products make out of the layers' banks: their bytes in all
    (``bytes``) and the largest (``largest``)."""

    def __init__(self, layers):
        super().__init__()
        self.banks = bank_storages(layers)
        self.bytes = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func.overloadpacket.__name__ not in PRODUCTS and any(storage(t) in self.banks for t in inputs):
            for made in tree_leaves(out):
                if isinstance(made, torch.Tensor) and storage(made) not in self.banks:
                    self.bytes += made.untyped_storage().nbytes()
                    self.largest = max(self.largest, made.untyped_storage().nbytes())
        return out


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def bank_storages(layers) -> set[int]:
    return {storage(bank) for layer in layers for bank in (layer.a, layer.b_t) if bank is not None}


def kept_bytes(layers) -> int:
    """Bytes of the tensors the layers hold (in their attributes, and the containers there) beyond their banks."""
    banks, seen = bank_storages(layers), set()

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)

    total = 0
    for layer in layers:
        for tensor in tensors(vars(layer)):
            if storage(tensor) not in banks | seen:
                seen.add(storage(tensor))
                total += tensor.untyped_storage().nbytes()
    return total


def one_copy_bytes(registry) -> int:
    """One adapter's A and B^T in every layer, at the rank in play."""
    rank = registry.layers.mapping.rank
    return sum(min(rank, layer.capacity) * (layer.in_features + layer.out_features) * layer.a.element_size()
               for layer in registry.layers.modules.values() if layer.a is not None)


def resident_apart(registry, ranked) -> tuple[str, str]:
    """Four adapters resident (a fourth, "extra", registered); returns one whose slot is not next to r8's, so that
    a group of both is copies, not views of the bank (which copy nothing and would meet any bound), and a third."""
    registry.register("extra", ranked["r4"])
    names = ["r2", "r4", "r8", "extra"]
    assert activate(registry, names) == []
    slot = dict(zip(names, registry.layers.mapping.slots.tolist()))
    apart = next(name for name in names if abs(slot[name] - slot["r8"]) >= 2)
    return apart, next(name for name in names if name not in ("r8", apart))


def makeup(kind: str, apart: str, third: str) -> list[str | None]:
    """The rows of a batch, r8 in each (rank 8 in play): 32 of r8; 32 of r8 and an adapter in a slot apart,
    interleaved with bare rows (segments of 8 and 16 rows); three adapters in unequal numbers (widths 4, 2, 1); one
    adapter per row, in slots apart."""
    return {"one adapter": ["r8"] * 32,
            "two apart": [["r8", apart, None, apart][row % 4] for row in range(32)],
            "uneven": ["r8", apart, "r8", third, "r8", apart, None, "r8"],
            "one per row": ["r8", apart]}[kind]


def assert_rows_are_their_adapters(base_dir, ranked, rows, tokens, logits, label):
    paths = {name: ranked.get("r4" if name == "extra" else name) for name in set(rows)}
    expected = {name: peft_logits(base_dir, path, tokens)[:, -1] for name, path in paths.items()}
    for row, name in enumerate(rows):
        error = (logits[row] - expected[name][row]).abs().max()
        assert error < logits_tolerance(expected[name][row]), f"{label}: row {row} ({name})"


def test_a_step_copies_at_most_one_copy_of_each_adapter_in_the_batch(base_dir, ranked):
    """A prompt shorter than the rank, then a one-token step, for batches of each makeup: each copies at most one A
    and B^T of each distinct adapter, however many rows use it (none for one adapter); the layers keep no more;
    every row is still its adapter's."""
    for kind in ("one adapter", "two apart", "uneven", "one per row"):
        model, registry = engine_model(base_dir, ranked)
        layers = list(registry.layers.modules.values())
        rows = makeup(kind, *resident_apart(registry, ranked))
        names = {name for name in rows if name is not None}
        assert activate(registry, rows) == [] and registry.layers.mapping.rank == 8
        bound = len(names) * one_copy_bytes(registry)
        ids = random_ids(len(rows), 5)
        for step, tokens in (("prompt", ids), ("step", ids[:, -1:])):
            with torch.no_grad(), BankGathers(layers) as gathers:
                logits = model(input_ids=tokens).logits[:, -1]
            label = f"{kind}, {step}"
            assert gathers.bytes <= bound, f"{label}: copied {gathers.bytes} bytes; {len(names)} copies are {bound}"
            assert kept_bytes(layers) <= bound, f"{label}: the layers keep {kept_bytes(layers)} bytes"
            if kind == "one adapter":  # its rows read the bank's own view of its slot
                assert gathers.bytes == kept_bytes(layers) == 0, f"{step}: one adapter's rows made copies"
            assert_rows_are_their_adapters(base_dir, ranked, rows, tokens, logits, label)


def test_a_long_prompt_out_of_segment_order_copies_each_rows_weights_one_module_at_a_time(base_dir, ranked):
    """A prompt of at least the rank's tokens, rows out of segment order: no copy larger than the rows' weights of
    one module, none kept; every row is its adapter's."""
    model, registry = engine_model(base_dir, ranked)
    layers = list(registry.layers.modules.values())
    rows = makeup("two apart", *resident_apart(registry, ranked))
    assert activate(registry, rows) == []
    rank = registry.layers.mapping.rank
    one_module = max(rank * max(layer.in_features, layer.out_features) * 4 for layer in layers)
    tokens = random_ids(len(rows), rank + 1)
    with torch.no_grad(), BankGathers(layers) as gathers:
        logits = model(input_ids=tokens).logits[:, -1]
    assert 0 < gathers.largest <= len(rows) * one_module
    assert kept_bytes(layers) == 0
    assert_rows_are_their_adapters(base_dir, ranked, rows, tokens, logits, "long prompt")


def test_a_steps_weights_are_kept_across_joins_and_other_fills_until_a_slot_they_read_is_rewritten(arch, base_dir,
                                                                                                     ranked):
    """Between two steps the engine runs the joiners' prompts, then the running rows again: the running rows'
    copied weights are kept (the next step copies nothing), also when a joiner's adapter fills another slot;
    refilling a slot they read (a name registered again with other weights of the same rank, so that nothing else
    about the step changes) copies that group again."""
    model, registry = engine_model(base_dir, ranked)
    layers = list(registry.layers.modules.values())
    apart, _ = resident_apart(registry, ranked)
    running = ["r8", apart]  # slots apart: a step copies their weights
    ids = random_ids(2, 1, seed=2)

    def step(rows: list[str | None], tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        assert activate(registry, rows) == []
        with torch.no_grad(), BankGathers(layers) as gathers:
            return model(input_ids=tokens).logits[:, -1], gathers.bytes

    assert step(running, ids)[1] > 0
    assert step(running, ids)[1] == 0, "a step of the same rows copied again"
    step(["r8", None], random_ids(2, 6))  # joiners' prompts
    assert step(running, ids)[1] == 0, "the joiners' prompts made the running rows copy again"
    registry.register("other", ranked["r4"])
    step(["other"], random_ids(1, 6))  # fills a slot the running rows do not read
    assert step(running, ids)[1] == 0, "filling another slot made the running rows copy again"
    rank, targets = RANKED[arch]["r8"]
    again = make_adapter(base_dir, ranked["r8"].parent / "r8_again", r=rank, alpha=2 * rank,
                         target_modules=targets, seed=99, scale=0.2)
    registry.unregister("r8")
    registry.register("r8", again)  # same name, other weights: its slot is refilled
    refilled, copied = step(running, ids)
    assert copied > 0
    other = ranked["r4" if apart == "extra" else apart]
    expected = [peft_logits(base_dir, path, ids)[:, -1] for path in (again, other)]
    assert torch.allclose(refilled[0], expected[0][0], atol=FP32_TOLERANCE), "stale weights were used"
    assert torch.allclose(refilled[1], expected[1][1], atol=FP32_TOLERANCE)

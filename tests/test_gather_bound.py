"""What a step gathers out of the LoRA banks: at most one copy of each distinct adapter in the batch, whatever
its rows, and what the layers keep between steps is no more (32 rows of one rank-64 adapter once held 32 copies
per mapping, for three mappings: 5.8 GB on SmolLM2)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.lora_helpers import (
    FP32_TOLERANCE,
    RANKED,
    engine_model,
    logits_tolerance,
    peft_logits,
    random_ids,
)
from tests.tiny_models import make_adapter

PRODUCTS = {"mm", "bmm", "addmm", "baddbmm", "addmm_", "baddbmm_"}  # their outputs are activations, not weights


class BankGathers(TorchDispatchMode):
    """Bytes of the new tensors that ops other than matrix products make out of the layers' banks."""

    def __init__(self, layers):
        super().__init__()
        self.banks = bank_storages(layers)
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func.overloadpacket.__name__ not in PRODUCTS and any(storage(t) in self.banks for t in inputs):
            self.bytes += sum(t.untyped_storage().nbytes() for t in tree_leaves(out)
                              if isinstance(t, torch.Tensor) and storage(t) not in self.banks)
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
    rank = registry.rows.rank
    return sum(min(rank, layer.capacity) * (layer.in_features + layer.out_features) * layer.a.element_size()
               for layer in registry.layers.values() if layer.a is not None)


def by_slot(registry) -> list[str]:
    """r2, r4 and r8 made resident, ordered by their slots, highest first. The highest and the lowest are not
    consecutive slots, so a group of both is copies, not views of the bank (which gather nothing and would meet
    any bound); rows in descending slot order make prompts (segments in the rows' order) copy too."""
    names = ["r2", "r4", "r8"]
    registry.activate(names)
    slot = dict(zip(names, registry.rows.slots.tolist()))
    return sorted(names, key=slot.get, reverse=True)


def makeup(kind: str, registry) -> list[str | None]:
    """The rows of a batch: 32 of one adapter; 32 of two adapters in slots apart, interleaved with bare rows
    (segments of 8 and 16 rows); three adapters in unequal numbers (widths 4, 2, 1); one adapter per row."""
    high, middle, low = by_slot(registry)
    return {"one adapter": ["r8"] * 32,
            "two apart": [[high, low, None, low][row % 4] for row in range(32)],
            "uneven": [high, low, high, middle, high, low, None, high],
            "one per row": [high, middle, low]}[kind]


def test_a_step_gathers_at_most_one_copy_of_each_adapter_in_the_batch(base_dir, ranked):
    """A prompt and a one-token step, for batches of each makeup: each gathers at most one copy of each distinct
    adapter's weights, however many rows use it; the layers keep no more; every row is still its adapter's."""
    model, registry = engine_model(base_dir, ranked)
    layers = list(registry.layers.values())
    ids = random_ids(32, 5)
    steps = {"prompt": ids, "one-token step": ids[:, -1:]}
    expected = {(name, step): peft_logits(base_dir, ranked.get(name), tokens)[:, -1]
                for name in ("r2", "r4", "r8", None) for step, tokens in steps.items()}
    for kind in ("one adapter", "two apart", "uneven", "one per row"):
        rows = makeup(kind, registry)
        names = {name for name in rows if name is not None}
        assert registry.activate(rows) == []
        bound = len(names) * one_copy_bytes(registry)
        for step, tokens in steps.items():
            with torch.no_grad(), BankGathers(layers) as gathers:
                logits = model(input_ids=tokens[: len(rows)]).logits[:, -1]
            assert gathers.bytes <= bound, f"{kind}, {step}: gathered {gathers.bytes} bytes, {len(names)} copies: {bound}"
            assert kept_bytes(layers) <= bound, f"{kind}, {step}: the layers keep {kept_bytes(layers)} bytes"
            if kind == "one adapter":  # its rows read the bank's own view of its slot
                assert gathers.bytes == kept_bytes(layers) == 0, f"{step}: one adapter's rows made copies"
            for row, name in enumerate(rows):
                reference = expected[name, step][row]
                error = (logits[row] - reference).abs().max()
                assert error < logits_tolerance(reference), f"{kind}, {step}: row {row} ({name})"


def test_a_steps_weights_are_kept_across_joins_and_other_fills_until_a_slot_they_read_is_rewritten(arch, base_dir,
                                                                                                     ranked):
    """Between two steps the engine runs the joiners' prompts, then the running rows again: the running rows'
    gathered weights are kept (the next step gathers nothing), also when a joiner's adapter fills another slot;
    refilling a slot they read (a name registered again with other weights of the same rank, so that nothing else
    about the step changes) gathers that group again."""
    model, registry = engine_model(base_dir, ranked)
    layers = list(registry.layers.values())
    high, _, low = by_slot(registry)
    running = [high, low]  # slots apart: a step copies their weights
    ids = random_ids(2, 1, seed=2)

    def step(rows: list[str | None], tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        assert registry.activate(rows) == []
        with torch.no_grad(), BankGathers(layers) as gathers:
            return model(input_ids=tokens).logits[:, -1], gathers.bytes

    assert step(running, ids)[1] > 0
    assert step(running, ids)[1] == 0, "a step of the same rows gathered again"
    step([running[0], None], random_ids(2, 6))  # joiners' prompts
    assert step(running, ids)[1] == 0, "the joiners' prompts made the running rows gather again"
    registry.register("other", ranked["r4"])
    step(["other"], random_ids(1, 6))  # fills a slot the running rows do not read
    assert step(running, ids)[1] == 0, "filling another slot made the running rows gather again"
    rank, targets = RANKED[arch][high]
    again = make_adapter(base_dir, ranked[high].parent / f"{high}_again", r=rank, alpha=2 * rank,
                         target_modules=targets, seed=99, scale=0.2)
    registry.unregister(high)
    registry.register(high, again)  # same name, other weights: its slot is refilled
    refilled, gathered = step(running, ids)
    assert gathered > 0
    expected = [peft_logits(base_dir, path, ids)[:, -1] for path in (again, ranked[low])]
    assert torch.allclose(refilled[0], expected[0][0], atol=FP32_TOLERANCE), "stale weights were used"
    assert torch.allclose(refilled[1], expected[1][1], atol=FP32_TOLERANCE)

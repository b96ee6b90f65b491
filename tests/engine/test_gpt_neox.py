"""A GPT-NeoX base (Pythia's architecture): its output head, found by ``get_output_embeddings``
(``layers.lora_targets``), is ``lm_head`` in transformers 5 (``embed_out`` in 4, whose checkpoints' weights 5 renames
as it loads them), and its attention reads one fused ``query_key_value`` layer. train refuses the head (by either name)
as a target, the registry an adapter on it, and an adapter on ``query_key_value``/``dense`` is served with stock
peft's logits, in a mixed batch and in decoding steps over the KV cache, gathered and dense (and on a GPU, where
there is one)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from service.errors import AdapterError
from service.lora.layers import lora_targets
from service.lora.registry import AdapterRegistry
from tests.engine.test_adapter_config import UNSERVED, edited, lora_weights_only, stock_adapter
from tests.engine.test_decode_step import CASES, Rows
from tests.engine.test_lora_layers import assert_rows_match_peft
from tests.lora_helpers import batched_logits, engine_model, load_model, random_ids
from tests.tiny_models import LINEAR_TARGETS, make_adapter
from tests.unit.test_training_refusals import TINY_RUN, refusal

ATTENTION = ["query_key_value", "dense"]  # dense ends only the attention's name: the MLP's are dense_h_to_4h, ...


@pytest.fixture(scope="module")
def neox_adapters(tiny_neox_dir, tmp_path_factory) -> dict:
    """Adapters by stock peft on the tiny GPT-NeoX: r4 on its attention (``ATTENTION``), r8 on every linear layer."""
    root = tmp_path_factory.mktemp("neox_adapters")
    return {name: make_adapter(tiny_neox_dir, root / name, r=rank, alpha=2 * rank, target_modules=targets, seed=seed,
                               scale=0.2)
            for seed, (name, rank, targets) in enumerate([("r4", 4, ATTENTION), ("r8", 8, LINEAR_TARGETS["gpt_neox"])])}


def test_the_output_head_is_no_target(tiny_neox_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_neox_dir)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear) and model.get_output_embeddings() is model.lm_head
    assert "lm_head" not in lora_targets(model)
    assert {name.rsplit(".", 1)[1] for name in lora_targets(model)} == set(LINEAR_TARGETS["gpt_neox"])


@pytest.mark.parametrize("head", ["lm_head", "embed_out"])
def test_train_refuses_the_output_head_as_a_target(head, tiny_neox_dir, nli_data, tmp_path, capsys):
    argv = ["train", *TINY_RUN, "--base-model", str(tiny_neox_dir), "--data-dir", str(nli_data), "--out",
            str(tmp_path / "new"), "--target-modules", f"query_key_value,{head}"]
    assert (f"loraswap train: error: target modules {head} match no linear layer of GPTNeoXForCausalLM that the "
            "engine applies LoRA to (those below the output head: dense, dense_4h_to_h, dense_h_to_4h, "
            "query_key_value)") in refusal(argv, capsys)
    assert not (tmp_path / "new").exists()


HEAD_ADAPTERS = {  # as the Llama's cases of test_adapter_config make them
    "config": lambda base, out: edited(base, out, target_modules=[*LINEAR_TARGETS["gpt_neox"], "lm_head"]),
    "weights": lambda base, out: lora_weights_only(stock_adapter(base, out, target_modules=[*ATTENTION, "lm_head"])),
}


@pytest.mark.parametrize("case", sorted(HEAD_ADAPTERS))
def test_the_registry_refuses_an_adapter_on_the_output_head(case, tiny_neox_dir, tmp_path):
    """Its config selecting the head, or its weights holding the head's LoRA: refused, naming the head."""
    folder = HEAD_ADAPTERS[case](tiny_neox_dir, tmp_path / "adapters" / "head")
    registry = AdapterRegistry(load_model(tiny_neox_dir), roots=[folder.parent], max_resident=4, max_rank=64)
    with pytest.raises(AdapterError, match=f"'lm_head', {UNSERVED}"):
        registry.register("head", folder)
    assert not registry.registered("head")


def test_a_mixed_batch_equals_peft_per_row(tiny_neox_dir, neox_adapters):
    model, registry = engine_model(tiny_neox_dir, neox_adapters)
    rows = ["r4", None, "r8", "r4"]
    ids = random_ids(len(rows), 9)
    assert_rows_match_peft(tiny_neox_dir, neox_adapters, rows, ids, batched_logits(model, registry, rows, ids))


@pytest.mark.parametrize(("device", "form"), CASES)
@torch.inference_mode()
def test_decoding_steps_equal_each_sequence_alone(device, form, tiny_neox_dir, neox_adapters):
    """On the GPU the steps are replayed CUDA graphs, as in test_decode_step."""
    rows = Rows(tiny_neox_dir, neox_adapters, dense=form == "dense", device=device)
    rows.join([random_ids(1, 3, 1)[0].tolist(), random_ids(1, 9, 2)[0].tolist()], ["r4", None], chunk=4)
    rows.assert_match()
    rows.join([random_ids(1, 5, 3)[0].tolist()], ["r8"])
    for tokens in ([5, 7, 9], [11, 13, 15]):
        rows.step(tokens)
    rows.assert_match()

"""The tiny test models are real: they load through the stock transformers/peft entry points."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.tasks.prompts import NLI_LABELS, label_target, nli_prompt
from tests.tiny_models import LINEAR_TARGETS

ARCHS = {"gpt2": ("tiny_gpt2_dir", "gpt2_adapters"), "llama": ("tiny_llama_dir", "llama_adapters")}


def test_tokenizer_round_trips_and_separates_labels(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(tok) == 1000
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    firsts = [tok.encode(label_target(label), add_special_tokens=False)[0] for label in NLI_LABELS]
    assert len(set(firsts)) == 3
    assert len(tok.encode("\n", add_special_tokens=False)) == 1
    text = nli_prompt("A man sleeps.", "Nobody sleeps.") + label_target("contradiction")
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("arch", ARCHS)
def test_base_loads_with_its_tokenizer(arch, request):
    base_dir = request.getfixturevalue(ARCHS[arch][0])
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_load_in_stock_peft_and_change_logits(arch, request):
    base_fixture, adapters_fixture = ARCHS[arch]
    base_dir, adapters = request.getfixturevalue(base_fixture), request.getfixturevalue(adapters_fixture)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok(nli_prompt("A dog runs in the park.", "An animal is outside."), return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        reference = base(ids).logits
    logits = {}
    for name, path in adapters.items():
        assert (path / "adapter_model.safetensors").is_file() and not (path / "adapter_model.bin").exists()
        assert sorted(json.loads((path / "adapter_config.json").read_text())["target_modules"]) == sorted(
            LINEAR_TARGETS[arch]
        )
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), path).eval()
        with torch.no_grad():
            logits[name] = model(ids).logits
        assert not torch.allclose(logits[name], reference, atol=1e-3)
    assert not torch.allclose(logits["one"], logits["two"], atol=1e-3)

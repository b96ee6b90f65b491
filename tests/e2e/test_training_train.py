"""Tiny end-to-end runs of ``loraswap train``, ``sweep`` and ``merge``, and LoRA parameter counts."""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPTNeoXConfig, OPTConfig

from service.cli.command import UsageError
from service.cli.main import build_parser
from service.model.base_model import sha256_of
from training import merge, sweep, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse(command: str, *argv) -> argparse.Namespace:
    """``argv`` as ``loraswap COMMAND`` parses it."""
    return build_parser().parse_args([command, *map(str, argv)])


def tiny_run(base: Path, out: Path, task: str = "squad", *extra) -> argparse.Namespace:
    return parse("train", "--task", task, "--out", out, "--base-model", base, "--max-steps", 4, "--max-examples", 16,
                 "--eval-examples", 4, "--batch-size", 2, "--max-length", 128, "--rank", 4, *extra)


def assert_loads_in_stock_peft(base_dir: Path, adapter: Path) -> None:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert saved and len(saved) == len(loaded)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], tensor)


@pytest.mark.real_data("squad/train-v1.1.json.gz")
def test_train_writes_a_peft_adapter_with_its_card_and_loss_curve(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "squad_tiny"
    train.run(tiny_run(tiny_llama_dir, out))
    assert "4 steps" in capsys.readouterr().out
    expected = {"adapter_config.json", "adapter_model.safetensors", "loss.png", "card.json"}
    assert {p.name for p in out.iterdir()} >= expected
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)
    card = json.loads((out / "card.json").read_text())
    assert card["task"] == "squad" and card["steps"] == 4 and card["metrics"] == {}
    assert card["base_model"] == str(tiny_llama_dir)
    assert card["base_sha256"] == sha256_of(tiny_llama_dir / "model.safetensors")
    assert card["examples"]["train"] == 16 and card["examples"]["validation"] == 4
    assert card["data"]["files"] == ["squad/train-v1.1.json.gz"]
    assert card["hyperparameters"]["target_modules"] == sorted(train.PRESETS["llama"]["attention_mlp"])
    assert card["hyperparameters"]["alpha"] == 8 and card["trainable_parameters"] > 0
    assert card["final_train_loss"] > 0 and card["final_validation_loss"] > 0
    assert shlex.split(card["command"])[:2] == ["loraswap", "train"]  # as parsed, not pytest's command line
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(tiny_llama_dir)
    assert_loads_in_stock_peft(tiny_llama_dir, out)


@pytest.mark.real_data("nli/snli_test.jsonl.gz", "nli/mnli.jsonl.gz")
def test_qlora_nf4_trains_on_the_cpu(tiny_llama_dir, tmp_path):
    # bitsandbytes 0.50 runs NF4 on the CPU. Measured: ~2 s a step on this 2-layer model, as its
    # OpenMP threads spin against torch's (OMP_WAIT_POLICY=passive brings it to milliseconds).
    out = tmp_path / "nli_nf4"
    args = tiny_run(tiny_llama_dir, out, "nli", "--quantize", "nf4", "--eval-examples", 0, "--max-length", 64)
    args.max_steps = 2
    train.run(args)
    card = json.loads((out / "card.json").read_text())
    assert card["hyperparameters"]["quantize"] == "nf4" and card["steps"] == 2
    assert card["final_validation_loss"] is None
    assert_loads_in_stock_peft(tiny_llama_dir, out)  # the adapter also fits the unquantized base


def test_target_presets_per_architecture(tiny_gpt2_dir, tiny_llama_dir):
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert train.resolve_targets("attention", gpt2) == ["c_attn"]
    assert train.resolve_targets("attention_mlp", gpt2) == ["c_attn", "mlp.c_proj"]
    assert train.resolve_targets("all_linear", gpt2) == ["c_attn", "c_fc", "c_proj"]  # lm_head left out
    assert train.resolve_targets("attention", llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert train.resolve_targets("all_linear", llama) == sorted(train.PRESETS["llama"]["attention_mlp"])
    assert train.resolve_targets("q_proj, v_proj", llama) == ["q_proj", "v_proj"]
    assert train.lora_config(gpt2, 8, None, 0.0, "attention").fan_in_fan_out
    assert train.lora_config(llama, 8, None, 0.0, "attention").lora_alpha == 16


def test_a_base_of_no_preset_family_trains_on_a_list_or_all_linear():
    """A review: ``lora_config`` asked for the base's family whatever the targets, so ``train --target-modules
    all_linear`` (or a list) on a GPT-NeoX base ended in a traceback, "no target presets", once its weights loaded."""
    config = GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=128,
                           vocab_size=100)
    neox = train.meta_model(config)
    assert train.lora_config(neox, 4, None, 0.0, "all_linear").target_modules == {
        "dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"}
    listed = train.lora_config(neox, 4, None, 0.0, "query_key_value")
    assert listed.target_modules == {"query_key_value"} and not listed.fan_in_fan_out
    assert sweep.trainable_parameters(config, 4, ["query_key_value"]) == 2 * 4 * (64 + 3 * 64)
    with pytest.raises(UsageError, match="GPTNeoXForCausalLM has neither's attention modules: target all_linear, "
                       "or name its linear layers \\(dense, dense_4h_to_h, dense_h_to_4h, query_key_value\\)"):
        train.resolve_targets("attention", neox)  # a preset names a family's modules: one line, no traceback


def test_a_preset_names_only_modules_the_base_has():
    """A review: OPT has Llama's q_proj, k_proj and v_proj, so ``family`` took it for a Llama; ``--target-modules
    attention_mlp`` trained those three alone while its card and adapter_config listed o_proj and the MLP's, which
    OPT lacks (and in a sweep attention and attention_mlp were one run twice)."""
    opt = train.meta_model(OPTConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=64, ffn_dim=128,
                                     word_embed_proj_dim=64, vocab_size=100))
    layers = "fc1, fc2, k_proj, out_proj, q_proj, v_proj"
    for preset, missing in [("attention", "o_proj"), ("attention_mlp", "o_proj, gate_proj, up_proj, down_proj")]:
        with pytest.raises(UsageError) as refused:
            train.resolve_targets(preset, opt)
        assert str(refused.value) == (f"the target preset {preset} names {missing}, not a linear layer of "
                                      f"OPTForCausalLM: target all_linear, or name its linear layers ({layers})")
    assert train.resolve_targets("all_linear", opt) == layers.split(", ")
    assert train.resolve_targets("q_proj,out_proj", opt) == ["q_proj", "out_proj"]


def test_squad_validation_holds_out_whole_articles():
    rows = [{"title": f"t{i % 7}", "n": i} for i in range(70)]
    training, validation = train.split_rows(rows, 15, seed=0)
    assert len(validation) == 15 and len(training) + len(validation) <= 70
    assert not {r["title"] for r in training} & {r["title"] for r in validation}


@pytest.mark.parametrize(
    "rank, targets, expected",
    [
        (4, ["c_attn"], 147_456),
        (8, ["c_attn"], 294_912),
        (16, ["c_attn"], 589_824),
        (8, ["c_attn", "mlp.c_proj"], 663_552),
        (32, ["c_attn", "mlp.c_proj"], 2_654_208),
    ],
)
def test_trainable_parameters_of_gpt2_small(rank, targets, expected):
    # r * (in + out) per targeted layer, 12 layers: c_attn 768 -> 2304, mlp.c_proj 3072 -> 768
    assert sweep.trainable_parameters(GPT2Config(), rank, targets) == expected


@pytest.mark.real_data("nli/snli_test.jsonl.gz", "nli/mnli.jsonl.gz")
def test_sweep_writes_tables_and_resumes(tiny_gpt2_dir, tmp_path, monkeypatch):
    args = parse("sweep", "--task", "nli", "--out", tmp_path, "--base-model", tiny_gpt2_dir, "--ranks", "2,4",
                 "--lrs", "1e-3", "--targets", "attention,c_attn+mlp.c_proj", "--max-steps", 2,
                 "--max-examples", 8, "--eval-examples", 4, "--batch-size", 4)
    rows = sweep.run_sweep(args)
    assert [r["run"] for r in rows] == ["attention_r2_lr0_001", "attention_r4_lr0_001",
                                        "c_attn_mlp_c_proj_r2_lr0_001", "c_attn_mlp_c_proj_r4_lr0_001"]
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    assert [r["trainable_parameters"] for r in rows] == [
        sweep.trainable_parameters(base, r["rank"], r["target_modules"].split()) for r in rows
    ]
    assert all(r["final_validation_loss"] > 0 for r in rows)
    assert len((tmp_path / "sweep.csv").read_text().splitlines()) == 5
    assert len((tmp_path / "sweep.md").read_text().splitlines()) == 6  # header, rule, 4 runs
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG_MAGIC)
    monkeypatch.setattr(train, "train_adapter", lambda args: pytest.fail("a finished run was trained again"))
    assert sweep.run_sweep(args) == rows


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_model_equals_base_plus_adapter(arch, request, tmp_path):
    base_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    adapter = request.getfixturevalue(f"{arch}_adapters")["one"]
    out = merge.merge_adapter(parse("merge", "--adapter", adapter, "--out", tmp_path / "merged", "--base-model",
                                    base_dir))
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits  # plain transformers
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter does change the outputs
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    assert (out / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(base_dir).chat_template


def test_a_merged_model_chats_with_the_template_its_adapter_ships(tiny_llama_dir, llama_adapters, tmp_path):
    """The server renders an adapter's chats with the template its folder ships: the merged twin carries it (it got
    the base's)."""
    adapter = shutil.copytree(llama_adapters["one"], tmp_path / "styled")
    (adapter / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    out = merge.merge_adapter(parse("merge", "--adapter", adapter, "--out", tmp_path / "merged", "--base-model",
                                    tiny_llama_dir))
    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "Hi"}],
                                                                      tokenize=False)
    assert rendered == "<user>Hi"


def test_merge_refuses_pickled_adapters(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pickled"):
        merge.adapter_dir(argparse.Namespace(adapter=str(tmp_path), adapters_dir=tmp_path))


@pytest.mark.real_data("nli/snli_test.jsonl.gz", "nli/mnli.jsonl.gz")
def test_a_qlora_adapter_serves_on_the_4bit_base(tiny_llama_dir, tmp_path):
    from service.engine.requests import Scoring
    from service.engine.scheduler import Engine
    from service.lora.registry import AdapterRegistry
    from service.model.base_model import load_base
    from service.settings import Settings

    out = tmp_path / "qlora"
    args = tiny_run(tiny_llama_dir, out, "nli", "--quantize", "nf4", "--eval-examples", 0, "--max-length", 64,
                    "--lr", 5e-2)
    args.max_steps = 2
    train.run(args)
    settings = Settings(base_model=str(tiny_llama_dir), quantize="nf4", device="cpu", auto_merge=False)
    model, tokenizer = load_base(settings)
    registry = AdapterRegistry(model, [tmp_path], max_resident=2, max_rank=64)
    registry.register("qlora", out)
    engine = Engine(model, tokenizer, registry, settings)
    engine.start()
    prompt, candidates = tokenizer.encode("Premise: a dog runs\nHypothesis: an animal moves\nRelation:"), [5, 6, 7]
    try:
        served, bare = (engine.submit(Scoring(prompt, name, candidates)).result(60) for name in ("qlora", None))
    finally:
        engine.stop()
    peft_base, _ = load_base(settings)
    peft_model = PeftModel.from_pretrained(peft_base, out).eval()
    with torch.no_grad():
        expected = peft_model(torch.tensor([prompt])).logits[0, -1, candidates].float().softmax(-1)
    assert torch.allclose(torch.tensor(served), expected, atol=1e-4)
    assert max(abs(a - b) for a, b in zip(served, bare)) > 1e-4  # the trained adapter changes the 4-bit model


def test_training_loads_the_base_where_the_trainer_trains_whatever_the_serving_device(tiny_gpt2_dir, tmp_path,
                                                                                     monkeypatch):
    """A review: ``LORASWAP_DEVICE=cuda:1 loraswap train`` on a machine without CUDA ended in torch's AssertionError
    (the serving setting reached the loader); the trainer places the model itself."""
    args = tiny_run(tiny_gpt2_dir, tmp_path / "out")
    monkeypatch.setenv("LORASWAP_DEVICE", "cuda:1")
    assert train.base_settings(args).device == "auto"

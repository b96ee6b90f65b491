"""What ``loraswap train`` records of a run: the warmup its schedule used and what it trained on, beside what was
asked; and a schedule whose warmup takes every step, refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from service.cli.main import main

TINY = ["--task", "nli", "--eval-examples", "2", "--batch-size", "2"]


def test_a_warmup_of_every_step_that_epochs_count_is_refused(tiny_gpt2_dir, nli_data, tmp_path, capsys):
    """A review: the one warmup step of a one-step run was taken at learning rate 0 (the adapter was the bare base's),
    and the card said steps 1 with a final loss. Where --epochs counts the steps, they are known once the Trainer
    batches the examples: 2 examples in a batch of 2 are 1 step, and --warmup 0.5 makes it a warmup step."""
    out = tmp_path / "adapter"
    argv = ["train", *TINY, "--max-examples", "2", "--warmup", "0.5", "--base-model", str(tiny_gpt2_dir),
            "--data-dir", str(nli_data), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.endswith("loraswap train: error: --warmup 0.5 makes 1 warmup step of the 1 optimizer step (--epochs 1 "
                        "of 2 examples in batches of 2, 1 a step): the warmup takes every step, so no step is at --lr "
                        "(the first is at learning rate 0); give a smaller --warmup (0: none) or more steps\n"), err
    assert not out.exists() and [path.name for path in tmp_path.iterdir()] == ["data"]


def test_the_card_records_the_warmup_used_and_what_was_trained_on(tiny_gpt2_dir, nli_data, tmp_path):
    """A review: 4 steps of 4 examples of 40 saw 16 (0.4 epoch), and the card said ``examples.train`` 40 and
    ``epochs`` 1.0 alone; the warmup was recorded as the share given, not the steps it made."""
    out = tmp_path / "adapter"
    argv = ["train", *TINY, "--max-steps", "4", "--max-examples", "40", "--batch-size", "4", "--warmup", "0.5",
            "--base-model", str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out)]
    assert main(argv) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["hyperparameters"]["epochs"] == 1.0 and card["hyperparameters"]["warmup"] == 0.5  # asked
    assert card["steps"] == 4 and card["warmup_steps"] == 2  # ceil(0.5 x 4), as transformers counts it
    assert card["examples"]["train"] == 40 and card["examples"]["seen"] == 16 and card["epochs_trained"] == 0.4
    weights = load_file(out / "adapter_model.safetensors")
    assert any(tensor.abs().sum() > 0 for key, tensor in weights.items() if "lora_B" in key)  # it trained


def test_one_step_without_warmup_trains(tiny_gpt2_dir, nli_data, tmp_path: Path):
    """The one step of --max-steps 1 --warmup 0 is at --lr: the adapter is no longer the bare base (lora_B zeros)."""
    out = tmp_path / "adapter"
    argv = ["train", *TINY, "--max-steps", "1", "--max-examples", "4", "--warmup", "0", "--base-model",
            str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out)]
    assert main(argv) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["steps"] == 1 and card["warmup_steps"] == 0 and card["examples"]["seen"] == 2
    weights = load_file(out / "adapter_model.safetensors")
    assert any(tensor.abs().sum() > 0 for key, tensor in weights.items() if "lora_B" in key)

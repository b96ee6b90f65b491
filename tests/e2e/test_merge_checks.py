"""``loraswap merge`` refuses what the server refuses: an adapter it would not serve is not merged either."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from service.cli.main import main
from service.settings import Settings


def spoiled(adapter: Path, tmp_path: Path, config: dict | None = None, nan_weight: bool = False) -> Path:
    """A copy of ``adapter`` with ``config`` merged into its adapter_config.json, and, with ``nan_weight``, a NaN in
    its first tensor."""
    copy = shutil.copytree(adapter, tmp_path / "spoiled")
    path = copy / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **(config or {})}))
    if nan_weight:
        weights = load_file(copy / "adapter_model.safetensors")
        first = sorted(weights)[0]
        weights[first][0, 0] = float("nan")
        save_file(weights, copy / "adapter_model.safetensors")
    return copy


@pytest.mark.parametrize("config,nan_weight,message", [
    ({"lora_alpha": float("nan")}, False, "lora_alpha nan must be a finite number"),
    ({"r": Settings().max_rank + 1}, False, f"must be an integer in 1..{Settings().max_rank}"),
    ({"use_dora": True}, False, "options the engine does not serve: use_dora"),
    (None, True, "holds non-finite weights"),
])
def test_merge_refuses_an_adapter_the_server_refuses_and_writes_nothing(config, nan_weight, message, tiny_gpt2_dir,
                                                                        gpt2_adapters, tmp_path, capsys):
    adapter, out = spoiled(gpt2_adapters["one"], tmp_path, config, nan_weight), tmp_path / "merged"
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--adapter", str(adapter), "--out", str(out), "--base-model", str(tiny_gpt2_dir)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after transformers' progress bar, where the base loaded
    assert error.startswith("loraswap merge: error: ") and message in error, error
    assert not out.exists()


def test_merge_finds_a_named_adapter_in_adapters_dir(tiny_gpt2_dir, gpt2_adapters, tmp_path):
    out = tmp_path / "merged"
    main(["merge", "--adapter", "one", "--adapters-dir", str(gpt2_adapters["one"].parent), "--out", str(out),
          "--base-model", str(tiny_gpt2_dir)])
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(("label", "base"), [
    (None, "smollm2"), ("smollm2", "smollm2"), ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2"),
    ("/models/SmolLM2-135M-Instruct", "smollm2"), ("gpt2", "gpt2"), ("org/other", "org/other"),
])
def test_merge_takes_the_base_an_adapter_names_as_the_server_takes_it(label, base):
    """A review: an adapter whose config names the Hugging Face model the embedded base's GGUF quantizes was served on
    the embedded base without a warning, and merge refused it ("--base-model HuggingFaceTB/SmolLM2-135M-Instruct: no
    Hugging Face model directory there")."""
    from training.merge import named_base

    assert named_base(label) == base


def test_merge_takes_a_model_folder_an_adapter_names_over_the_embedded_bases_name(tiny_gpt2_dir, tmp_path):
    folder = tmp_path / "SmolLM2-135M-Instruct"
    shutil.copytree(tiny_gpt2_dir, folder)
    from training.merge import named_base

    assert named_base(str(folder)) == str(folder)

"""What ``loraswap train``, ``merge`` and ``eval`` record and write: the warmup a run's schedule used and what it
trained on, beside what was asked (a warmup in a run of one step refused); the modes of the files train and
merge write; merge's card of what it merged; the adapter and data file eval read."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from service.cli.main import main
from service.model.base_model import GGUF_SHA256, converted_dir, embedded_gguf, sha256_of
from service.settings import setting
from tests.data.make_corpus import NLI_SAMPLE
from training import output_folder
from training.merge import MERGE_CARD
from training.train import base_weights

ADAPTERS = Path(__file__).parents[2] / "adapters"  # the shipped adapters, trained on SmolLM2

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
                        "of 2 examples in batches of 2, 1 a step): a warmup's first step is at learning rate 0, so "
                        "this run would train nothing; give --warmup 0 (none) or more steps\n"), err
    assert not out.exists() and [path.name for path in tmp_path.iterdir()] == ["data"]


@pytest.mark.parametrize(("steps", "warmup", "used"), [(2, "2", 2), (2, "0.99", 2), (3, "3", 3), (3, "5", 5)])
def test_a_warmup_of_every_step_of_two_or_more_trains(steps, warmup, used, tiny_gpt2_dir, nli_data, tmp_path):
    """A review: a warmup of every step was refused as one step's is, though only a warmup's first step is at learning
    rate 0 (step k + 1 at --lr x k / W): from the second on they train, as transformers takes such a schedule. Given
    as steps or as a share (0.99 of 2 rounds up to 2), and longer than the run."""
    out = tmp_path / "adapter"
    argv = ["train", *TINY, "--max-steps", str(steps), "--max-examples", "8", "--warmup", warmup, "--base-model",
            str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out)]
    assert main(argv) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["steps"] == steps and card["warmup_steps"] == used
    weights = load_file(out / "adapter_model.safetensors")
    assert any(tensor.abs().sum() > 0 for key, tensor in weights.items() if "lora_B" in key)  # it trained


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


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request) -> int:
    """The process's umask for the test (then set back), 022 (new files 0644) or 027 (0640)."""
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def modes(folder: Path) -> dict[str, int]:
    """Every file's and folder's permission bits under ``folder``, by its path there."""
    return {str(path.relative_to(folder)): stat.S_IMODE(path.stat().st_mode) for path in folder.rglob("*")}


def test_the_umask_is_read_without_changing_it(umask, monkeypatch):
    """A review: it was read by setting it and setting it back (os.umask), and a file another thread created in
    between got the mask set meanwhile. Linux says it in /proc/self/status (4.7 and later)."""
    def changed(mask):
        raise AssertionError(f"os.umask({mask:#o}) called")

    monkeypatch.setattr(os, "umask", changed)
    assert output_folder.current_umask() == umask


def test_without_the_umask_in_proc_it_is_read_by_setting_it_back(umask, monkeypatch):
    """A kernel before 4.7 writes no ``Umask`` line, another system has no /proc: the umask is then set and set back,
    and left as it was."""
    def absent(field):
        raise StopIteration(field)

    monkeypatch.setattr(output_folder, "status_value", absent)
    assert output_folder.current_umask() == umask
    assert os.umask(umask) == umask


def test_train_writes_its_files_with_the_modes_of_the_umask(tiny_gpt2_dir, nli_data, tmp_path, umask):
    """A review: adapter_model.safetensors was 0600 (safetensors 0.8 writes so) where card.json was 0644: copied into
    an image (COPY keeps modes), the container's non-root user could not read the weights."""
    out = tmp_path / "adapter"
    assert main(["train", *TINY, "--max-steps", "1", "--max-examples", "4", "--warmup", "0", "--base-model",
                 str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out)]) == 0
    assert "adapter_model.safetensors" in modes(out)
    assert set(modes(out).values()) == {0o666 & ~umask}, modes(out)


def test_merge_writes_its_files_with_the_modes_of_the_umask(tiny_gpt2_dir, gpt2_adapters, tmp_path, umask):
    """A review: model.safetensors was 0600 where config.json was 0644."""
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(gpt2_adapters["one"]), "--out", str(out), "--base-model",
                 str(tiny_gpt2_dir)]) == 0
    assert "model.safetensors" in modes(out)
    assert set(modes(out).values()) == {0o666 & ~umask}, modes(out)


def test_merge_writes_a_card_of_what_it_merged(tiny_llama_dir, llama_adapters, tmp_path):
    """A review: nothing beside the merged model said what it was made of."""
    adapter = shutil.copytree(llama_adapters["one"], tmp_path / "carded")
    (adapter / "card.json").write_text(json.dumps({"name": "carded", "task": "nli", "base_sha256": "ab" * 32,
                                                   "hyperparameters": {"rank": 4}}))
    out = tmp_path / "merged"
    argv = ["merge", "--adapter", str(adapter), "--out", str(out), "--base-model", str(tiny_llama_dir)]
    assert main(argv) == 0
    card = json.loads((out / MERGE_CARD).read_text())
    assert card["adapter"] == {"path": str(adapter.resolve()),
                               "weights_sha256": sha256_of(adapter / "adapter_model.safetensors"),
                               "card": {"name": "carded", "task": "nli", "base_sha256": "ab" * 32}}
    weights = tiny_llama_dir.resolve() / "model.safetensors"
    assert card["base"] == {"model": str(tiny_llama_dir), "dir": str(tiny_llama_dir.resolve()),
                            "weights": [{"file": str(weights), "sha256": sha256_of(weights)}]}
    assert card["command"] == shlex.join(["loraswap", *argv])  # main's argv, not this process's (pytest's)
    assert_each_checks(card)


def assert_each_checks(card: dict) -> None:
    """Every file the merge card names with a sha256 is checked by ``sha256sum -c`` from any folder: named absolute."""
    named = [card["base"].get("converted_from"), *card["base"]["weights"]]
    lines = "".join(f"{entry['sha256']}  {entry['file']}\n" for entry in named if entry)
    assert subprocess.run(["sha256sum", "--check", "--strict"], input=lines, text=True, capture_output=True,
                          cwd="/").returncode == 0, lines


@pytest.mark.smollm2
def test_a_merge_card_of_the_embedded_base_names_the_folder_merged_into_and_the_gguf_it_came_from(tmp_path):
    """A review: ``base.dir`` was the converted cache and ``base.file`` the GGUF's bare name (no such file there), its
    sha256 the GGUF's: neither said what the adapter was merged into, nor could ``sha256sum`` check the file named."""
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(ADAPTERS / "nli"), "--out", str(out)]) == 0
    base = json.loads((out / MERGE_CARD).read_text())["base"]
    cache = converted_dir(setting("cache_dir")).resolve()
    assert base["model"] == "smollm2" and base["dir"] == str(cache)
    assert [entry["file"] for entry in base["weights"]] == [str(cache / "model.safetensors")]
    assert base["converted_from"] == {"file": str(embedded_gguf().resolve()), "sha256": GGUF_SHA256}
    assert_each_checks({"base": base})


def test_a_train_card_names_each_shard_of_a_sharded_base_with_its_sha256(tiny_llama_dir, tmp_path):
    """The card's ``base_sha256`` of a sharded base was the sha256 of its shards' sha256s, which ``sha256sum`` checks
    on no file: now each shard's, in the order of ``base_file``."""
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="200KB")
    names, sums = (value.split(",") for value in base_weights(str(sharded), tmp_path / "cache"))
    assert len(names) > 1 and names == sorted(path.name for path in sharded.glob("*.safetensors"))
    lines = "".join(f"{digest}  {name}\n" for name, digest in zip(names, sums, strict=True))
    assert subprocess.run(["sha256sum", "--check", "--strict"], input=lines, text=True, capture_output=True,
                          cwd=sharded).returncode == 0, lines


def test_a_merge_card_of_an_adapter_without_a_card_names_its_folder_and_weights(tiny_gpt2_dir, gpt2_adapters,
                                                                                tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(gpt2_adapters["one"]), "--out", str(out), "--base-model",
                 str(tiny_gpt2_dir)]) == 0
    adapter = json.loads((out / MERGE_CARD).read_text())["adapter"]
    assert adapter["path"] == str(gpt2_adapters["one"].resolve()) and adapter["card"] is None
    assert adapter["weights_sha256"] == sha256_of(gpt2_adapters["one"] / "adapter_model.safetensors")


def test_an_eval_report_names_the_data_file_it_read(tiny_llama_dir, tmp_path, monkeypatch):
    """A review: the report said ``"data": "default nli dev"`` where LORASWAP_DATA_DIR placed the file elsewhere."""
    data = tmp_path / "elsewhere"
    (data / "nli").mkdir(parents=True)
    shutil.copy(NLI_SAMPLE, data / "nli" / "mnli.jsonl.gz")
    monkeypatch.setenv("LORASWAP_DATA_DIR", str(data))
    report = tmp_path / "report.json"
    main(["eval", "--task", "nli", "--adapter", "none", "--limit", "3", "--base-model", str(tiny_llama_dir),
          "--adapters-dir", str(tmp_path), "--device", "cpu", "--json", str(report)])
    report = json.loads(report.read_text())
    assert report["data"] == str((data / "nli" / "mnli.jsonl.gz").resolve())
    assert report["adapter"] is None  # the bare base: "none" was the word given


def carded(adapter: Path, folder: Path, card: dict) -> Path:
    """A copy of the adapter folder ``adapter`` at ``folder``, with ``card`` as its card.json."""
    shutil.copytree(adapter, folder)
    (folder / "card.json").write_text(json.dumps(card))
    return folder


@pytest.mark.parametrize("given", ["path", "name"])
def test_an_eval_report_names_the_adapter_evaluated_however_it_was_given(given, tiny_llama_dir, llama_adapters,
                                                                         tmp_path, monkeypatch):
    """A review: the report's ``adapter`` was --adapter as given, a name or a path relative to where eval ran: which
    folder (and which weights) was evaluated could not be told from it."""
    adapter = carded(llama_adapters["one"], tmp_path / "adapters" / "one", {"name": "one", "task": "nli", "seed": 3})
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "report.json"
    main(["eval", "--task", "nli", "--adapter", {"path": "adapters/one", "name": "one"}[given], "--limit", "3",
          "--data", str(NLI_SAMPLE), "--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path / "adapters"),
          "--device", "cpu", "--json", str(report)])
    assert json.loads(report.read_text())["adapter"] == {
        "path": str(adapter.resolve()), "weights_sha256": sha256_of(adapter / "adapter_model.safetensors"),
        "card": {"name": "one", "task": "nli"}}

"""``loraswap train`` and ``sweep`` refuse what they cannot do in one usage-error line (status 2), before the base
model's weights load: options out of range, an adapter folder that holds files, target modules the base lacks, data
that leaves nothing to train on or cannot be read, a grid that lists a value twice; ``eval`` refuses a data row it
cannot read as train does."""
from __future__ import annotations

import csv
import gzip
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.cli.command import UsageError
from service.cli.main import main
from tests.data.make_corpus import NLI_SAMPLE
from training.options import EVAL_EVERY, SEED, WARMUP
from training.output_folder import partial_folder, publish, written_whole
from training.sweep import LATE_HYPERPARAMETERS, recorded_hyperparameters

SWEEP_RESULTS = Path(__file__).parents[2] / "docs" / "results" / "sweep"
# --warmup 0: a warmup step of one step would take it at learning rate 0 (refused)
TINY_RUN = ["--task", "nli", "--max-steps", "1", "--warmup", "0", "--max-examples", "8", "--eval-examples", "2",
            "--batch-size", "2"]


def refusal(argv: list[str], capsys) -> str:
    """The one line ``loraswap`` refuses ``argv`` with (status 2), checked to come before any weights load."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith(f"loraswap {argv[0]}: error: ") and err.count("\n") == 1, err
    assert "Loading weights" not in err
    return err


@pytest.mark.parametrize("options,message", [
    (["--alpha", "nan"], "argument --alpha: must be a finite number above 0, not nan"),
    (["--alpha", "0"], "argument --alpha: must be above 0, not 0"),
    (["--dropout", "1.5"], "argument --dropout: must be in [0, 1), not 1.5"),
    (["--dropout", "1"], "argument --dropout: must be in [0, 1), not 1"),
    (["--dropout", "-0.1"], "argument --dropout: must be in [0, 1), not -0.1"),
    (["--warmup", "-1"], "argument --warmup: must be in [0, 1) (a share of all steps) or a whole number of steps "
     "(1, 2, ...), not -1"),
    (["--warmup", "nan"], "argument --warmup: must be a finite number in [0, 1)"),
    (["--warmup", "1.5"], "argument --warmup: must be in [0, 1) (a share of all steps) or a whole number of steps "
     "(1, 2, ...), not 1.5"),  # a review: transformers cut it to 1 step
    (["--seed", "-1"], "argument --seed: must be in 0..4294967295, not -1"),
    (["--seed", "99999999999999999999"], "argument --seed: must be in 0..4294967295, not 99999999999999999999"),
    (["--seed", "1" + "0" * 400], "argument --seed: must be in 0..4294967295, not 1000"),  # was an OverflowError
    (["--eval-every", "1.5"], "argument --eval-every: must be in (0, 1) (a share of all steps) or a whole number of "
     "steps (1, 2, ...), not 1.5"),
    (["--eval-every", "0"], "argument --eval-every: must be in (0, 1)"),
    (["--out", ""], "argument --out: must name a folder, not be empty"),
    (["--out", "card.json"], "argument --out: card.json is a file, not a folder"),
    (["--out", "squad"], "argument --out: squad already holds files: name a new or empty folder"),
    (["--target-modules", "q_proj,bogus"], "loraswap train: error: target modules bogus match no linear layer of "
     "LlamaForCausalLM that the engine applies LoRA to (those below the output head: down_proj, gate_proj, k_proj, "
     "o_proj, q_proj, up_proj, v_proj), or match a module it does not"),
    # a review: the head passed (it is a linear layer) and the adapter was one serve and merge refuse
    (["--target-modules", "q_proj,lm_head"], "loraswap train: error: target modules lm_head match no linear layer of "
     "LlamaForCausalLM that the engine applies LoRA to"),
    (["--target-modules", "embed_tokens"], "loraswap train: error: target modules embed_tokens match no linear layer"),
    (["--target-modules", "model.layers.0.mlp"], "loraswap train: error: target modules model.layers.0.mlp match no "),
    # a review: the one warmup step of --max-steps 1 was at learning rate 0, and the adapter the bare base
    (["--warmup", "0.03"], "loraswap train: error: --warmup 0.03 makes 1 warmup step of the 1 optimizer step "
     "(--max-steps 1): a warmup's first step is at learning rate 0, so this run would train nothing"),
    (["--warmup", "1"], "--warmup 1 makes 1 warmup step of the 1 optimizer step (--max-steps 1)"),  # as steps
    (["--warmup", "3"], "--warmup 3 makes 3 warmup steps of the 1 optimizer step (--max-steps 1)"),
    (["--max-length", "5"], "loraswap train: error: all 8 nli training rows were dropped, as longer than "
     "--max-length 5 tokens"),
    (["--eval-examples", "100000"], "loraswap train: error: --eval-examples 100000 leaves none of the 300 nli rows "
     "to train on"),
    # a rank torch cannot allocate: RuntimeError once the weights had loaded (a review)
    (["--rank", "33"], "loraswap train: error: --rank 33 is above 32, the smaller dimension of the target layer "
     "model.layers.0.self_attn.k_proj: a LoRA update of it has rank 32 at most; give a rank of at most 32"),
    (["--rank", str(2**63 - 1), "--target-modules", "q_proj"], f"--rank {2**63 - 1} is above 64"),
])
def test_train_refuses_before_the_base_loads(options, message, tiny_llama_dir, nli_data, tmp_path, monkeypatch,
                                             capsys):
    """A review: ``--out adapters/squad`` wrote over the shipped adapter, ``--out ''`` wrote into the current folder
    and an existing file's name raised FileExistsError after the base loaded; --alpha nan trained on NaN losses;
    the rest ended in tracebacks of torch, transformers or peft (num_samples=0 for data left empty; numpy's 'Seed must
    be between 0 and 2**32 - 1'; '--eval_steps must be an integer if bigger than 1' once the weights had loaded)."""
    monkeypatch.chdir(tmp_path)
    adapter = tmp_path / "squad"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (tmp_path / "card.json").write_text("{}")
    argv = ["train", *TINY_RUN, "--base-model", str(tiny_llama_dir), "--data-dir", str(nli_data), "--out", "new",
            *options]
    assert message in refusal(argv, capsys)
    assert not (tmp_path / "new").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    assert [p.name for p in adapter.iterdir()] == ["adapter_config.json"]
    assert (adapter / "adapter_config.json").read_text() == '{"r": 4}'


@pytest.mark.parametrize("snli,message", [
    (b"garbage", "snli_test.jsonl.gz, {root}/nli/mnli.jsonl.gz: not nli training data this command reads: "
     "BadGzipFile("),
    (gzip.compress(b"[1, 2]\n", mtime=0),
     "{root}/nli/snli_test.jsonl.gz: line 1 is a list ([1, 2]), not a JSON object"),
    (NLI_SAMPLE.read_bytes()[:-100], "not nli training data this command reads: EOFError("),  # cut short
    (NLI_SAMPLE.read_bytes()[:200] + bytes(100) + NLI_SAMPLE.read_bytes()[300:], "not nli training data this "
     "command reads: error('Error -3 while decompressing data"),  # zlib.error: corrupt inside
    (gzip.compress(b"", mtime=0), "{root}/nli/snli_test.jsonl.gz, {root}/nli/mnli.jsonl.gz: no nli row to train on"),
])
def test_train_refuses_data_it_cannot_read_naming_its_files(snli, message, tiny_llama_dir, nli_data, tmp_path,
                                                             capsys):
    """A review: a corrupt .gz ended in BadGzipFile's traceback, and files of no rows in num_samples=0's."""
    (nli_data / "nli" / "snli_test.jsonl.gz").write_bytes(snli)
    argv = ["train", *TINY_RUN, "--base-model", str(tiny_llama_dir), "--data-dir", str(nli_data), "--out",
            str(tmp_path / "new")]
    assert message.format(root=nli_data) in refusal(argv, capsys)


SQUAD_ARTICLE = {"title": "T", "paragraphs": [{"context": "Ann met Bob.", "qas": [
    {"id": "q0", "question": "Who met Bob?", "answers": [{"text": "Ann", "answer_start": 0}]},
    {"id": "q1", "question": "Whom did Ann meet?", "answers": [{"text": "Bob", "answer_start": 8}]}]}]}


def squad_file(path: Path, answers: list) -> Path:
    """A SQuAD v1.1 file of one article, its second question's answers ``answers``."""
    article = json.loads(json.dumps(SQUAD_ARTICLE))
    article["paragraphs"][0]["qas"][1]["answers"] = answers
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps({"data": [article]}).encode()))
    return path


def nli_file(path: Path, row: dict) -> Path:
    """The committed SNLI sample with ``row`` for its third line."""
    lines = gzip.decompress(NLI_SAMPLE.read_bytes()).decode().splitlines(keepends=True)
    lines[2] = json.dumps(row) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("".join(lines).encode()))
    return path


BAD_ROWS = [  # (task, write the bad file at a path, what the one line says after the path)
    ("squad", lambda path: squad_file(path, []), ": article 0, paragraph 0, question 1 (from 0; id q1): answers is "
     "empty: a SQuAD v1.1 question has an answer (SQuAD v2's unanswerable questions are not read)"),
    ("squad", lambda path: squad_file(path, [{"text": 5, "answer_start": 0}]), ": article 0, paragraph 0, question "
     "1 (from 0; id q1), answer 0: text is a number (5), not a string"),
    ("squad", lambda path: squad_file(path, [{"text": "Bob"}]), ": article 0, paragraph 0, question 1 (from 0; id "
     "q1), answer 0: no answer_start field"),
    ("nli", lambda path: nli_file(path, {"premise": 7, "hypothesis": "h", "label": "neutral"}), ": line 3: premise is "
     "a number (7), not a string"),
    ("nli", lambda path: nli_file(path, {"premise": "p", "label": "neutral"}), ": line 3: no hypothesis field"),
]


BAD_ROW_IDS = ["squad_no_answer", "squad_answer_not_text", "squad_no_answer_start", "nli_premise_not_text",
               "nli_no_hypothesis"]


@pytest.mark.parametrize("task,write,message", BAD_ROWS, ids=BAD_ROW_IDS)
def test_train_refuses_a_row_it_cannot_read_naming_its_file_row_and_field(task, write, message, tiny_llama_dir,
                                                                          nli_data, tmp_path, capsys):
    """A review: a SQuAD question of no answer (SQuAD v2's unanswerable style) ended in encode_squad's IndexError, a
    premise that is no string in the tokenizer's TypeError. The rows are checked as the files are read, before the
    base's weights load."""
    path = write(nli_data / ("squad/train-v1.1.json.gz" if task == "squad" else "nli/snli_test.jsonl.gz"))
    argv = ["train", *TINY_RUN, "--task", task, "--base-model", str(tiny_llama_dir), "--data-dir", str(nli_data),
            "--out", str(tmp_path / "new")]
    assert refusal(argv, capsys) == f"loraswap train: error: {path}{message}\n"
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("task,write,message", BAD_ROWS, ids=BAD_ROW_IDS)
def test_eval_refuses_a_row_it_cannot_read_naming_its_file_row_and_field(task, write, message, tiny_llama_dir,
                                                                         tmp_path, capsys):
    """A review: a SQuAD question of no answer ended in squad_scores' ValueError (max() of an empty sequence) once
    the whole evaluation had run, an answer that is no string in normalize_answer's AttributeError, a premise that
    is no string in a TypeError. Checked as the file is read, before the model loads."""
    path = write(tmp_path / f"{task}.json.gz")
    argv = ["eval", "--task", task, "--adapter", "none", "--data", str(path), "--base-model", str(tiny_llama_dir),
            "--adapters-dir", str(tmp_path), "--device", "cpu"]
    assert refusal(argv, capsys) == f"loraswap eval: error: {path}{message}\n"


@pytest.mark.parametrize("options,message", [
    (["--ranks", "4,8,4"], "loraswap sweep: error: argument --ranks: '4,8,4' names '4' twice"),
    (["--lrs", "1e-3,0.001"], "loraswap sweep: error: argument --lrs: '1e-3,0.001' names '1e-3' twice"),
    (["--targets", "attention,attention"], "loraswap sweep: error: argument --targets: 'attention,attention' names "
     "'attention' twice"),
    (["--out", "card.json"], "loraswap sweep: error: argument --out: card.json is a file, not a folder"),
    (["--out", ""], "loraswap sweep: error: argument --out: must name a folder, not be empty"),  # wrote into .
    (["--out", "gone"], "loraswap sweep: error: argument --out: gone is a symlink to nothing, not a folder"),
    # a review: the tables were written beside the adapter's files
    (["--out", "squad"], "loraswap sweep: error: argument --out: squad is an adapter folder (it holds "
     "adapter_config.json): a report would write over or beside the adapter's own files"),
    (["--out", "link"], "loraswap sweep: error: argument --out: link is an adapter folder"),  # a symlink to one
    (["--seed", "4294967296"], "loraswap sweep: error: argument --seed: must be in 0..4294967295, not 4294967296"),
    (["--lrs", "1e-4,1.0000001e-4"], "loraswap sweep: error: --lrs 0.0001 and 0.00010000001 both print as 0.0001 "
     "(6 significant digits), which names a run's folder: two runs would share one"),  # a review: they shared one
])
def test_sweep_refuses_a_grid_with_a_run_twice_or_a_file_as_its_folder(options, message, tmp_path, monkeypatch,
                                                                        capsys):
    """A review: ``--ranks 4,4`` trained the same run twice, and a file as ``--out`` raised FileExistsError. Both are
    refused before the base is even looked for (there is none here)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "card.json").write_text("{}")
    (tmp_path / "gone").symlink_to("nowhere")  # said '--out gone cannot be made: File exists'
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "adapter_config.json").write_text('{"r": 4}')
    (tmp_path / "link").symlink_to("squad")
    argv = ["sweep", *TINY_RUN, "--base-model", str(tmp_path / "no_base"), "--out", "runs", *options]
    assert message in refusal(argv, capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["card.json", "gone", "link", "squad"]
    assert [path.name for path in (tmp_path / "squad").iterdir()] == ["adapter_config.json"]


@pytest.mark.parametrize("target", ["bogus", "lm_head"])
def test_sweep_refuses_targets_the_base_lacks(target, tiny_gpt2_dir, tmp_path, capsys):
    """A review: ``--targets bogus`` ended in peft's NoMatchingPeftModuleError traceback; ``lm_head`` trained an
    adapter the server refuses."""
    argv = ["sweep", *TINY_RUN, "--base-model", str(tiny_gpt2_dir), "--out", str(tmp_path / "runs"), "--ranks", "2",
            "--lrs", "1e-3", "--targets", f"attention,{target}+c_attn"]
    assert (f"loraswap sweep: error: target modules {target} match no linear layer of GPT2LMHeadModel that the engine "
            "applies LoRA to (those below the output head: c_attn, c_fc, c_proj)") in refusal(argv, capsys)
    assert not (tmp_path / "runs").exists()


def test_sweep_refuses_a_warmup_of_runs_of_one_step_before_its_first_run(tiny_gpt2_dir, tmp_path, capsys):
    """Each run's one step would be taken at learning rate 0 (found by the first run, once --out was made)."""
    argv = ["sweep", *TINY_RUN, "--warmup", "0.03", "--base-model", str(tiny_gpt2_dir), "--out",
            str(tmp_path / "runs"), "--ranks", "2", "--lrs", "1e-3", "--targets", "attention"]
    assert ("loraswap sweep: error: --warmup 0.03 makes 1 warmup step of the 1 optimizer step (--max-steps 1)"
            in refusal(argv, capsys))
    assert not (tmp_path / "runs").exists()


def test_sweep_refuses_a_rank_above_a_target_layers(tiny_gpt2_dir, tmp_path, capsys):
    """A review: a rank torch cannot allocate was a RuntimeError once the weights had loaded; a sweep finds it before
    its first run."""
    argv = ["sweep", *TINY_RUN, "--base-model", str(tiny_gpt2_dir), "--out", str(tmp_path / "runs"), "--ranks",
            "2,65", "--lrs", "1e-3", "--targets", "attention"]
    assert ("loraswap sweep: error: --ranks 65 is above 64, the smaller dimension of the target layer "
            "transformer.h.0.attn.c_attn") in refusal(argv, capsys)
    assert not (tmp_path / "runs").exists()


def test_a_batch_larger_than_the_examples_takes_them_all(tiny_gpt2_dir, nli_data, tmp_path, capsys):
    """A review: ``--batch-size 2**63 - 1`` ended in torch's RuntimeError (the Trainer makes a tensor of the
    validation batch's size); a batch holds the examples there are, and the card records the option given."""
    out = tmp_path / "adapter"
    argv = ["train", *TINY_RUN, "--base-model", str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out),
            "--batch-size", str(2**63 - 1)]
    assert main(argv) == 0
    assert json.loads((out / "card.json").read_text())["hyperparameters"]["batch_size"] == 2**63 - 1


@pytest.mark.parametrize("options,message", [
    (["--alpha", "1e308", "--max-steps", "3"], "the training loss is nan at step 1"),
    (["--lr", "1e39", "--warmup", "0"], "the trained weight base_model.model.transformer.h.0.attn.c_attn.lora_A."
     "default.weight is not finite"),  # the loss of the one step was finite, the step made the weights infinite
])
def test_a_run_whose_loss_or_weights_are_not_finite_stops_and_writes_nothing(options, message, tiny_gpt2_dir,
                                                                             nli_data, tmp_path, capsys):
    """A review: ``--alpha 1e308`` trained NaN losses, exited 0 and wrote an adapter the server refuses (non-finite
    weights)."""
    out = tmp_path / "adapter"
    with pytest.raises(SystemExit) as exit_:
        main(["train", *TINY_RUN, "--base-model", str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out),
              *options])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.endswith(f"loraswap train: error: training diverged: {message}; no adapter is written (a smaller --lr "
                        "or --alpha may keep it finite)\n")  # one line, after the progress bars
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]  # no adapter, no .partial folder


def test_sigterm_stops_a_run_as_ctrl_c_does_leaving_no_partial_folder(tiny_gpt2_dir, nli_data, tmp_path):
    """A review: ``timeout 60 loraswap train`` (SIGTERM) left ``.NAME.partial-PID-*``; Ctrl-C cleaned up."""
    out = tmp_path / "adapter"
    command = [sys.executable, "-m", "service.cli.entry", "train", *TINY_RUN, "--max-steps", "100000", "--base-model",
               str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out)]
    log = tmp_path.parent / f"{tmp_path.name}.log"  # a file: a pipe left unread would fill with progress bars
    with log.open("w") as stderr:
        process = subprocess.Popen(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".adapter.partial-*")) and process.poll() is None:  # training has begun
            assert time.monotonic() < deadline, "no partial folder within 120 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    err = log.read_text()
    assert process.returncode == 130 and "loraswap train: interrupted\n" in err, err[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]  # no adapter, no .partial folder


def test_sweep_reads_back_only_the_runs_of_its_own_settings(tiny_gpt2_dir, nli_data, tmp_path, capsys):
    """A review: ``sweep --task nli --out D --max-steps 1`` then ``sweep --task rte --out D --max-steps 3`` printed the
    nli run's numbers as rte's: any run folder with a card.json was taken as a finished run of this sweep."""
    out = tmp_path / "runs"
    sweep = ["sweep", *TINY_RUN, "--base-model", str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out),
             "--ranks", "2", "--lrs", "1e-3", "--targets", "attention"]
    assert main(sweep) == 0
    assert "Loading weights" in capsys.readouterr().err
    card, tables = (out / "attention_r2_lr0_001" / "card.json").read_text(), (out / "sweep.csv").read_text()
    other = shutil.copytree(nli_data, tmp_path / "other")
    assert main(sweep) == 0  # resumed: the run read back, not trained again
    assert "Loading weights" not in capsys.readouterr().err
    for options, changes in [
        (["--task", "rte", "--max-steps", "3"], "task nli (this sweep: rte), max_steps 1 (this sweep: 3), max_length "
         "256 (this sweep: 384)"),  # the task's default length
        (["--seed", "1"], "seed 0 (this sweep: 1)"),
        (["--max-examples", "4", "--alpha", "8"], "alpha 4 (this sweep: 8.0), max_examples 8 (this sweep: 4)"),
        (["--data-dir", str(other)], f"data_dir {nli_data} (this sweep: {other})"),  # other data: a review
        # validations draw from torch's generator: the dropout masks after them, and so the adapter, differ
        (["--eval-every", "0.5"], "eval_every 0.1 (this sweep: 0.5)"),
    ]:
        assert (f"loraswap sweep: error: --out {out} holds runs of other settings: attention_r2_lr0_001 was trained "
                f"with {changes}; name a new folder for this sweep") in refusal([*sweep, *options], capsys)
    assert (out / "attention_r2_lr0_001" / "card.json").read_text() == card
    assert (out / "sweep.csv").read_text() == tables


def test_sweep_reads_the_hyperparameters_an_old_card_lacks_from_its_command(tiny_gpt2_dir, nli_data, tmp_path,
                                                                           capsys):
    """A review: cards written before they recorded eval_every (and, before that, max_examples and eval_examples) were
    refused as 'eval_every None (this sweep: 0.1)': such a sweep could never be resumed. They are read from the
    command line the card records, an option not given at its default, where that is the run's own."""
    out = tmp_path / "runs"
    sweep = ["sweep", *TINY_RUN, "--base-model", str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out),
             "--ranks", "2", "--lrs", "1e-3", "--targets", "attention"]
    assert main(sweep) == 0
    path = out / "attention_r2_lr0_001" / "card.json"
    card = json.loads(path.read_text())
    old = {**card, "command": shlex.join(["loraswap", *sweep]),
           "hyperparameters": {k: v for k, v in card["hyperparameters"].items() if k not in LATE_HYPERPARAMETERS}}
    path.write_text(json.dumps(old))
    capsys.readouterr()
    assert main(sweep) == 0  # read back
    assert "Loading weights" not in capsys.readouterr().err
    assert "eval_every 0.1 (this sweep: 0.5)" in refusal([*sweep, "--eval-every", "0.5"], capsys)  # the default
    for command in ("loraswap -q tests/unit", shlex.join(["loraswap", *sweep, "--seed", "1"])):  # not its run's
        path.write_text(json.dumps({**old, "command": command}))
        assert (f"loraswap sweep: error: {path} was written before cards recorded max_examples, eval_examples, "
                f"eval_every, and the command it records ({command!r}) is not the loraswap train or sweep of its "
                "run") in refusal(sweep, capsys)


@pytest.mark.parametrize("card", sorted(SWEEP_RESULTS.glob("*.card.json")), ids=lambda path: path.name)
def test_the_committed_sweep_cards_are_read_with_their_commands_settings(card):
    """docs/results/sweep: cards of before eval_examples and eval_every were recorded, of a sweep run with
    --max-examples 3200 --eval-examples 200 --eval-every 0.5."""
    assert {name: value for name, value in recorded_hyperparameters(json.loads(card.read_text()), card.parent).items()
            if name in LATE_HYPERPARAMETERS} == {"max_examples": 3200, "eval_examples": 200, "eval_every": 0.5}


def test_a_sweep_without_validation_resumes_whatever_its_eval_every(tiny_gpt2_dir, nli_data, tmp_path, capsys):
    """A review: runs of --eval-examples 0 (no validation, so --eval-every is never read) were refused over it."""
    sweep = ["sweep", *TINY_RUN, "--eval-examples", "0", "--base-model", str(tiny_gpt2_dir), "--data-dir",
             str(nli_data), "--out", str(tmp_path / "runs"), "--ranks", "2", "--lrs", "1e-3", "--targets", "attention"]
    assert main(sweep) == 0
    capsys.readouterr()
    assert main([*sweep, "--eval-every", "0.5"]) == 0
    assert "Loading weights" not in capsys.readouterr().err


@pytest.mark.parametrize("make,message", [
    (lambda card: card.symlink_to("/nonexistent"), "card.json is a symlink to a file outside the adapter folder"),
    (lambda card: card.symlink_to("gone.json"), "card.json is a symlink to nothing"),
    (lambda card: os.mkfifo(card), "card.json: the adapter's card.json is not a regular file"),
    (lambda card: card.mkdir(), "card.json: the adapter's card.json is not a regular file"),
    (lambda card: (card.parent / "adapter_config.json").write_text("{}"), "holds attention_r2_lr0_001, which is not "
     "an empty folder and has no card.json"),
], ids=["dangling_out", "dangling_in", "fifo", "folder", "files_no_card"])
def test_sweep_refuses_a_run_folder_it_could_neither_read_back_nor_train_into(make, message, tiny_gpt2_dir, nli_data,
                                                                              tmp_path, capsys):
    """A review: a run whose card.json was a symlink to nothing, a FIFO or a folder (``is_file`` false: no card) was
    trained again, then refused with a false 'was filled while the command ran', a .partial-* folder left beside it.
    Now refused before any run trains; a run folder that is empty (or absent) is still trained."""
    out = tmp_path / "runs"
    run = out / "attention_r2_lr0_001"
    run.mkdir(parents=True)
    make(run / "card.json")
    argv = ["sweep", *TINY_RUN, "--base-model", str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out),
            "--ranks", "2", "--lrs", "1e-3", "--targets", "attention"]
    assert message in refusal(argv, capsys)
    assert sorted(path.name for path in out.iterdir()) == ["attention_r2_lr0_001"]  # no .partial-*, no tables
    shutil.rmtree(run)
    run.mkdir()  # an empty run folder: trained into
    assert main(argv) == 0 and (run / "card.json").is_file()


@pytest.mark.parametrize("filled", [True, False])
def test_a_run_takes_the_place_of_an_empty_out_only(tmp_path, filled):
    """A review: ``--out`` is checked when parsed, and an adapter copied there during the minutes of training was
    written over. A run now writes beside ``--out`` and moves there in one rename, which an ``--out`` filled
    meanwhile refuses: left as it was, the new adapter kept where it was written."""
    out = tmp_path / "adapter"
    out.mkdir()
    if filled:
        (out / "card.json").write_text("theirs")
    partial = partial_folder(out)
    (partial / "card.json").write_text("ours")
    if filled:
        with pytest.raises(UsageError, match=f"{out} was filled while the command ran"):
            publish(partial, out)
        assert (out / "card.json").read_text() == "theirs" and (partial / "card.json").read_text() == "ours"
    else:
        publish(partial, out)
        assert (out / "card.json").read_text() == "ours" and not partial.exists()


def test_a_run_that_fails_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(KeyboardInterrupt), written_whole(out) as partial:
        (partial / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_eval_every_takes_a_share_of_the_steps_or_a_whole_number_of_them():
    assert [EVAL_EVERY(text) for text in ("0.1", "0.999", "1", "2", "2.0", "500")] == [0.1, 0.999, 1, 2, 2, 500]
    assert [WARMUP(text) for text in ("0", "0.03", "0.999", "1", "2.0", "500")] == [0, 0.03, 0.999, 1, 2, 500]
    assert [SEED(text) for text in ("0", "4294967295")] == [0, 2**32 - 1]


def test_a_sweep_records_a_run_that_diverges_and_goes_on(tiny_gpt2_dir, nli_data, tmp_path, capsys):
    """A review: the sweep stopped at the first run whose loss or weights were not finite, keeping only the runs
    before it; a sweep tries settings, and one that diverges is among its results."""
    out = tmp_path / "runs"
    argv = ["sweep", *TINY_RUN, "--base-model", str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out),
            "--ranks", "2", "--targets", "attention", "--warmup", "0"]
    assert main([*argv, "--lrs", "1e39,1e-3"]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(row["lr"], row["diverged"]) for row in rows] == [
        ("1e+39", "at step 1: the trained weight base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight is "
                  "not finite"), ("0.001", "")]
    assert rows[0]["steps"] == "1" and rows[0]["trainable_parameters"] == rows[1]["trainable_parameters"] != ""
    assert rows[1]["final_train_loss"] and not (out / rows[0]["run"]).exists() and (out / rows[1]["run"]).is_dir()
    assert "2 runs (1 diverged: attention_r2_lr1e_39)" in capsys.readouterr().out
    assert "| at step 1: the trained weight" in (out / "sweep.md").read_text()


def test_a_sweep_whose_every_run_diverges_is_a_usage_error_after_its_tables(tiny_gpt2_dir, nli_data, tmp_path,
                                                                            capsys):
    out = tmp_path / "runs"
    argv = ["sweep", *TINY_RUN, "--base-model", str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out),
            "--ranks", "2", "--targets", "attention", "--warmup", "0", "--alpha", "1e308", "--lrs", "1e-3"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.endswith(
        f"loraswap sweep: error: every run diverged (its training loss or weights not finite; a smaller --lrs may keep "
        f"them finite); tables in {out / 'sweep.md'} and {out / 'sweep.csv'}\n"), err
    assert [row["diverged"] for row in csv.DictReader((out / "sweep.csv").open())] == [
        "at step 1: the training loss is nan at step 1"]

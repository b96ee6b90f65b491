"""Each message a command says names only the options and variables that command takes (a review: calibrate's failure
named --max-new-tokens, an option it has not, as it sets max_new_tokens itself; eval's named LORASWAP_MAX_QUEUE, a
variable it does not read, as it sets max_queue itself). For each command that starts a runtime or loads the base, a
start that says such a message: each --flag it names is an option of the command's parser, and each LORASWAP_
variable one the command reads: set to another value, it changes the settings the command builds."""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from loadtest.bench import bench_settings
from service.cli.main import build_parser, main
from service.cli.settings_options import settings_from
from service.settings import Settings, variable
from tests.data.make_corpus import SQUAD_SAMPLE
from tests.e2e.test_calibration import carded, data_folder
from training.evaluate import runtime_settings
from training.train import base_settings

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
VARIABLE = re.compile(rf"\b{Settings.model_config['env_prefix']}[A-Z0-9_]+")
STRIDE = {variable("answer_stride"): "600"}  # past the 511 tokens or fewer a prompt has of the tiny bases' 512


def parser_of(command: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``command``."""
    subparsers = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices[command]


def another(value: object) -> object:
    """A valid value of a setting other than ``value`` (an int, float, bool or path)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return Path(f"{value}-other")


def check_named(message: str, argv: list[str], settings_of: Callable[[argparse.Namespace], Settings],
                monkeypatch) -> None:
    """Each flag ``message`` names is an option of ``argv``'s command, and each variable one it reads:
    ``settings_of`` (the settings the command builds from its parsed ``argv``) changes with it."""
    options = {option for action in parser_of(argv[0])._actions for option in action.option_strings}
    assert set(FLAG.findall(message)) <= options, message
    for name in set(VARIABLE.findall(message)):
        field = name.removeprefix(Settings.model_config["env_prefix"]).lower()
        before = getattr(settings_of(build_parser().parse_args(argv)), field)
        monkeypatch.setenv(name, str(another(before)))
        assert getattr(settings_of(build_parser().parse_args(argv)), field) != before, f"{name} is not read: {message}"


def said(argv: list[str], variables: dict[str, str], monkeypatch, capsys) -> str:
    """The usage error ``loraswap ARGV`` with ``variables`` set ends with (exit status 2)."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    line = capsys.readouterr().err.splitlines()[-1]  # a command's loading of the base may print its progress first
    assert exit_.value.code == 2 and line.startswith(f"loraswap {argv[0]}: error: "), line
    return line


@pytest.mark.parametrize("command", ["serve", "scale", "bench", "eval"])
def test_a_failed_start_names_only_what_the_command_takes(command, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The start refused for its token budget (``runtime.check_room``), which names max_new_tokens beside the
    variable at fault: serve's and scale's --max-new-tokens, bench's --new-tokens, eval's own --max-new-tokens."""
    base = ["--base-model", str(tiny_llama_dir), "--device", "cpu"]
    argv, settings_of = {
        "serve": (["serve", *base], settings_from),
        "scale": (["scale", "--replicas", "1", *base], settings_from),
        "bench": (["bench", *base, "--modes", "base"], bench_settings),
        "eval": (["eval", "--task", "squad", "--adapter", "none", "--data", str(SQUAD_SAMPLE), *base,
                  "--adapters-dir", str(tmp_path)], lambda args: runtime_settings(args, None)),
    }[command]
    message = said(argv, STRIDE, monkeypatch, capsys)
    assert f"{variable('answer_stride')} 600 is not below" in message
    check_named(message, argv, settings_of, monkeypatch)


def test_calibrate_names_the_token_it_generates_per_label_as_its_own(tiny_llama_dir, llama_adapters, tmp_path,
                                                                     monkeypatch, capsys):
    """calibrate sets max_new_tokens to 1 itself (it scores labels): its failure named it --max-new-tokens."""
    card = {"examples": {"train": 30, "validation": 21, "dropped_too_long_or_bad_label": 0, "available": 51},
            "hyperparameters": {"seed": 0}, "task": "nli"}
    adapter = carded(llama_adapters["one"], tmp_path / "adapters" / "one", card)
    argv = ["calibrate", "--adapter", str(adapter), "--data-dir", str(data_folder(tmp_path / "data")), "--base-model",
            str(tiny_llama_dir), "--adapters-dir", str(tmp_path / "adapters"), "--device", "cpu"]
    message = said(argv, STRIDE, monkeypatch, capsys)
    assert "(calibrate's own max_new_tokens 1 of 512 positions)" in message, message
    check_named(message, argv, lambda args: runtime_settings(args, adapter), monkeypatch)


def test_eval_names_the_queue_it_sets_itself_as_its_own(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """eval sets max_queue itself (room for 4 batches' windows): a context of too many windows named it
    LORASWAP_MAX_QUEUE, which eval does not read."""
    argv = ["eval", "--task", "squad", "--adapter", "none", "--data", str(SQUAD_SAMPLE), "--distractors", "3",
            "--limit", "2", "--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path), "--device", "cpu"]
    message = said(argv, {variable("max_answer_windows"): "1", variable("max_input_tokens"): "64"}, monkeypatch,
                   capsys)
    assert f"the least of this server's {variable('max_answer_windows')} and eval's own max_queue" in message, message
    check_named(message, argv, lambda args: runtime_settings(args, None), monkeypatch)


def test_train_names_the_cache_folder_it_reads(tmp_path, monkeypatch, capsys):
    """train loads the base with settings of its own (device auto, the dtype of --bf16) and the cache folder
    LORASWAP_CACHE_DIR gives."""
    argv = ["train", "--task", "nli", "--out", str(tmp_path / "trained"), "--max-steps", "1"]
    message = said(argv, {variable("cache_dir"): "/proc/loraswap-cache"}, monkeypatch, capsys)
    assert f"{variable('cache_dir')} /proc/loraswap-cache: cannot make this folder" in message
    check_named(message, argv, base_settings, monkeypatch)


def test_what_a_command_sets_itself_is_named_as_its_own_never_as_a_flag_or_variable():
    """``given_as`` for each kind: an option's flag (of another name: bench's --adapters), the command's own words for
    a setting it sets (declared, or a default its parser sets with no option), else the variable."""
    from service.cli.command import given_as

    calibrate = build_parser().parse_args(["calibrate", "--adapter", "x"])
    bench = build_parser().parse_args(["bench"])
    train = build_parser().parse_args(["train", "--task", "nli", "--out", "x"])
    assert [given_as(calibrate, name) for name in ("max_new_tokens", "max_queue", "max_batch", "max_input_tokens")] == [
        "calibrate's own max_new_tokens", "calibrate's own max_queue", "--max-batch", variable("max_input_tokens")]
    assert [given_as(bench, name) for name in ("max_resident", "max_rank", "prefill_chunk")] == [
        "--adapters", "bench's own max_rank", variable("prefill_chunk")]
    assert [given_as(train, name) for name in ("device", "dtype", "quantize")] == [
        "train's own device", "--bf16", "--quantize"]

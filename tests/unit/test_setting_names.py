"""Each message a command says names only the options and variables that command takes (a review: calibrate's failure
named --max-new-tokens, an option it has not, as it sets max_new_tokens itself; eval's named LORASWAP_MAX_QUEUE, a
variable it does not read, as it sets max_queue itself). For each command that starts a runtime or loads the base, a
start that says such a message: each --flag it names is an option of the command's parser, and each LORASWAP_
variable one the command reads: set to another value, it changes the settings the command builds."""
from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Callable
from pathlib import Path

import pytest

import service
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


# each command that builds Settings by its declaration (command.sets_settings, command.command_settings): its command
# line and what builds them
BUILDERS = {"eval": (["eval", "--task", "nli", "--adapter", "none"], lambda args: runtime_settings(args, None)),
            "calibrate": (["calibrate", "--adapter", "x"], lambda args: runtime_settings(args, None)),
            "bench": (["bench"], bench_settings), "train": (["train", "--task", "nli", "--out", "x"], base_settings),
            "sweep": (["sweep", "--task", "nli", "--out", "x"], base_settings)}


@pytest.mark.parametrize("command", BUILDERS)
def test_what_a_command_sets_itself_is_what_it_declares_and_never_read_from_a_variable(command, monkeypatch):
    """eval gave max_queue a placeholder (1) so that LORASWAP_MAX_QUEUE was not read (a review: 'abc' failed it), and
    each command passed by hand the values of the settings it declared as its own: they are built from the
    declaration now (command_settings), whatever their variables say (invalid here: read, they would fail the
    build). An option's value (--max-batch) and one an option of another name gives (bench's --adapters) still win
    over their variables too (but an option whose default is its variable's), and every other setting comes from its
    variable."""
    argv, settings_of = BUILDERS[command]
    args = build_parser().parse_args(argv)
    own = {name: value(args) if callable(value) else value for name, value in args.settings_set.items()}
    given = [*own, *args.settings_by, *(name for name in Settings.model_fields if name in args.option_dests
                                        and name not in getattr(args, "settings_read", ()))]  # not $VAR by default
    for name in given:
        monkeypatch.setenv(variable(name), "abc")
    monkeypatch.setenv(variable("max_input_tokens"), "77")  # neither set nor an option's: read
    settings = settings_of(build_parser().parse_args(argv))
    assert {name: getattr(settings, name) for name in own} == own and settings.max_input_tokens == 77


PREFIX = Settings.model_config["env_prefix"]


def docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring nodes of ``tree``'s module, classes and functions."""
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(node.body[0].value) for node in ast.walk(tree) if isinstance(node, owners) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def spelled_variables(path: Path) -> list[str]:
    """The variables of Settings fields that the code of the module at ``path`` spells itself, outside docstrings:
    ``LORASWAP_MAX_RANK`` in a string, or an f-string's ``LORASWAP_`` before the name it formats."""
    tree = ast.parse(path.read_text())
    skipped, found = docstrings(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            found += [f"{PREFIX}{{...}}" for part, after in zip(node.values, node.values[1:])
                      if isinstance(part, ast.Constant) and part.value.endswith(PREFIX)
                      and isinstance(after, ast.FormattedValue)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
            found += [name for name in re.findall(rf"{PREFIX}[A-Z0-9_]+", node.value)
                      if name.removeprefix(PREFIX).lower() in Settings.model_fields]
    return found


def test_a_settings_variable_is_spelled_by_settings_variable_alone():
    """A review: UnsafeEnvironment wrote LORASWAP_ + the field upper-cased, and the help of eval, merge, loadtest and
    side-by-side, loadtest's reading of the admin key and the 413's description spelled variables out: each comes from
    ``settings.variable`` now, beside the prefix it is built from (``Settings.model_config``). Variables of no
    setting (LORASWAP_DATA_DIR) are the modules' own."""
    root = Path(service.__file__).parents[1]
    modules = [path for folder in ("service", "training", "loadtest") for path in sorted((root / folder).rglob("*.py"))
               if path != root / "service" / "settings.py"]
    spelled = {str(path.relative_to(root)): names for path in modules if (names := spelled_variables(path))}
    assert spelled == {}

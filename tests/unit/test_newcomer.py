"""What a newcomer meets first: ``loraswap --help`` and usage errors answer without loading torch, every option
says what it does and its default, and the command-line modules import in one direction (commands -> service)."""
from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import service
from service.cli.command import SERVING_VARIABLES
from service.cli.main import DefaultsHelp, build_parser, commands, settings_from
from service.lora.adapter_files import BASE_LABEL, BASE_MODEL_ID
from training.options import sampling_options

HEAVY = ("torch", "transformers", "peft", "bitsandbytes")
# runs ``loraswap ARGS`` in a fresh interpreter, then prints its exit status and the heavy modules it imported
PROBE = f"""
import json, sys
from service.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
print(json.dumps({{"code": code, "heavy": [name for name in {HEAVY!r} if name in sys.modules]}}))
"""


def loraswap(*argv: str) -> tuple[dict, str]:
    """(the probe's report, stderr) of ``loraswap ARGV`` run in a subprocess."""
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120,
                          check=False)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("argv,code", [
    (["--help"], 0),
    *(([command, "--help"], 0) for command in ["serve", *commands()]),
    ([], 2),
    (["eval", "--task", "nope", "--adapter", "x"], 2),
    (["eval", "--task", "nli"], 2),  # --adapter missing
    (["train", "--task", "squad", "--out", "x", "--lr", "0"], 2),
    (["sweep", "--task", "nli", "--out", "x", "--max-steps", "-1"], 2),
    (["merge", "--out", "x"], 2),
    (["bench", "--adapters", "0"], 2),
    (["serve", "--dtype", "float8"], 2),
])
def test_help_and_usage_errors_load_no_torch(argv, code):
    report, stderr = loraswap(*argv)
    assert report == {"code": code, "heavy": []}, stderr
    assert "bitsandbytes" not in stderr and "Traceback" not in stderr


def test_command_modules_do_not_import_the_cli_back():
    """service.cli.main finds the training and loadtest commands through entry points; none of them imports
    service.cli.main back (a cycle)."""
    modules = ["training.options", "training.train", "training.sweep", "training.merge", "training.evaluate",
               "loadtest.options", "loadtest.bench", "service.scale.options"]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n" \
           "print('service.cli.main' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "False", done.stderr


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    # argparse has no public list of a parser's options or subcommands
    (chooser,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return chooser.choices


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings and action.dest != "help"]


@pytest.mark.parametrize("command", ["serve", *commands()])
def test_every_option_says_what_it_does_and_its_default(command):
    parser = subcommands()[command]
    assert parser.formatter_class is DefaultsHelp
    for action in options(parser):
        help_text = DefaultsHelp(command)._get_help_string(action)  # what --help shows, before %-expansion
        assert action.help and action.help.strip(), f"{command} {action.option_strings[0]} has no help"
        if action.required:
            continue
        if action.default in (None, argparse.SUPPRESS):  # unset: the help says in words what that means
            assert "default" in help_text, f"{command} {action.option_strings[0]}: {help_text!r} names no default"
        else:
            assert help_text.endswith(" (default: %(default)s)"), f"{command} {action.option_strings[0]}"


def test_help_shows_the_defaults_the_command_runs_with(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    monkeypatch.delenv("LORASWAP_ADAPTERS_DIR", raising=False)
    parser = subcommands()["eval"]
    parser.print_help()
    shown = capsys.readouterr().out
    parsed = parser.parse_args(["--task", "nli", "--adapter", "x"])
    sampling_options(parsed)  # what the command runs with: the sampling options not given take their defaults
    for name in ("strategy", "top_k", "top_p", "temperature", "sample_seed", "max_new_tokens", "max_batch",
                 "base_model", "device", "dtype", "quantize"):
        assert f"(default: {getattr(parsed, name)})" in shown, name
    assert f"(default: {parsed.seed} with a strategy that samples; greedy draws nothing and refuses it)" in shown
    assert f"(default: $LORASWAP_ADAPTERS_DIR, else {parsed.adapters_dir})" in shown  # a setting's: read at run
    # written out there: adapter_files imports torch
    assert f"'{BASE_LABEL}' (or '{BASE_MODEL_ID}') for the bare base model" in shown
    assert "(default: None)" not in shown


def test_sweep_runs_a_fixed_step_budget_and_train_every_epoch():
    commands = subcommands()
    assert commands["sweep"].parse_args(["--task", "nli", "--out", "x"]).max_steps == 200
    assert commands["train"].parse_args(["--task", "nli", "--out", "x"]).max_steps is None


def test_serve_help_says_where_an_unset_flag_comes_from(monkeypatch):
    """serve's defaults shown are Settings' own; its description says the environment comes first, as it does."""
    monkeypatch.setenv("LORASWAP_MAX_BATCH", "7")
    serve = subcommands()["serve"]
    assert "LORASWAP_MAX_BATCH for --max-batch" in " ".join(serve.format_help().split())
    assert settings_from(serve.parse_args([])).max_batch == 7
    assert settings_from(serve.parse_args(["--max-batch", "9"])).max_batch == 9


# each module a command runs that reads the environment, and the commands that run it
RUN_BY = {"training/train.py": ("train", "sweep"), "training/sweep.py": ("sweep",), "training/merge.py": ("merge",),
          "training/evaluate.py": ("eval", "calibrate"), "training/calibrate.py": ("calibrate",),
          "loadtest/bench.py": ("bench",), "loadtest/checked/options.py": ("loadtest",),
          "loadtest/side_by_side.py": ("side-by-side",), "service/scale/options.py": ("scale",)}


def variables_read(path: Path) -> tuple[set[str], bool]:
    """The LORASWAP_ variables the module at ``path`` reads by name (``setting("x")``, ``SettingDefault("x")``,
    ``os.environ.get(variable("x"))``, ``os.environ.get("LORASWAP_X")``, ``data_dir()``), and whether it builds
    Settings (which reads every one)."""
    names, builds = set(), False
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        called = getattr(node.func, "id", getattr(node.func, "attr", ""))
        texts = [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        if called in ("setting", "SettingDefault", "variable"):
            names |= {f"LORASWAP_{text.upper()}" for text in texts}
        names |= {text for text in texts if re.fullmatch(r"LORASWAP_[A-Z_]+", text)}
        names |= {"LORASWAP_DATA_DIR"} if called == "data_dir" else set()
        builds |= called in ("Settings", "settings_from", "command_settings")
    return names, builds


@pytest.mark.parametrize("module", sorted(RUN_BY))
def test_every_commands_help_names_the_variables_it_reads(module):
    """A review: ``merge --help`` did not say that it reads $LORASWAP_MAX_RANK (the largest rank it accepts); eval's
    did not say that the engine takes every serving setting from its variable (LORASWAP_MAX_INPUT_TOKENS can change
    its results). A command that builds Settings says that every serving variable counts."""
    names, builds = variables_read(Path(service.__file__).parents[1] / module)
    for command in RUN_BY[module]:
        shown = " ".join(subcommands()[command].format_help().split())
        assert [name for name in sorted(names) if name not in shown] == [], command
        if builds:
            assert "LORASWAP_MAX_BATCH for --max-batch" in shown if command == "scale" else \
                " ".join(SERVING_VARIABLES.split()) in shown, command


def test_the_service_knows_neither_training_nor_loadtest():
    """No module of service/ imports training or loadtest, or names their modules in a string."""
    named = re.compile(r"""["'](training|loadtest)[.:]""")
    for path in Path(service.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not [name for name in imported if name.split(".")[0] in ("training", "loadtest")], path
        assert not named.search(path.read_text()), path
    assert set(commands()) == {"train", "eval", "calibrate", "sweep", "merge", "bench", "side-by-side",
                               "loadtest", "scale"}  # entry points

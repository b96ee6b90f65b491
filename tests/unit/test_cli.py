"""``loraswap`` on the command line: what cannot be done ends with a one-line usage error and status 2."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.cli.command import check_onednn, flag, take_port
from service.cli.main import build_parser, commands, main
from service.settings import CPU_DRAFT_TOKENS, CPU_PREFILL_CHUNK, Settings
from service.settings import variable as variable_of
from tests.data.make_corpus import NLI_SAMPLE, SQUAD_SAMPLE
from tests.server_helpers import free_port

HALF = str(2**62)  # a size within 64 bits whose allocations are not
SERVE_TINY = ["--base-model", "{base}", "--device", "cpu"]  # the tiny Llama: 512 bytes of keys and values a token
LONG = "a" * 300  # a file name longer than any Linux file system takes (255 bytes)
LOADTEST = ["loadtest", "--scenario", "single", "--users", "1", "--duration", "10", "--host", "http://127.0.0.1:9",
            "--adapter-root", "x", "--json", "x.json"]
SIDE_BY_SIDE = ["side-by-side", "--system", "a=loraswap@http://127.0.0.1:9", "--system", "b=loraswap@http://127.0.0.1:9"]


@pytest.mark.parametrize("argv,message", [
    # the adapter is checked before the data is read: these need no data (LORASWAP_DATA_DIR=/nonexistent passes)
    # named by its option, as merge and calibrate name it (a review: eval's named none)
    *((["eval", "--task", task, "--adapter", "nope"], "loraswap eval: error: --adapter nope: unknown adapter: not")
      for task in ("squad", "nli", "rte")),
    (["eval", "--task", "rte", "--adapter", "nope", "--data", "/nonexistent/rte.jsonl"], "--adapter nope: unknown "
     "adapter"),
    # a file or folder an option names that is not there: the option named (a review: OSError's line named none)
    (["eval", "--task", "rte", "--adapter", "none", "--data", "/nonexistent/rte.jsonl"],
     "loraswap eval: error: --data /nonexistent/rte.jsonl: No such file or directory\n"),
    (["train", "--task", "nli", "--out", "x", "--data-dir", "/nonexistent"], "loraswap train: error: --data-dir "
     "/nonexistent: No such file or directory: /nonexistent/nli/snli_test.jsonl.gz\n"),
    (["calibrate", "--adapter", "nli", "--data-dir", "/nonexistent"], "loraswap calibrate: error: --data-dir "
     "/nonexistent: No such file or directory: /nonexistent/nli/"),
    ([*SIDE_BY_SIDE, "--data", "/nonexistent"], "loraswap side-by-side: error: --data /nonexistent: No such file or "
     "directory: /nonexistent/squad/dev-v1.1.json.gz\n"),
    (["eval", "--task", "nli", "--adapter", "none", "--limit", "0"], "--limit: must be above 0, not 0"),
    (["train", "--task", "squad", "--out", "x", "--max-steps", "0"], "--max-steps: must be above 0, not 0"),
    (["train", "--task", "squad", "--out", "x", "--lr", "-1"], "--lr: must be above 0, not -1"),
    (["merge", "--adapter", "missing", "--out", "x"], "loraswap merge: error: --adapter missing: unknown adapter: not "
     "an adapter folder (one holding adapter_config.json), or one in "),
    (["merge", "--adapter", "tests", "--out", "x"], "(tests is a folder without one)\n"),
    (["serve", "--max-batch", "0"], "loraswap serve: error: --max-batch: Input should be greater than or equal to 1\n"),
    (["serve", "--max-input-tokens", "64", "--answer-stride", "64"],
     "loraswap serve: error: --answer-stride: must be below --max-input-tokens (64), not 64: "),
    # comma lists and counts are checked as they are parsed, each bad item named
    (["bench", "--modes", "base,nope"], "--modes: 'nope' in 'base,nope' is not an item of the list (one of hf_base"),
    (["bench", "--batch-sizes", "1,x"], "--batch-sizes: '1,x': every item must be 1-4096 int"),
    (["bench", "--batch-sizes", "1,0"], "--batch-sizes: '1,0': an item must be from 1 to 4096, not 0"),
    (["bench", "--batch-sizes", "1,4097"], "--batch-sizes: '1,4097': an item must be from 1 to 4096, not 4097"),
    (["bench", "--rank", "65"], "--rank: must be from 1 to 64, not 65"),
    (["bench", "--rank", "0"], "--rank: must be from 1 to 64, not 0"),
    (["bench", "--batch-sizes", "1,,2"], "--batch-sizes: '' in '1,,2' is not an item of the list"),
    (["bench", "--hot-loads", "-1"], "--hot-loads: must be at least 0, not -1"),
    (["bench", "--registered", "-5"], "--registered: must be at least 0, not -5"),
    (["sweep", "--task", "nli", "--out", "x", "--ranks", "4,-1"], "--ranks: '4,-1': an item must be above 0, not -1"),
    (["sweep", "--task", "nli", "--out", "x", "--lrs", "1e-3,fast"], "--lrs: '1e-3,fast': every item must be"),
    (["train", "--task", "nli", "--out", "x", "--eval-examples", "-1"], "--eval-examples: must be at least 0, not -1"),
    # infinities and NaN bound nothing: refused by every number option and setting
    *((["train", "--task", "squad", "--out", "x", "--lr", value], f"--lr: must be a finite number above 0, not {value}")
      for value in ("inf", "nan", "Infinity")),
    (["eval", "--task", "nli", "--adapter", "none", "--limit", "nan"], "--limit: invalid positive int value: 'nan'"),
    *((["serve", "--max-queue-wait", value], "--max-queue-wait: Input should be a finite number") for value in
      ("inf", "nan")),
    (["serve", "--drain-seconds", "inf"], "--drain-seconds: Input should be a finite number"),
    # a wait past threading.TIMEOUT_MAX: taken, it killed the engine thread or a timer thread (OverflowError)
    *((["serve", f"--{name}", value], f"--{name}: must be at most {most}, the longest a thread can wait (292 years)")
      for name, most in (("max-queue-wait", 9223372036), ("drain-seconds", 9223372036),
                         ("batch-window-ms", 9223372036000)) for value in ("1e20", str(most + 1))),
    # a default adapter no adapter can be named (a review: accepted, with a warning that none of that name is there)
    *((["serve", flag_, name], f"loraswap serve: error: {flag_}: Input should name an adapter: "
       "a plain identifier ([A-Za-z_][A-Za-z0-9_]*, at most 64 characters), or none or base for the bare base\n")
      for flag_ in ("--qa-adapter", "--nli-adapter") for name in ("../x", "", "a-b", "x" * 65)),
    (["serve", "--draft-tokens", "-1"], "--draft-tokens: Input should be greater than or equal to 0"),
    # a review: --max-batch 2**63 - 1 failed the start with torch's OverflowError and its C++ frames; a review: the
    # refusal named the field (max_batch: Value error, ...), not the flag
    *((["serve", f"--{name}", str(2**63)], f"loraswap serve: error: --{name}: must be at most {2**63 - 1} (a 64-bit "
       "integer, as torch takes)\n")
      for name in ("max-batch", "max-queue", "max-resident", "prefix-cache-bytes", "max-body-bytes")),
    *((["loadtest", "--scenario", "soak", "--users", "1", "--duration", duration, "--host", "http://127.0.0.1:9",
        "--adapter-root", "x", "--json", "x.json", *more], message) for duration, more, message in [
        ("inf", [], "--duration: must be a finite number above 0, not inf"),
        ("10", ["--warmup", "inf"], "--warmup: must be a finite number at least 0, not inf"),
        ("10", ["--warmup", "10"], "loraswap loadtest: error: --warmup 10 leaves no load after it"),
        ("10", ["--warmup", "60"], "loraswap loadtest: error: --warmup 60 leaves no load after it")]),
    # ports and devices: what the server and the commands could not run on
    *((["serve", "--port", port], f"loraswap serve: error: --port: Input should be {bound}") for port, bound in
      [("-1", "greater than or equal to 1"), ("0", "greater than or equal to 1"),
       ("65536", "less than or equal to 65535"), ("99999", "less than or equal to 65535")]),
    *((["serve", "--device", name], "loraswap serve: error: --device: Input should be auto, cpu, cuda or cuda:N (GPU "
       "N)\n") for name in ("tpu", "cuda:", "cuda:-1", "CPU", "cpu ", "")),
    (["serve", "--device", "cuda:99"], "loraswap serve: error: --device: 'cuda:99' names GPU 99, and this machine has"),
    *(([command, *more, "--device", name], f"--device: must be auto, cpu, cuda or cuda:N, not '{name}'")
      for command, more in [("bench", []), ("eval", ["--task", "nli", "--adapter", "none"])]
      for name in ("tpu", "mps", "cuda:x")),
    (["bench", "--device", "cuda:99"], "--device: 'cuda:99' names GPU 99"),
    (["loadtest", "--scenario", "single", "--users", "1", "--duration", "10", "--host", "http://127.0.0.1:9",
      "--adapter-root", "x", "--json", "/nonexistent/x.json"],
     "loraswap loadtest: error: argument --json: /nonexistent/x.json: there is no folder /nonexistent to write it in"),
    (["loadtest", "--scenario", "single", "--users", "1", "--duration", "10", "--host", "http://127.0.0.1:9",
      "--adapter-root", "x", "--json", "x.json", "--md", "/nonexistent/x.md"],
     "loraswap loadtest: error: argument --md: /nonexistent/x.md: there is no folder /nonexistent to write it in"),
    # a review: a name past the file system's 255 characters was OSError's traceback, when parsed or when run
    *((argv, f"{message}: {LONG}: File name too long") for argv, message in [
        (["eval", "--task", "nli", "--adapter", "none", "--json", LONG], "argument --json"),
        (["train", "--task", "nli", "--out", LONG], "argument --out"),
        (["sweep", "--task", "nli", "--out", LONG], "argument --out"),
        (["merge", "--adapter", "x", "--out", LONG], "argument --out")]),
    # a review: bench --modes base,base timed base twice; no list of a command means an item twice
    *((argv, f"argument {argv[-2]}: '{argv[-1]}' names '{twice}' twice") for argv, twice in [
        (["bench", "--modes", "base,base"], "base"), (["bench", "--batch-sizes", "1,16,1"], "1"),
        (["side-by-side", "--system", "a=loraswap@http://h:1", "--loads", "squad:1,squad:01"], "squad:1")]),
    # a review: a port past 65535 was a "Connection refused" once the command ran
    *((["loadtest", "--scenario", "single", "--users", "1", "--duration", "10", "--host", url, "--adapter-root", "x",
        "--json", "x.json"], f"argument --host: '{url}' is not a server's URL, http://HOST:PORT (a port in 1-65535)")
      for url in ("http://127.0.0.1:99999", "http://127.0.0.1:0", "http://h:x", "127.0.0.1:8000", "ftp://h:1",
                  "http://:80",
                  # a review: an unclosed IPv6 address got argparse's "invalid server_url value", a space was taken
                  "http://[::1", "http://a b:1", "http://h:1/a b",
                  # a review: an empty label failed in the idna codec naming no option; '-x' was accepted
                  "http://x..y:1", "http://-x:1", "http://x-.y:1")),
    # a review: a query gave '/path?q/adapters'; a fragment and a user's password were accepted
    *((["loadtest", "--scenario", "single", "--users", "1", "--duration", "10", "--host", url, "--adapter-root", "x",
        "--json", "x.json"], f"argument --host: '{url}' is not a server's URL, http://HOST:PORT[/PATH]: no query")
      for url in ("http://127.0.0.1:8649/path?q", "http://h:1#fragment", "http://user:password@h:1")),
    (["side-by-side", "--system", "a=loraswap@http://x..y:1"], "argument --system: 'http://x..y:1' is not a server's"),
    (["side-by-side", "--system", "a=loraswap@http://[::1"], "argument --system: 'http://[::1' is not a server's URL"),
    (["side-by-side", "--system", "a=loraswap@http://h:65536"], "argument --system: 'http://h:65536' is not a "
     "server's URL"),
    # 0 to 2, as /answer and /v1 take it (strategies.MAX_TEMPERATURE)
    *((["eval", "--task", "squad", "--adapter", "none", "--strategy", "temperature", "--temperature", value],
       f"--temperature: must be {bound}in [0, 2], not {value} ")
      for value, bound in [("-1", ""), ("2.0001", ""), ("10", ""), ("nan", "a finite number "),
                           ("inf", "a finite number ")]),
    (["eval", "--task", "squad", "--adapter", "none", "--top-p", "1.5"], "--top-p: must be in (0, 1], not 1.5"),
    # a sampling option the strategy does not read, refused as /answer refuses it (strategies.READ_BY)
    *((["eval", "--task", "squad", "--adapter", "none", *more], f"loraswap eval: error: {message}")
      for more, message in [
        (["--top-k", "5"], "--top-k is not read by strategy 'greedy', which reads none of --seed, --temperature, "
         "--top-k and --top-p: leave it out or choose a strategy that reads it"),
        (["--temperature", "0.7"], "--temperature is not read by strategy 'greedy'"),
        (["--temperature", "0", "--top-p", "0.5"], "--top-p is not read by strategy 'greedy'"),
        (["--strategy", "top_k", "--top-p", "0.5"], "--top-p is not read by strategy 'top_k', which reads "
         "--seed, --temperature and --top-k"),
        (["--strategy", "nucleus", "--top-k", "5"], "--top-k is not read by strategy 'nucleus'"),
        (["--strategy", "temperature", "--top-k", "5", "--temperature", "0.5"], "--top-k is not read by strategy"),
        # a review: a seed with greedy was taken and unread (its default, 0, could not be told from a seed given)
        (["--seed", "5"], "--seed is not read by strategy 'greedy', which draws nothing at random: leave it out or "
         "choose a strategy that samples\n"),
        (["--seed", "0", "--temperature", "0"], "--seed is not read by strategy 'greedy', which draws nothing")]),
    # nli and rte score each label: a decoding option for them was ignored (--strategy) or refused as greedy's
    *((["eval", "--task", task, "--adapter", "none", *more], f"loraswap eval: error: {first} decodes SQuAD answers: "
       f"--task {task} scores each label instead")
      for task in ("nli", "rte") for more, first in [(["--strategy", "top_k"], "--strategy"),
                                                       (["--top-k", "5"], "--top-k"), (["--seed", "3"], "--seed"),
                                                       (["--strategy", "nucleus", "--top-p", "0.5"], "--strategy")]),
    (["eval", "--task", "squad", "--adapter", "none", "--data", __file__], f"{__file__}: not a squad file this command "
     "reads"),
    (["eval", "--task", "nli", "--adapter", "none", "--data", __file__], f"loraswap eval: error: {__file__}: line 1 is "
     "no JSON (Extra data at column 3)\n"),  # its """ is a JSON string, "", and a third "
    # a file to write is checked before the work (it was found unwritable only after it: a folder, no folder)
    *(([*command, flag, path], f"argument {flag}: {path}{message}") for command, flag in [
        (["bench"], "--json"), (["side-by-side", "--system", "a=loraswap@http://127.0.0.1:9"], "--json"),
        (["side-by-side", "--system", "a=loraswap@http://127.0.0.1:9"], "--markdown"),
        (["calibrate", "--adapter", "nli"], "--json"), (["calibrate", "--adapter", "nli"], "--diagram")]
      for path, message in [("/proc/nope/x.json", ": there is no folder /proc/nope to write it in"),
                            ("/tmp", " is a folder, not a file to write")]),
    (["bench", "--json", ""], "argument --json: must name a file, not be empty"),
    *(([*command, "--json", "adapters/squad/card.json"], "argument --json: adapters/squad/card.json lies in an adapter "
       "folder") for command in (["bench"], ["eval", "--task", "nli", "--adapter", "none"])),
    # merge writes a new folder: never into one that holds files (an adapter's), never a file
    *((["merge", "--adapter", "squad", "--out", out], f"loraswap merge: error: argument --out: {message}")
      for out, message in [(".", ". already holds files: name a new or empty folder"),
                           ("pyproject.toml", "pyproject.toml is a file, not a folder"),
                           ("pyproject.toml/x/y", "pyproject.toml/x/y lies below a file"),
                           ("", "must name a folder, not be empty")]),
    # --distractors: SQuAD only, and no more than the data has (both found before the model loads)
    *((["eval", "--task", task, "--adapter", "none", "--distractors", "2"],
       f"loraswap eval: error: --distractors hides SQuAD paragraphs among others: not for --task {task}")
      for task in ("nli", "rte")),
    (["eval", "--task", "squad", "--adapter", "none", "--data", str(SQUAD_SAMPLE), "--distractors", "300"],
     "loraswap eval: error: --distractors 300: only 2"),
    # what eval writes once it is done, checked as it is parsed: a folder was an IsADirectoryError after the work
    *((["eval", "--task", "nli", "--adapter", "none", option, str(Path(__file__).parent)],
       f"loraswap eval: error: argument {option}: {Path(__file__).parent} is a folder, not a file to write")
      for option in ("--predictions", "--json")),
    # two reports of one command in one file: one was written over the other
    (["eval", "--task", "nli", "--adapter", "none", "--json", "r.json", "--predictions", "./r.json"],
     "loraswap eval: error: --predictions and --json name one file, r.json: one report would be written over the "
     "other"),
    (["calibrate", "--adapter", "nli", "--json", "r.json", "--diagram", "r.json"],
     "--diagram and --json name one file"),
    (["side-by-side", "--system", "a=loraswap@http://127.0.0.1:9", "--json", "r", "--markdown", "r"],
     "--json and --markdown name one file"),
    (["loadtest", "--scenario", "single", "--users", "1", "--duration", "10", "--host", "http://127.0.0.1:9",
      "--adapter-root", "x", "--json", "r.md", "--md", "r.md"], "--json and --md name one file"),
])
def test_requests_that_cannot_be_done_are_usage_errors(argv, message, tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        eval_setup = ["--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path)] if argv[0] == "eval" else []
        main([*argv, *eval_setup])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("variables,argv,error", [
    # a review: a path an option names that the file system refuses (a component over 255 bytes) was OSError's line,
    # "[Errno 36] File name too long", naming no option, once the command ran
    *(({}, [*argv, option, LONG], f"argument {option}: {LONG}: File name too long") for argv, option in [
        (["eval", "--task", "nli", "--adapter", "none"], "--data"), (["eval", "--task", "nli"], "--adapter"),
        (["eval", "--task", "nli", "--adapter", "none"], "--adapters-dir"),
        (["eval", "--task", "nli", "--adapter", "none"], "--base-model"),
        (["merge", "--out", "x"], "--adapter"), (["merge", "--adapter", "x", "--out", "x"], "--adapters-dir"),
        (["merge", "--adapter", "x", "--out", "x"], "--base-model"),
        (["calibrate"], "--adapter"), (["calibrate", "--adapter", "x"], "--data-dir"),
        (["calibrate", "--adapter", "x"], "--adapters-dir"), (["calibrate", "--adapter", "x"], "--base-model"),
        (["train", "--task", "nli", "--out", "x"], "--data-dir"), (["train", "--task", "nli", "--out", "x"],
                                                                   "--base-model"),
        (["sweep", "--task", "nli", "--out", "x"], "--data-dir"), (["sweep", "--task", "nli", "--out", "x"],
                                                                   "--base-model"),
        (["bench"], "--base-model"), (["bench"], "--cache-dir"),
        (LOADTEST[:-4], "--adapter-root"), (LOADTEST, "--squad"), (LOADTEST, "--nli"), (SIDE_BY_SIDE, "--data")]),
    # serve's (and scale's) adapter folders: refused at once, as a folder so named can never be made (a missing one
    # is a warning at start: it may be made later); the start failed with OSError
    *(({}, [command, *more, option, LONG], f"loraswap {command}: error: {option}{item}: the file system refuses this "
       "path: File name too long\n") for command, more in [("serve", []), ("scale", ["--replicas", "1"])]
      for option, item in [("--adapters-dir", ""), ("--adapter-roots", "[0]"), ("--cache-dir", ""),
                           ("--base-model", "")]),
    ({"LORASWAP_ADAPTER_ROOTS": f"/tmp:{LONG}"}, ["serve"], "loraswap serve: error: LORASWAP_ADAPTER_ROOTS[1]: the "
     "file system refuses this path: File name too long\n"),
    ({"LORASWAP_ADAPTERS_DIR": LONG}, ["serve"], "LORASWAP_ADAPTERS_DIR: the file system refuses this path"),
    # the variables the commands' options default to
    ({"LORASWAP_ADAPTERS_DIR": LONG}, ["merge", "--adapter", "x", "--out", "x"], "loraswap merge: error: "
     "LORASWAP_ADAPTERS_DIR: the file system refuses this path: File name too long"),
    ({"LORASWAP_CACHE_DIR": LONG}, ["bench"], "loraswap bench: error: LORASWAP_CACHE_DIR: the file system refuses"),
    ({"LORASWAP_DATA_DIR": LONG}, ["eval", "--task", "nli", "--adapter", "none"], "loraswap eval: error: "
     "LORASWAP_DATA_DIR: the file system refuses this path: File name too long\n"),
    ({"LORASWAP_DATA_DIR": LONG}, SIDE_BY_SIDE, "loraswap side-by-side: error: LORASWAP_DATA_DIR: the file system "
     "refuses this path"),
])
def test_a_path_the_file_system_refuses_is_a_usage_error_naming_its_option(variables, argv, error, monkeypatch,
                                                                           capsys):
    err = usage_error(argv, variables, monkeypatch, capsys)
    assert err.startswith(f"loraswap {argv[0]}: error: ") and error in err


BLOCKED = f"{__file__}/x"  # a path with a file on the way (ENOTDIR): no folder can ever be made there


@pytest.mark.parametrize("variables,argv,error", [
    # a review: ENOTDIR passed as "nothing there": eval, merge and scale failed with OSError's line naming nothing,
    # serve's start with NotADirectoryError, and serve only warned of --adapters-dir
    ({}, ["scale", "--replicas", "1", "--cache-dir", BLOCKED], "--cache-dir: "),
    ({}, ["serve", "--cache-dir", BLOCKED], "--cache-dir: "),
    ({}, ["serve", "--adapters-dir", BLOCKED], "--adapters-dir: "),
    ({"LORASWAP_CACHE_DIR": BLOCKED}, ["eval", "--task", "nli", "--adapter", "none"], "LORASWAP_CACHE_DIR: "),
    ({"LORASWAP_CACHE_DIR": BLOCKED}, ["merge", "--adapter", "squad", "--out", "x"], "LORASWAP_CACHE_DIR: "),
    ({}, ["eval", "--task", "nli", "--adapter", "none", "--data", BLOCKED], f"argument --data: {BLOCKED}: "),
])
def test_a_path_with_a_file_on_the_way_is_a_usage_error_naming_its_option(variables, argv, error, monkeypatch,
                                                                           capsys):
    err = usage_error(argv, variables, monkeypatch, capsys)
    assert err.startswith(f"loraswap {argv[0]}: error: ") and error in err and "Not a directory" in err, err


UNMAKABLE = "/proc/loraswap-cache"  # a folder no one can make (procfs: mkdir fails with ENOENT), though nothing is on
# the way: it passes the check of the name (settings.usable_path) and fails only when the cache is made


CACHE_MAKERS = [["serve"], ["scale", "--replicas", "1"], ["bench", "--registered", "2"],  # these have --cache-dir
                ["eval", "--task", "nli", "--adapter", "none"], ["calibrate", "--adapter", "nli"],
                ["merge", "--adapter", "squad", "--out", "{tmp}/merged"],
                ["train", "--task", "nli", "--out", "{tmp}/trained", "--max-steps", "1"]]


@pytest.mark.parametrize("argv,name", [*((argv, "LORASWAP_CACHE_DIR") for argv in CACHE_MAKERS),
                                       *((argv, "--cache-dir") for argv in CACHE_MAKERS[:3])])
def test_a_cache_folder_that_cannot_be_made_is_a_usage_error_naming_its_setting(argv, name, tmp_path, monkeypatch,
                                                                                 capsys):
    """A review: '[Errno 2] No such file or directory: '/proc/nope'', naming no setting, from each command that makes
    the embedded base's cache folder (serve's in /health, after its start had begun); serve refuses it before."""
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    variables = {name: UNMAKABLE} if name.startswith("LORASWAP_") else {}
    flags = [] if variables else [name, UNMAKABLE]
    assert usage_error([*argv, *flags], variables, monkeypatch, capsys) == (
        f"loraswap {argv[0]}: error: {name} {UNMAKABLE}: cannot make this folder: No such file or directory\n")


@pytest.mark.parametrize("variables,argv,error", [
    # a review: a setting neither given nor from the environment was named by its field, which no user sets
    ({}, ["serve", "--answer-stride", "2000"], "--answer-stride: must be below --max-input-tokens (1024)"),
    ({"LORASWAP_MAX_INPUT_TOKENS": "1024"}, ["serve", "--answer-stride", "2000"], "below LORASWAP_MAX_INPUT_TOKENS"),
    # a review: 'the API key must differ from the admin key' named neither as given
    ({}, ["serve", "--admin-key", "k", "--api-key", "k"], "--api-key must differ from --admin-key"),
    ({"LORASWAP_ADMIN_KEY": "k"}, ["serve", "--api-key", "k"], "--api-key must differ from LORASWAP_ADMIN_KEY"),
    # a review: a base model folder the variable gave was named by the flag, which the user had not given
    ({"LORASWAP_BASE_MODEL": "/nonexistent"}, ["serve"], "loraswap serve: error: LORASWAP_BASE_MODEL /nonexistent: no "
     "Hugging Face model directory there\n"),
    ({"LORASWAP_BASE_MODEL": "/nonexistent"}, ["scale", "--replicas", "1"], "loraswap scale: error: "
     "LORASWAP_BASE_MODEL /nonexistent: no Hugging Face model directory there\n"),
    # a review: 'adapter rank 16 must be an integer in 1..8' named neither the adapter nor the variable
    ({"LORASWAP_MAX_RANK": "8"}, ["merge", "--adapter", "squad", "--out", "x"], "loraswap merge: error: --adapter "
     "squad: adapter rank 16 must be an integer in 1..8 (LORASWAP_MAX_RANK)\n"),
    # a review: an absolute --adapter was named twice, 'no adapter folder /abs/missing, nor /abs/missing'
    ({}, ["merge", "--adapter", "/nonexistent/missing", "--out", "x"], "--adapter /nonexistent/missing: unknown "
     "adapter: not an adapter folder (one holding adapter_config.json)\n"),
])
def test_a_refusal_names_each_setting_as_the_user_could_set_it(variables, argv, error, monkeypatch, capsys):
    assert error in usage_error(argv, variables, monkeypatch, capsys)


@pytest.mark.parametrize("variables,argv,error", [
    ({}, ["serve", "--host", "a b"], "loraswap serve: error: --host: Input should be a host name or an IP address\n"),
    ({"LORASWAP_HOST": "-x"}, ["serve"], "LORASWAP_HOST: Input should be a host name or an IP address\n"),
    ({}, ["serve", "--host", "x..y"], "--host: Input should be a host name or an IP address\n"),
])
def test_serve_refuses_a_host_that_is_no_name_or_address_before_anything_loads(variables, argv, error, monkeypatch,
                                                                              capsys):
    """A review: serve --host 'a b' loaded the model, then uvicorn failed with exit status 3."""
    assert usage_error(argv, variables, monkeypatch, capsys).endswith(error)


@pytest.mark.parametrize("command", [["serve"], ["scale", "--replicas", "1"]])
@pytest.mark.parametrize("setting,unset", [("admin_key", "refuses the admin routes"),
                                           ("api_key", "leaves the routes that run the model open")])
@pytest.mark.parametrize("from_variable", [False, True])
def test_an_empty_key_is_a_usage_error_naming_it_as_given(command, setting, unset, from_variable, monkeypatch,
                                                          capsys):
    """A review: --api-key '' was refused, --admin-key '' (or LORASWAP_ADMIN_KEY=, a docker -e left empty) was taken
    and refused the admin routes without a word. One rule for both keys, serve's and scale's."""
    named = variable_of(setting) if from_variable else flag(setting)
    variables, flags = ({named: ""}, []) if from_variable else ({}, [f"{named}="])
    flags.extend(["--base-model", "/nonexistent/base"])  # nothing starts should the key be taken: another refusal
    assert usage_error([*command, *flags], variables, monkeypatch, capsys) == (
        f"loraswap {command[0]}: error: {named}: must not be empty: give a key, or leave it unset, which {unset}\n")


IN_USE = "cannot listen on port {taken} of 127.0.0.1: Address already in use\n"


@pytest.mark.parametrize("variables,more,error", [
    ({}, ["--port", "{taken}"], "--port {taken}: " + IN_USE),
    ({"LORASWAP_PORT": "{taken}"}, [], "LORASWAP_PORT {taken}: " + IN_USE),
    ({}, ["--host", "10.255.255.1", "--port", "{taken}"],  # an address of no interface here
     "--host 10.255.255.1: cannot listen on port {taken} of 10.255.255.1: Cannot assign requested address\n"),
], ids=["port", "port-variable", "host"])
def test_serve_refuses_a_port_in_use_or_a_host_it_cannot_listen_on_before_the_model_loads(variables, more, error,
                                                                                          tiny_llama_dir, monkeypatch,
                                                                                          capsys):
    """A review: the model loaded, uvicorn logged 'Application startup complete', then '[Errno 98] error while
    attempting to bind on address', exit status 3."""
    from service.http import server

    monkeypatch.setattr(server, "serve", lambda *args: pytest.fail("the model loads"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        argv = ["serve", *(part.format(base=tiny_llama_dir) for part in SERVE_TINY), *more]
        err = usage_error([part.format(taken=port) for part in argv],
                          {name: value.format(taken=port) for name, value in variables.items()}, monkeypatch, capsys)
    assert err == "loraswap serve: error: " + error.format(taken=port), err


@pytest.mark.parametrize("command", [["eval", "--task", "nli", "--adapter", "none", "--data", str(NLI_SAMPLE),
                                      "--adapters-dir", "{tmp}"], ["serve"]], ids=["eval", "serve"])
def test_a_usage_error_found_as_the_base_loads_is_the_only_line_said(command, tiny_llama_dir, tmp_path):
    """A review: ``eval --max-batch 100000000000`` said bitsandbytes' warning to `pip install kernels` (peft imports it
    for --quantize nf4; on a CPU with AVX512-BF16), then the runtime's line that the start failed, then the usage
    error. In a process of its own from its start (serve's starts again), as bitsandbytes warns where it is imported."""
    argv = [*(part.format(tmp=tmp_path) for part in command), "--base-model", str(tiny_llama_dir), "--device", "cpu",
            "--quantize", "nf4", "--max-batch", "100000000000"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "service.cli.entry", *argv], env=env,  # run from this checkout
                          capture_output=True, text=True, timeout=300)
    # the memory check's error alone: its first line, a line for each part it counts, and the advice
    first, *parts, advice = done.stderr.splitlines()
    assert done.returncode == 2 and first.startswith(f"loraswap {command[0]}: error: ") and \
        "the base model and these settings need " in first, done.stderr
    assert all(part.startswith("  ") for part in parts) and advice.startswith("lower them: "), done.stderr
    assert " for --max-batch 100000000000 (" in done.stderr

def test_the_command_has_one_entry_point_which_holds_the_stops_from_the_process_s_first_step():
    """``python -m service.cli.main`` (the load tests' scripts, the tests) ran the command too, and held Ctrl-C and
    SIGTERM back only once its modules had loaded (service.cli.entry holds them first): a stop meanwhile killed it
    (status 143), or was dropped as PID 1. It names the entry point now, and runs nothing."""
    def run(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)

    refused, entry = run("service.cli.main"), run("service.cli.entry")
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1, refused.stderr
    assert "run loraswap, or python -m service.cli.entry" in refused.stderr
    assert entry.returncode == 0 and entry.stdout.startswith("usage: ")


def test_the_port_serve_takes_before_the_model_loads_is_its_own_until_it_serves():
    """A socket bound alone would not keep another SO_REUSEADDR socket (uvicorn's, another server's) off the port
    on Linux: the sockets the server is handed listen from the start."""
    settings = Settings(port=free_port())
    sockets = take_port(settings, build_parser().parse_args(["serve"]))
    try:
        assert all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for sock in sockets)
        with socket.socket() as other, pytest.raises(OSError, match="Address already in use"):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            other.bind(("127.0.0.1", settings.port))
    finally:
        for sock in sockets:
            sock.close()


def test_eval_names_an_overflowing_adapter_as_given(tiny_llama_dir, llama_adapters, tmp_path, monkeypatch, capsys):
    """A review: an adapter folder is served under an internal name, which its refusal named: 'adapter 'evaluated'
    gave NaN or infinite logits'."""
    folder = shutil.copytree(llama_adapters["one"], tmp_path / "overflowing")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": -1e30}))
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--task", "nli", "--adapter", str(folder), "--data", str(NLI_SAMPLE), "--limit", "3",
              "--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err  # the base's loading progress, then the error's line
    assert exit_.value.code == 2 and "evaluated" not in err, err
    assert err.endswith(f"loraswap eval: error: adapter '{folder}' gave NaN or infinite logits for this request "
                        "(weights that overflow in the forward pass): no answer can be computed from them\n"), err


def test_every_command_description_joins_its_sentences():
    """A review: scale's --help read "...holds its adapter A flag not given...": the settings' sentence was added to
    a description without a full stop."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():
        text = " ".join((parser.description or "").split())
        assert ".." not in text and ". ." not in text, (name, text)  # no sentence ended twice
        for sentence in ("A flag not given", "Every setting of loraswap serve"):
            assert sentence not in text or text.startswith(sentence) or f". {sentence}" in text, (name, text)


def usage_error(argv: list[str], variables: dict[str, str], monkeypatch, capsys) -> str:
    """What ``loraswap ARGV`` with ``variables`` set says on stderr, checked to be a usage error (exit 2) in one
    line."""
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("command", [["merge", "--out", "x"], ["eval", "--task", "nli"], ["calibrate"]])
@pytest.mark.parametrize("from_variable", [False, True])
def test_an_adapter_looked_up_in_an_adapters_folder_that_does_not_exist_says_so(command, from_variable, tmp_path,
                                                                                monkeypatch, capsys):
    """A review: ``merge --adapter squad`` where the adapters folder did not exist said "no adapter_model.safetensors
    there"; eval and calibrate did not say that the folder was missing, nor which option or variable named it."""
    absent = tmp_path / "absent"
    if from_variable:
        monkeypatch.setenv("LORASWAP_ADAPTERS_DIR", str(absent))
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--adapter", "squad", *([] if from_variable else ["--adapters-dir", str(absent)])])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    source = "LORASWAP_ADAPTERS_DIR" if from_variable else "--adapters-dir"
    assert err.endswith(f": the adapters folder {absent} ({source}) does not exist\n"), err


ADAPTER_COMMANDS = {"merge": ["merge", "--out", "out"], "eval": ["eval", "--task", "nli"], "calibrate": ["calibrate"]}


def resolved(command: str, argv: list[str]) -> Path:
    """The adapter folder ``loraswap ARGV`` (of ``command``, ``ADAPTER_COMMANDS``) takes ``--adapter`` to name, found
    as the command finds it; eval's None, an adapter of --adapters-dir served by its name, as that folder."""
    from training import calibrate, evaluate, merge

    args = build_parser().parse_args(argv)
    if command == "eval":
        return evaluate.adapter_folder(args) or args.adapters_dir / args.adapter
    return {"merge": merge.adapter_dir, "calibrate": calibrate.adapter_folder}[command](args)


@pytest.mark.parametrize("command", ADAPTER_COMMANDS)
@pytest.mark.parametrize("given,found", [
    ("listed", "adapters/listed"), ("rel", "rel"), ("{tmp}/adapters/both", "adapters/both"),
    # a folder of the working directory without adapter_config.json is no adapter: calibrate and merge took it (a
    # review: merge said it held no safetensors, calibrate that it had no card), eval looked on
    ("shadow", "adapters/shadow"),
    ("both", "--adapter both names two adapter folders, {tmp}/both (from the working directory) and "
     "{tmp}/adapters/both (in --adapters-dir): give the absolute path of the one meant\n"),
    ("plain", "--adapter plain: unknown adapter: not {besides}an adapter folder (one holding adapter_config.json), "
     "or one in {tmp}/adapters (plain is a folder without one)\n"),
    ("missing", "--adapter missing: unknown adapter: not {besides}an adapter folder (one holding "
     "adapter_config.json), or one in {tmp}/adapters\n"),
    ("{tmp}/plain", "--adapter {tmp}/plain: unknown adapter: not {besides}an adapter folder (one holding "
     "adapter_config.json) ({tmp}/plain is a folder without one)\n"),
], ids=["listed", "relative", "absolute", "shadowed", "ambiguous", "not-an-adapter", "missing", "absolute-plain"])
def test_eval_calibrate_and_merge_find_the_adapter_folder_by_one_rule(command, given, found, tmp_path, monkeypatch,
                                                                      capsys):
    """eval took a folder for an adapter where it held adapter_config.json, calibrate and merge any folder, each by
    its own copy of the rule: the path as given where it holds adapter_config.json, else the folder of that name in
    --adapters-dir where that does; a relative path that names an adapter both ways is refused (which was meant
    cannot be told, as POST /adapters refuses a relative path two roots hold), and one that names none says which
    folder holds no adapter_config.json."""
    for folder in ("rel", "both", "adapters/listed", "adapters/both", "adapters/shadow"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "adapter_config.json").write_text("{}")
        (tmp_path / folder / "adapter_model.safetensors").write_text("")  # merge's check: read no further here
    for folder in ("plain", "shadow"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path)
    argv = [*ADAPTER_COMMANDS[command], "--adapter", given.format(tmp=tmp_path), "--adapters-dir",
            str(tmp_path / "adapters")]
    if found.startswith("--adapter"):
        err = usage_error(argv, {}, monkeypatch, capsys)
        besides = "'none' or 'base', " if command == "eval" else ""
        assert err == f"loraswap {command}: error: {found.format(tmp=tmp_path, besides=besides)}", err
    else:
        assert resolved(command, argv).resolve() == tmp_path / found


def test_no_option_of_a_command_takes_a_path_unchecked():
    """Every option that takes a path reads it through a type that refuses one the file system refuses (input_path,
    input_name, output_file, ...), never as a plain Path: serve's and scale's settings are checked by Settings."""
    assert [(command, action.option_strings[0]) for command, action in commands_options()
            if action.type is Path] == []


def commands_options() -> list[tuple[str, argparse.Action]]:
    """(command, option) for every option of every command whose values argparse types, but serve's and scale's
    settings (pydantic validates those)."""
    from service.cli.main import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return [(name, action) for name, parser in commands.items() if name not in ("serve", "scale")
            for action in parser._actions if action.option_strings and action.type is not None]


def test_every_integer_option_is_a_64_bit_integer():
    """A review: ``train --max-steps`` of 400 digits ended in transformers' OverflowError once the weights had loaded;
    torch's integers are 64-bit. Every option that takes an integer (or a list of them) refuses a larger one."""
    for command, action in commands_options():
        for value in (str(2**63), "1" + "0" * 400, str(-2**63 - 1)):
            try:
                parsed = action.type(value)
            except (argparse.ArgumentTypeError, ValueError, OSError):  # OSError: a path type's name too long
                continue
            items = parsed if isinstance(parsed, list) else [parsed]
            assert not any(type(item) is int for item in items), f"{command} {action.option_strings[0]} {value}"


@pytest.mark.parametrize("argv,message", [
    (["train", "--task", "nli", "--out", "x", "--max-steps", "1" + "0" * 400], "loraswap train: error: argument "
     "--max-steps: must be above 0 and at most 9223372036854775807 (a 64-bit integer, as torch takes), not 1000"),
    (["train", "--task", "nli", "--out", "x", "--batch-size", str(2**63)], "argument --batch-size: must be above 0 "
     "and at most 9223372036854775807"),
    (["sweep", "--task", "nli", "--out", "x", "--ranks", f"4,{2**63}"], f"argument --ranks: '4,{2**63}': an item must "
     "be above 0 and at most 9223372036854775807"),
    (["eval", "--task", "squad", "--adapter", "none", "--seed", "-1"], "argument --seed: must be at least 0, not -1"),
    (["eval", "--task", "squad", "--adapter", "none", "--seed", str(2**63)], "argument --seed: must be at least 0 and "
     "at most 9223372036854775807"),
    (["calibrate", "--adapter", "nli", "--max-batch", str(2**64)], "argument --max-batch: must be above 0 and at "
     "most 9223372036854775807"),
])
def test_a_larger_integer_is_a_usage_error_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1
    assert message in error


@pytest.mark.parametrize("option", ["--json", "--diagram"])
@pytest.mark.parametrize("name", ["nli/mnli.jsonl.gz", "nli/snli_test.jsonl.gz"])
@pytest.mark.parametrize("data_dir_option", [True, False])
def test_calibrate_writes_no_report_over_a_data_file_it_reads(option, name, data_dir_option, tmp_path, monkeypatch,
                                                             capsys):
    """A review: ``calibrate --json DATA/nli/mnli.jsonl.gz`` wrote the report over the MNLI file it had read (eval
    refused it; calibrate checked only the files its options name, and its data files are found in a folder)."""
    root = tmp_path / "data"
    (root / "nli").mkdir(parents=True)
    for data in ("nli/mnli.jsonl.gz", "nli/snli_test.jsonl.gz"):
        shutil.copy(NLI_SAMPLE, root / data)
    monkeypatch.setenv("LORASWAP_DATA_DIR", str(tmp_path / "elsewhere" if data_dir_option else root))
    argv = ["calibrate", "--adapter", str(tmp_path / "nli"), option, str(root / name)]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, *(["--data-dir", str(root)] if data_dir_option else [])])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"loraswap calibrate: error: {option} {root / name} is the data file "
                                       f"{root / name}, which the command reads: the report would be written over "
                                       "it\n")
    assert (root / name).read_bytes() == NLI_SAMPLE.read_bytes()


@pytest.mark.parametrize("variable,value,words", [
    ("LORASWAP_MAX_BATCH", "abc", "Input should be a valid integer"),
    ("LORASWAP_ADAPTER_ROOTS", "{not json", "LORASWAP_ADAPTER_ROOTS: Expecting property name"),
    ("LORASWAP_ADAPTER_ROOTS", "[1]", "LORASWAP_ADAPTER_ROOTS[0]: Input is not a valid path"),  # an item of a list
    # what an adapter may be named, not pydantic's "String should match pattern" and its regular expression
    ("LORASWAP_QA_ADAPTER", "../x", "Input should name an adapter: a plain identifier "
     "([A-Za-z_][A-Za-z0-9_]*, at most 64 characters), or none or base for the bare base\n"),
    ("LORASWAP_DEVICE", "tpu", "Input should be auto, cpu, cuda or cuda:N (GPU N)\n"),
])
def test_an_invalid_environment_variable_is_a_usage_error_naming_it(variable, value, words, monkeypatch, capsys):
    """A review: the error named the setting (``device: ...``), not the variable the user set (LORASWAP_DEVICE)."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_:
        main(["serve"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"loraswap serve: error: {variable}")
    assert words in error and error.count("\n") == 1


BIG = str(2**63)  # past 64 bits: refused by the one check of the bound (settings.int64), in its one wording


@pytest.mark.parametrize("variables,argv,error", [
    ({}, ["serve", "--max-batch", BIG], "--max-batch: must be at most 9223372036854775807 (a 64-bit integer, as torch "
     "takes)"),
    ({"LORASWAP_MAX_BATCH": BIG}, ["serve"], "LORASWAP_MAX_BATCH: must be at most 9223372036854775807 (a 64-bit "
     "integer, as torch takes)"),
    ({}, ["scale", "--replicas", "1", "--max-batch", BIG], "--max-batch: must be at most 9223372036854775807"),
    ({"LORASWAP_PREFIX_BLOCK_TOKENS": BIG}, ["scale", "--replicas", "1"], "LORASWAP_PREFIX_BLOCK_TOKENS: must be at "
     "most 9223372036854775807"),
    ({"LORASWAP_DEVICE": "cuda:99"}, ["serve"], "LORASWAP_DEVICE: 'cuda:99' names GPU 99"),
    # the settings a message's words name, as given too (they said max_input_tokens, max_new_tokens)
    ({"LORASWAP_MAX_INPUT_TOKENS": "64"}, ["serve", "--answer-stride", "64"], "--answer-stride: must be below "
     "LORASWAP_MAX_INPUT_TOKENS (64), not 64"),
    ({"LORASWAP_MAX_NEW_TOKENS": "500"}, ["scale", "--replicas", "1", "--device", "cpu", "--base-model", "{base}"],
     "loraswap scale: error: LORASWAP_MAX_NEW_TOKENS 500 leaves 12 of the base model's 512 positions"),
    ({}, ["eval", "--task", "nli", "--adapter", "none", "--data", str(NLI_SAMPLE), "--max-new-tokens", "600"],
     "loraswap eval: error: the base model cannot run as asked: --max-new-tokens 600 leaves 0 of the base model's"),
    ({"LORASWAP_MAX_INPUT_TOKENS": BIG}, ["eval", "--task", "nli", "--adapter", "none", "--data", str(NLI_SAMPLE)],
     "LORASWAP_MAX_INPUT_TOKENS: must be at most 9223372036854775807"),
    ({}, ["eval", "--task", "nli", "--adapter", "none", "--max-batch", BIG],
     "argument --max-batch: must be above 0 and at most 9223372036854775807 (a 64-bit integer, as torch takes), not"),
    # a review: a size within 64 bits whose allocation cannot exist failed serve's start in DecodeStep ("Storage size
    # calculation overflowed"), and eval named max_queue, which it derives from --max-batch; a row's 768 columns: the
    # tiny Llama's 512 positions less --max-new-tokens 64 for a prompt, 64 generated and a step's 64 fed tokens
    *(({}, [command, *more, "--max-batch", HALF], f"{command}: error: {cannot}--max-batch {HALF} needs a full batch's "
       f"KV cache, {HALF} rows x 768 columns x 512 bytes a token, the columns for {columns}: past 2**63 bytes")
      for command, more, cannot, columns in [
          ("serve", SERVE_TINY, "", "--max-input-tokens 1024 and --max-new-tokens 64"),
          ("scale", ["--replicas", "1", *SERVE_TINY], "", "--max-input-tokens 1024 and --max-new-tokens 64"),
          # eval takes no --max-input-tokens: its variable is named
          ("eval", ["--task", "nli", "--adapter", "none", "--data", str(NLI_SAMPLE)],
           "the base model cannot run as asked: ", "LORASWAP_MAX_INPUT_TOKENS 1024 and --max-new-tokens 32")]),
    ({"LORASWAP_MAX_BATCH": HALF}, ["serve", *SERVE_TINY], f"serve: error: LORASWAP_MAX_BATCH {HALF} needs a full "
     "batch's KV cache"),
    ({}, ["serve", *SERVE_TINY, "--max-batch", "100000000"], "the base model and these settings need "),
    ({}, ["serve", *SERVE_TINY, "--max-batch", "100000000"], " for --max-batch 100000000 (a full batch's KV cache, "
     "134217728 rows x 768 columns x 512 bytes a token, the columns for --max-input-tokens 1024 and --max-new-tokens "
     "64)\n"),
    # a prefill step's activations, the CPU's default budget (a review: not counted)
    ({}, ["serve", *SERVE_TINY, "--max-batch", "100000000"], " for --max-prefill-tokens unset (a prefill step's "
     "activations, 2048 tokens x (6 x (hidden 64 + intermediate 128) x 4 bytes + a mask of 448 columns x 2 heads x 6 "
     "bytes + 512 bytes of keys and values), and 2048 rows' logits x vocab 1000 x 8 bytes)\n"),
    # one prompt alone past it (a review: counted as more tokens without a word of why)
    ({}, ["serve", *SERVE_TINY, "--max-batch", "100000000", "--max-prefill-tokens", "300"], " for "
     "--max-prefill-tokens 300 (a prefill step's activations, 448 tokens x "),
    ({}, ["serve", *SERVE_TINY, "--max-batch", "100000000", "--max-prefill-tokens", "300"], " and 448 rows' logits x "
     "vocab 1000 x 8 bytes; 448 tokens, not 300: one prompt alone may run past --max-prefill-tokens, up to the "
     "longest prompt (448 tokens))\n"),
    ({}, ["serve", *SERVE_TINY, "--max-resident", HALF], f"--max-resident {HALF} needs at least the LoRA banks of so "
     f"many adapters of rank 1 on one layer, {2**62 + 1} slots x 64 x 4 bytes: past 2**63 bytes"),
    # bench's --adapters is the engine's max_resident (a review: 2**62 ran out of memory making their names)
    ({}, ["bench", *SERVE_TINY, "--adapters", HALF, "--modes", "base"], f"bench: error: --adapters {HALF} needs at "
     "least the LoRA banks of so many adapters of rank 1 on one layer"),
    ({}, ["serve", *SERVE_TINY, "--prefix-cache-bytes", str(2**63 - 1)], f"{2**63 - 1} for --prefix-cache-bytes "
     f"{2**63 - 1} (the prefix cache's keys and values)\n"),
    ({}, ["serve", *SERVE_TINY, "--prefix-cache-bytes", str(2**63 - 1)], ")\nnot even --max-batch 1 fits with the "
     "rest: it needs "),
    ({}, ["serve", *SERVE_TINY, "--prefix-cache-bytes", str(2**63 - 1)], " there are; lower --prefix-cache-bytes ("),
])
def test_a_setting_refused_is_named_as_the_user_gave_it(variables, argv, error, tiny_llama_dir, tmp_path, monkeypatch,
                                                        capsys):
    """A review: ``serve --max-batch 2**63`` was refused as "max_batch: Value error, must be ...", the pydantic field,
    not the flag typed; a variable's value is named by the variable, in serve, scale and the engine eval runs."""
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    argv = [arg.format(base=tiny_llama_dir) for arg in argv]
    if argv[0] == "eval":
        argv = [*argv, "--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    # eval's loading of the base may print its progress first; the memory check's error has a line per part
    line = err[err.rfind(f"loraswap {argv[0]}: error: "):]
    assert exit_.value.code == 2 and line.startswith(f"loraswap {argv[0]}: error: ") and err.endswith("\n"), err
    assert error in line and "Value error" not in err and "max_batch" not in err and "max_queue" not in err
    assert "max_resident" not in err


@pytest.mark.parametrize("argv", [["--help"], *([command, "--help"] for command in ("serve", "eval", "bench"))])
def test_help_reads_no_environment_variable(argv, monkeypatch, capsys):
    """A review: one invalid LORASWAP_ variable failed every command, ``--help`` included (the parser read the settings
    for the defaults it shows). The defaults a setting gives are shown by their variable."""
    monkeypatch.setenv("LORASWAP_MAX_BATCH", "abc")
    monkeypatch.setenv("LORASWAP_ADAPTER_ROOTS", "[1]")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0 and out.startswith("usage: loraswap")
    if argv[0] == "eval":
        assert "(default: $LORASWAP_ADAPTERS_DIR, else " in out


def test_a_flag_overrides_an_invalid_environment_variable_of_its_setting(tmp_path, monkeypatch):
    from service.http import server

    served = []

    def serve(settings, named, sockets, checked):
        for sock in sockets:
            sock.close()
        served.append(settings)

    monkeypatch.setattr(server, "serve", serve)
    monkeypatch.setenv("LORASWAP_MAX_BATCH", "abc")
    main(["serve", "--max-batch", "3", "--cache-dir", str(tmp_path), "--port", str(free_port())])  # the embedded
    # base is not converted there
    assert [settings.max_batch for settings in served] == [3]


@pytest.mark.parametrize("variables,argv,error", [
    # a flag given overrides its setting's invalid variable outside serve too (a review: eval, bench refused)
    ({"LORASWAP_MAX_BATCH": "abc"}, ["eval", "--task", "nli", "--adapter", "nosuch", "--max-batch", "4"],
     "loraswap eval: error: --adapter nosuch: unknown adapter"),
    # a review: eval read every variable once more for max_answer_windows, and blamed the flag given for another's
    ({"LORASWAP_MAX_BATCH": "abc"}, ["eval", "--task", "nli", "--adapter", "none", "--data", str(NLI_SAMPLE),
                                     "--max-batch", "4", "--base-model", "/nonexistent/model", "--device", "cpu"],
     "loraswap eval: error: --base-model /nonexistent/model: no Hugging Face model directory there"),
    # nor does one of a setting the command sets itself (a review: eval said "eval's own max_queue: Input should be a
    # valid integer" for LORASWAP_MAX_QUEUE=abc)
    ({variable_of(name): "abc" for name in ("max_queue", "max_queue_wait", "batch_window_ms", "auto_merge")},
     ["eval", "--task", "nli", "--adapter", "none", "--data", str(NLI_SAMPLE), "--base-model", "/nonexistent/model",
      "--device", "cpu"], "loraswap eval: error: --base-model /nonexistent/model: no Hugging Face model directory"),
    ({"LORASWAP_PREFILL_CHUNK": "-3"}, ["bench", "--prefill-chunk", "0", "--modes", "xx"],
     "loraswap bench: error: argument --modes: 'xx' in 'xx' is not an item"),
    # an invalid variable a command never reads fails it not (a review: side-by-side, loadtest read every one)
    ({"LORASWAP_MAX_BATCH": "abc", "LORASWAP_QUANTIZE": "zz"}, ["side-by-side", "--system", "a=loraswap@http://h:1"],
     "loraswap side-by-side: error: need at least two systems"),
    # one a command reads for a default is named by its variable
    ({"LORASWAP_PREFILL_CHUNK": "-3"}, ["bench", "--modes", "base"],
     "loraswap bench: error: LORASWAP_PREFILL_CHUNK: Input should be greater than or equal to 0"),
])
def test_only_the_variables_a_command_reads_and_no_flag_overrides_can_fail_it(variables, argv, error, monkeypatch,
                                                                               capsys):
    err = usage_error(argv, variables, monkeypatch, capsys)
    assert err.startswith(error), err


def test_an_option_a_setting_defaults_takes_its_variable_when_the_command_runs(tmp_path, monkeypatch):
    from service.cli.main import build_parser

    monkeypatch.setenv("LORASWAP_ADAPTERS_DIR", str(tmp_path))
    parser = build_parser()
    merge = ["merge", "--adapter", "a", "--out", "out"]
    assert parser.parse_args(merge).adapters_dir == tmp_path
    assert parser.parse_args([*merge, "--adapters-dir", "x"]).adapters_dir == Path("x")
    monkeypatch.setenv("LORASWAP_ADAPTER_ROOTS", "[1]")  # invalid, and not the setting the default reads
    assert parser.parse_args(merge).adapters_dir == tmp_path


def test_pydantic_settings_own_error_names_the_variable_too():
    from pydantic_settings import SettingsError

    from service.cli.main import reason

    error = SettingsError('error parsing value for field "adapter_roots" from source "EnvSettingsSource"')
    assert reason(error, argparse.Namespace()) == ('error parsing value for LORASWAP_ADAPTER_ROOTS from source '
                                                   '"EnvSettingsSource"')


SECRET = "sk-SECRET-0123456789abcdef"


@pytest.mark.parametrize("argv,environment", [
    (["serve", "--admin-key", SECRET, "--api-key", SECRET], {}),
    (["serve"], {"LORASWAP_ADMIN_KEY": SECRET, "LORASWAP_API_KEY": SECRET}),
    (["serve", "--api-key", SECRET, "--max-batch", "0"], {}),
    (["serve"], {"LORASWAP_API_KEY": SECRET, "LORASWAP_MAX_BATCH": "abc"}),
])
def test_a_settings_error_never_echoes_what_was_given(argv, environment, monkeypatch, capsys):
    """The keys are secrets: an error names the setting and the problem, never a value (pydantic's own message quoted
    them, its start and end)."""
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.startswith("loraswap") and error.count("\n") == 1, error
    assert "SECRET" not in error and "0123456789abcdef" not in error and "input_value" not in error


def test_distractors_that_make_an_example_longer_than_the_server_takes_are_a_usage_error(tiny_llama_dir, tmp_path,
                                                                                         monkeypatch, capsys):
    """Found only once the model tokenizes the contexts: a usage error naming the cause, not a traceback."""
    monkeypatch.setenv("LORASWAP_MAX_ANSWER_WINDOWS", "1")
    monkeypatch.setenv("LORASWAP_MAX_INPUT_TOKENS", "64")
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--task", "squad", "--adapter", "none", "--data", str(SQUAD_SAMPLE), "--distractors", "3",
              "--limit", "2", "--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path), "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "loraswap eval: error: an example is longer than the server takes (fewer --distractors than 3)" in err
    assert "Traceback" not in err


def test_bench_prompts_longer_than_the_models_positions_are_a_usage_error(tiny_llama_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--base-model", str(tiny_llama_dir), "--device", "cpu", "--prompt-tokens", "510",
              "--new-tokens", "3", "--batch-sizes", "1"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "--prompt-tokens 510 and --new-tokens 3 need more positions than the base model's 512" in error


def test_bench_refuses_more_registered_adapters_than_the_host_holds_before_the_base_loads(tiny_llama_dir, capsys):
    """A review: ``--registered`` had no bound; a count whose adapters no host could hold was taken, to fail only at
    the memory check, after every mode was timed. The tiny Llama's (hidden size 64, 2 layers) are 8192 bytes each at
    least (rank 8, float32). Prompts too long for the base, found once it loads, come second."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--base-model", str(tiny_llama_dir), "--device", "cpu", "--registered", HALF, "--prompt-tokens",
              "510", "--new-tokens", "3", "--batch-sizes", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Loading weights" not in err, err
    assert err.startswith(f"loraswap bench: error: --registered {HALF} needs at least {HALF} x 8192 bytes (--rank 8 x "
                          "2 x 64 x 2 layers x 4 bytes) of host memory, more than the "), err
    assert err.endswith("container's memory limit where less); lower it\n") and err.count("\n") == 1, err


def test_ctrl_c_ends_a_command_with_one_line_and_status_130(monkeypatch, capsys):
    """Ctrl-C during `loraswap eval` printed a traceback ending in KeyboardInterrupt."""
    import training.evaluate

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.evaluate, "run", interrupted)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--task", "squad", "--adapter", "none"])
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "loraswap eval: interrupted\n"


@pytest.mark.parametrize("strategy,recorded", [("top_k", {"temperature", "top_k"}),
                                               ("nucleus", {"temperature", "top_p"}),
                                               ("temperature", {"temperature"}), ("greedy", set())])
def test_an_eval_report_records_the_sampling_parameters_its_strategy_read(strategy, recorded):
    """A top_k run's report also held top_p 0.9, which it never read."""
    from training.evaluate import eval_report
    from training.options import sampling_options

    args = argparse.Namespace(task="squad", adapter="none", data=None, prompt_style="adapter", strategy=strategy,
                              limit=None, extractive=True, distractors=0, seed=None, top_k=None, top_p=None,
                              temperature=None)
    sampling_options(args)
    report = eval_report(args, None, {}, {})  # the bare base
    assert {"temperature", "top_k", "top_p"} & set(report) == recorded
    assert report.get("seed") == (0 if recorded else None)  # a sampling strategy's seed, 0 when none is given


def test_an_eval_seed_given_to_a_sampling_strategy_is_the_one_it_samples_with():
    from training.options import sampling_options

    args = build_parser().parse_args(["eval", "--task", "squad", "--adapter", "none", "--strategy", "top_k",
                                      "--seed", "5"])
    sampling_options(args)
    assert args.seed == 5


def test_an_eval_report_records_the_engine_settings_it_ran_with(tiny_llama_dir, tmp_path, monkeypatch):
    """A review: eval takes every serving setting it does not set from its variable (LORASWAP_MAX_INPUT_TOKENS and
    LORASWAP_DRAFT_TOKENS can change its results), and its report recorded none: it records them now, those the
    engine gave its device's defaults as it resolved them, and never a key."""
    monkeypatch.setenv("LORASWAP_MAX_INPUT_TOKENS", "200")
    monkeypatch.setenv("LORASWAP_PREFIX_BLOCK_TOKENS", "8")
    monkeypatch.setenv("LORASWAP_ADMIN_KEY", "admin-secret")
    report = tmp_path / "report.json"
    main(["eval", "--task", "nli", "--adapter", "none", "--data", str(NLI_SAMPLE), "--limit", "3", "--base-model",
          str(tiny_llama_dir), "--adapters-dir", str(tmp_path), "--device", "cpu", "--max-batch", "5", "--json",
          str(report)])
    engine = json.loads(report.read_text())["engine"]
    assert engine["max_input_tokens"] == 200 and engine["prefix_block_tokens"] == 8  # from the variables
    assert engine["max_batch"] == 5 and engine["base_model"] == str(tiny_llama_dir)  # from the options
    assert engine["device"] == "cpu" and engine["dtype"] == "float32"
    assert engine["draft_tokens"] == CPU_DRAFT_TOKENS and engine["prefill_chunk"] == CPU_PREFILL_CHUNK  # unset
    assert not {"admin_key", "api_key", "host", "port"} & set(engine) and "admin-secret" not in report.read_text()


@pytest.mark.parametrize("argv,message", [
    (["serve", "--max-batch", "x"], "loraswap serve: error: argument --max-batch: invalid int value: 'x'"),
    (["serve", "--no-such-flag"], "loraswap serve: error: unrecognized arguments: --no-such-flag (see loraswap serve "
     "--help)"),
    (["--no-such-flag", "serve"], "loraswap: error: unrecognized arguments: --no-such-flag (see loraswap --help)"),
    (["eval", "--task", "nope"], "loraswap eval: error: argument --task: invalid choice: 'nope'"),
    (["nope"], "loraswap: error: argument command: invalid choice: 'nope'"),
    ([], "loraswap: error: the following arguments are required: command (see loraswap --help)"),
])
def test_a_malformed_command_line_is_one_line_that_points_to_help(argv, message, capsys):
    """argparse printed its usage block first: 28 lines for serve, the error at their end."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(message) and err.count("\n") == 1
    assert err.endswith("--help)\n")


REQUIRED = {  # each command with the options it requires (argparse reports a missing one first)
    "serve": [], "bench": [], "calibrate": ["--adapter", "x"], "eval": ["--task", "squad", "--adapter", "squad"],
    "loadtest": LOADTEST[1:], "merge": ["--adapter", "squad", "--out", "new"], "scale": ["--replicas", "1"],
    "side-by-side": SIDE_BY_SIDE[1:], "sweep": ["--task", "squad", "--out", "out"],
    "train": ["--task", "squad", "--out", "new"],
}


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_an_unknown_argument_of_a_command_is_its_own_usage_error(command, tmp_path, monkeypatch, capsys):
    """A review: ``loraswap bench --max-batch -3`` said 'loraswap: error: unrecognized arguments: --max-batch -3 (see
    loraswap --help)', where every other usage error names its command and its --help."""
    assert set(REQUIRED) == set(commands()) | {"serve"}, "a command without its row"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main([command, *REQUIRED[command], "--no-such-option", "-3"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"loraswap {command}: error: unrecognized arguments: --no-such-option -3 (see "
                                       f"loraswap {command} --help)\n")

@pytest.mark.parametrize("command", [["serve"], ["scale", "--replicas", "1", "--device", "cpu"]])
def test_serve_and_scale_refuse_an_lru_cache_capacity_that_crashes_onednn(command, tiny_llama_dir, monkeypatch,
                                                                          capsys):
    """LRU_CACHE_CAPACITY=0 would kill the server with a segmentation fault at its first forward pass: refused before
    anything loads. Without oneDNN it is not read. A review: scale did not check it, and its replicas, on the Ray it
    starts here with this environment, failed with a traceback each."""
    if command[0] == "scale":
        pytest.importorskip("ray.serve", reason='needs Ray Serve: pip install -e ".[scale]"')
        from service.scale import app

        monkeypatch.setattr(app, "serve_scaled", lambda *args: pytest.fail("Ray started"))
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "0")
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--base-model", str(tiny_llama_dir)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"loraswap {command[0]}: error: LRU_CACHE_CAPACITY='0' reads as 0"), err
    assert err.endswith("turn oneDNN off (--no-onednn, LORASWAP_ONEDNN=false)\n"), err
    check_onednn(Settings(onednn=False))


@pytest.mark.parametrize("command", [
    ["eval", "--task", "nli", "--adapter", "none", "--limit", "3"],
    ["bench", "--device", "cpu", "--batch-sizes", "1", "--modes", "base", "--hot-loads", "0", "--registered", "0"],
    ["train", "--task", "nli", "--max-steps", "1"],
])
def test_every_command_that_loads_the_base_refuses_an_lru_cache_capacity_that_crashes_onednn(
        command, tiny_llama_dir, tmp_path, monkeypatch, capsys, caplog):
    """Refused in one line before the base loads, with no traceback logged; they loaded it and got a ValueError's
    traceback (the server alone checked)."""
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "0")
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--base-model", str(tiny_llama_dir), *(["--out", str(tmp_path)] * (command[0] == "train"))])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith(f"loraswap {command[0]}: error: LRU_CACHE_CAPACITY='0' reads as 0") and err.count("\n") == 1
    # a review: the hint named --no-onednn, which these commands do not take
    assert err.endswith("turn oneDNN off (LORASWAP_ONEDNN=false)\n"), err
    assert "Loading weights" not in err
    assert not [record for record in caplog.records if record.exc_info and record.levelno >= logging.INFO]


def test_load_test_clients_do_not_log_every_request(monkeypatch, capsys):
    """httpx logs each request at INFO: hundreds of lines in a side-by-side run, hiding its own. (The root logger
    is set to INFO here as ``main`` sets it outside pytest, whose own handlers make ``basicConfig`` do nothing.)"""
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)
    monkeypatch.setattr(logging.getLogger("httpx"), "level", logging.NOTSET)
    with pytest.raises(SystemExit):
        main(["side-by-side", "--system", "a=loraswap@http://127.0.0.1:9"])  # one system: refused at once
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    assert logging.getLogger("service").isEnabledFor(logging.INFO)


@pytest.mark.parametrize("argv,module,extra", [
    (["loadtest", "--scenario", "single", "--users", "1", "--duration", "10", "--host", "http://127.0.0.1:9",
      "--adapter-root", "x", "--json", "x.json"], "locust", "loadtest"),
    (["loadtest", "--scenario", "single", "--users", "1", "--duration", "10", "--host", "http://127.0.0.1:9",
      "--adapter-root", "x", "--json", "x.json"], "gevent", "loadtest"),
    (["scale", "--replicas", "2"], "ray", "scale"),
])
def test_a_command_whose_optional_dependencies_are_missing_says_how_to_install_them(argv, module, extra, monkeypatch,
                                                                                    capsys):
    """A review: ``loraswap loadtest`` without locust ended in a ModuleNotFoundError traceback. (A None in sys.modules
    is what importlib reads as a module not installed.)"""
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f'loraswap {argv[0]}: error: needs {module}, of the optional dependencies '
                                       f'"{extra}": pip install -c requirements/lock.txt -e ".[{extra}]"\n')


def test_two_reports_in_one_file_through_a_link_are_a_usage_error_and_devices_take_both(tmp_path, capsys):
    for name in ("report", "linked"):
        (tmp_path / name).write_text("old")
    os.link(tmp_path / "linked", tmp_path / "hard")  # a file of two names is refused as such (output_file)
    os.symlink(tmp_path / "report", tmp_path / "soft")
    for report, other, message in [("linked", "hard", f"argument --json: {tmp_path / 'linked'} is a hard link"),
                                   ("report", "soft", "--diagram and --json name one file")]:
        with pytest.raises(SystemExit) as exit_:
            main(["calibrate", "--adapter", "nli", "--json", str(tmp_path / report), "--diagram",
                  str(tmp_path / other)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # past the check: the adapter is what is wrong
        main(["calibrate", "--adapter", "nope", "--adapters-dir", str(tmp_path), "--json", "/dev/null", "--diagram",
              "/dev/null"])
    assert "name one file" not in capsys.readouterr().err


@pytest.mark.parametrize("command", [["merge", "--adapter", "squad"], ["train", "--task", "nli"]])
def test_an_out_folder_that_is_a_symlink_to_nothing_is_a_usage_error(command, tmp_path, capsys):
    """A review: it passed the parse and ended in FileExistsError once the work was done."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--out", str(link)])
    assert exit_.value.code == 2 and f"argument --out: {link} is a symlink to nothing" in capsys.readouterr().err


REPORTS_OVER_INPUTS = {  # a command line (paths from the fixture's folder), the file it would write over, the refusal
    "eval_data_as_json": (["eval", "--task", "nli", "--adapter", "none", "--data", "{mnli}", "--json", "{mnli}"],
                          "{mnli}", "loraswap eval: error: --json {mnli} is the file --data names, which the command "
                          "reads: the report would be written over it"),
    "eval_predictions_through_a_symlink": (["eval", "--task", "nli", "--adapter", "none", "--data", "{mnli}",
                                            "--predictions", "{to_data}"], "{mnli}",
                                           "--predictions {to_data} is the file --data names"),
    # a hard link is refused as such (output_file), whatever its other names are
    "eval_json_through_a_hard_link": (["eval", "--task", "nli", "--adapter", "none", "--data", "{mnli}", "--json",
                                       "{hard}"], "{mnli}", "argument --json: {hard} is a hard link, a file of 2 "
                                      "names"),
    "eval_json_over_the_default_data": (["eval", "--task", "nli", "--adapter", "none", "--json", "{to_data}"],
                                        "{mnli}", "loraswap eval: error: --json {to_data} is the nli dev set, which "
                                        "the command reads"),
    "eval_json_through_a_symlink_into_an_adapter": (
        ["eval", "--task", "nli", "--adapter", "none", "--json", "{to_card}"], "{card}",
        "loraswap eval: error: argument --json: {to_card} leads to {card}, in an adapter folder (it holds "
        "adapter_config.json): a report would write over or beside the adapter's own files"),
    "calibrate_diagram_through_a_symlink_into_an_adapter": (
        ["calibrate", "--adapter", "{adapter}", "--diagram", "{to_card}"], "{card}",
        "argument --diagram: {to_card} leads to {card}, in an adapter folder"),
    "side_by_side_markdown_over_its_data": (
        ["side-by-side", "--system", "a=loraswap@http://127.0.0.1:9", "--system", "b=loraswap@http://127.0.0.1:9",
         "--data", "{data}", "--markdown", "{to_data}"], "{mnli}",
        "loraswap side-by-side: error: --markdown {to_data} is a file of --data, {mnli}, which the command reads"),
    "loadtest_json_over_its_default_questions": (
        ["loadtest", "--scenario", "single", "--users", "1", "--duration", "10", "--host", "http://127.0.0.1:9",
         "--adapter-root", "{tmp}", "--json", "{squad}"], "{squad}",
        "loraswap loadtest: error: --json {squad} is the SQuAD file it asks from, which the command reads"),
    "bench_json_over_the_bases_config": (
        ["bench", "--base-model", "{base}", "--json", "{base}/config.json", "--device", "cpu", "--batch-sizes", "1",
         "--modes", "base", "--prompt-tokens", "4", "--new-tokens", "1", "--rounds", "1", "--hot-loads", "0",
         "--registered", "0"], "{base}/config.json",
        "loraswap bench: error: --json {base}/config.json lies in the model folder --base-model names, {base}, which "
        "the command reads"),
}


@pytest.mark.parametrize("case", sorted(REPORTS_OVER_INPUTS))
def test_a_report_is_never_written_over_what_the_command_reads(case, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """A review: ``eval --data X --json X`` (or --predictions X) replaced the data with the report, and a --json that
    is a symlink into an adapter folder replaced the adapter's card.json (the folder check looked at the link's
    folder). Each is one usage line before any work, the file left as it was."""
    data = tmp_path / "data"
    (data / "nli").mkdir(parents=True)
    (data / "squad").mkdir()
    mnli, squad = data / "nli" / "mnli.jsonl.gz", data / "squad" / "dev-v1.1.json.gz"
    shutil.copy(NLI_SAMPLE, mnli)
    shutil.copy(SQUAD_SAMPLE, squad)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "card.json").write_text('{"name": "adapter"}')
    (tmp_path / "to_data").symlink_to(mnli)
    (tmp_path / "to_card.json").symlink_to(adapter / "card.json")
    if "hard_link" in case:  # a second name of the data file, only here: a report of two names is refused as such
        os.link(mnli, tmp_path / "hard")
    base = shutil.copytree(tiny_llama_dir, tmp_path / "base")
    monkeypatch.setenv("LORASWAP_DATA_DIR", str(data))
    monkeypatch.setenv("LORASWAP_ADMIN_KEY", "admin")
    names = {"mnli": mnli, "squad": squad, "data": data, "adapter": adapter, "card": adapter / "card.json",
             "to_data": tmp_path / "to_data", "to_card": tmp_path / "to_card.json", "hard": tmp_path / "hard",
             "base": base, "tmp": tmp_path}
    argv, protected, message = REPORTS_OVER_INPUTS[case]
    argv = [arg.format(**names) for arg in argv]
    if argv[0] == "eval":
        argv += ["--base-model", str(base), "--adapters-dir", str(tmp_path), "--device", "cpu", "--limit", "2"]
    protected = Path(protected.format(**names))
    before = protected.read_bytes()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert message.format(**names) in err
    assert protected.read_bytes() == before


def test_a_report_that_is_a_symlink_loop_or_into_no_folder_is_refused_before_the_work(tmp_path, capsys):
    """Found only when the report was written, after the work (ELOOP, or no folder for the link's target)."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "nowhere.json").symlink_to(tmp_path / "gone" / "r.json")
    for name, message in [("loop", "is a symlink loop, not a file to write"),
                          ("nowhere.json", f"is a symlink to {tmp_path}/gone/r.json: there is no folder "
                           f"{tmp_path}/gone to write it in")]:
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "--json", str(tmp_path / name)])
        assert exit_.value.code == 2
        assert f"loraswap bench: error: argument --json: {tmp_path / name} {message}" in capsys.readouterr().err


@pytest.mark.parametrize("more,message", [
    (["--device", "cuda:99"], "--device: 'cuda:99' names GPU 99, and this machine has"),  # as serve says it
    (["--replicas", "4096", "--replica-gpus", "1"], "--replica-gpus 1 for 4096 replica(s) needs 4096 GPU(s), and this "
     "machine, where the Ray of loraswap scale starts, has"),
    (["--replicas", "4096", "--replica-gpus", "0.4"], "--replica-gpus 0.4 for 4096 replica(s) needs 2048 GPU(s)"),
    (["--replicas", "4096", "--replica-cpus", "0.5"], "--replica-cpus 0.5 for 4096 replica(s) needs 2048 CPUs, and "
     "this machine, where the Ray of loraswap scale starts, has"),
    (["--max-new-tokens", "500"], "--max-new-tokens 500 leaves 12 of the base model's 512 positions for a prompt, "
     "fewer than 16: lower it"),
    (["--base-model", "/nonexistent"], "--base-model /nonexistent: no Hugging Face model directory there"),
    # a review: Ray Serve's max_ongoing_requests is 32-bit; the deployment was refused once Ray had started
    (["--replicas", "2", "--max-queue", str(2**30)], f"--max-batch 32 + --max-queue {2**30}, for each of 2 "
     f"replica(s) (--replicas), is {2 * (2**30 + 32)} requests at once for the router, past the 2147483647 Ray Serve "
     "takes (max_ongoing_requests, a 32-bit integer): lower --max-queue"),
    # a review: Ray started, its HTTP proxy on a port in use
    (["--port", "{listening}"], "--port {listening}: cannot listen on port {listening} of 127.0.0.1: Address already "
     "in use"),
    (["--address", "nonsense"], "--address nonsense: must be HOST:PORT (or ray://HOST:PORT) or auto"),
    (["--address", "[::1"], "--address [::1: must be HOST:PORT"),  # a review: urlsplit's ValueError
    # a review: an http:// URL was taken as a head's address, 'Name or service not known' 8 s later
    (["--address", "http://x:1"], "--address http://x:1: must be HOST:PORT"),
    (["--address", "x..y:1"], "--address x..y:1: must be HOST:PORT"),
    (["--address", "127.0.0.1:{closed}"], "--address 127.0.0.1:{closed}: no Ray cluster answers there (Connection "
     "refused)"),
    (["--address", "127.0.0.1:{listening}"], "--address 127.0.0.1:{listening}: no Ray cluster answers there (it "
     "accepts a connection, but no gRPC one within 5 s, as a Ray head does)"),
], ids=["device", "gpus", "gpu-shares", "cpus", "max-new-tokens", "base-model", "ongoing", "port", "address-form",
        "address-ipv6", "address-url", "address-label", "address-closed", "address-not-ray"])
def test_scale_refuses_what_no_replica_could_start_with_before_ray_starts(more, message, tiny_llama_dir, monkeypatch,
                                                                           capsys):
    """A review: where serve says one line, scale started Ray and its replicas failed (40 s of replica tracebacks for
    --device cuda on no GPU, 411 log lines for --max-new-tokens too large), or Ray waited without end (--replica-gpus
    on no GPU) or over a minute (an address where no cluster answers), or for minutes (an address that accepts TCP
    connections and is no Ray head). Now serve's checks (and a GPU count, a connection to the address and a gRPC
    channel) before Ray starts."""
    pytest.importorskip("ray.serve", reason='needs Ray Serve: pip install -e ".[scale]"')
    from service.scale import app

    monkeypatch.setattr(app, "serve_scaled", lambda *args: pytest.fail("Ray started"))
    with socket.socket() as sock:  # a port nothing listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        closed = str(sock.getsockname()[1])
    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts connections (the kernel's backlog), says nothing
        ports = {"closed": closed, "listening": str(server.getsockname()[1])}
        argv = ["scale", "--replicas", "1", "--base-model", str(tiny_llama_dir), "--device", "cpu"]
        with pytest.raises(SystemExit) as exit_:
            main([*argv, *(option.format(**ports) for option in more)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith(f"loraswap scale: error: {message.format(**ports)}") and err.count("\n") == 1, err


@pytest.mark.parametrize("listed", [None, ("ray.rpc.NodeManagerService",)], ids=["no-reflection", "raylet-like"])
def test_scale_refuses_a_grpc_server_that_is_no_ray_head_before_ray_starts(listed, tiny_llama_dir, monkeypatch,
                                                                          capsys):
    """A review: a gRPC server that is no Ray head (a raylet's port, whose reflection lists its own services; any
    other) opened the gRPC channel the check waited for, and ray.init then waited long. Its server reflection lists
    no GCS service: a usage error saying so."""
    pytest.importorskip("ray.serve", reason='needs Ray Serve: pip install -e ".[scale]"')
    import grpc
    from grpc_reflection.v1alpha import reflection

    from service.scale import app

    monkeypatch.setattr(app, "serve_scaled", lambda *args: pytest.fail("Ray started"))
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    if listed is not None:
        reflection.enable_server_reflection([*listed, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["scale", "--replicas", "1", "--base-model", str(tiny_llama_dir), "--device", "cpu", "--address",
                  f"127.0.0.1:{port}"])
    finally:
        server.stop(None)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"loraswap scale: error: --address 127.0.0.1:{port}: no Ray cluster answers there (it "
                          "answers gRPC, but its server reflection lists no ray.rpc.NodeInfoGcsService, as a Ray "
                          "head's GCS does: a raylet's port, or another server)"), err


def test_scale_with_no_cluster_at_the_address_is_a_usage_error(tiny_llama_dir, monkeypatch, capsys):
    """A review: --address auto where no cluster runs ended in ray.init's ConnectionError traceback."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")

    def no_cluster(**options):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(SystemExit) as exit_:
        main(["scale", "--replicas", "1", "--base-model", str(tiny_llama_dir), "--device", "cpu", "--address", "auto"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("loraswap scale: error: --address auto: Could not find any running Ray "
                                       "instance.\n")


@pytest.mark.parametrize("argv, files, option", [
    (["train", "--task", "nli", "--out", "x"], "nli/snli_test.jsonl.gz", "--data-dir"),
    (["sweep", "--task", "nli", "--out", "x", "--ranks", "4", "--lrs", "1e-3"], "nli/snli_test.jsonl.gz",
     "--data-dir"),
    (["eval", "--task", "nli", "--adapter", "none"], "nli/mnli.jsonl.gz", "--data"),
    (["calibrate", "--adapter", "nli"], "nli/", "--data-dir"),
    (SIDE_BY_SIDE, "squad/dev-v1.1.json.gz", "--data"),
])
@pytest.mark.parametrize("variable", [False, True])
def test_missing_default_data_names_the_option_and_the_variable_to_set(argv, files, option, variable, tmp_path,
                                                                       monkeypatch, capsys):
    """A review: with no data option given and the default data folder absent, the error named the path alone, not
    what sets it: LORASWAP_DATA_DIR where it does, else the command's data option or the variable."""
    import training.data

    folder = tmp_path / "no_data"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(training.data, "DEFAULT_DATA_DIR", folder)
    if variable:
        monkeypatch.setenv("LORASWAP_DATA_DIR", str(folder))
    else:
        monkeypatch.delenv("LORASWAP_DATA_DIR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    line = err.splitlines()[-1]
    where = f"LORASWAP_DATA_DIR {folder}" if variable else f"the default data folder {folder}"
    hint = f" (or give {option})" if variable else f": give {option} or set LORASWAP_DATA_DIR"
    assert exit_.value.code == 2 and line.startswith(f"loraswap {argv[0]}: error: {where}: No such file or "
                                                     f"directory: {folder / files}"), err
    assert line.endswith(hint), err


@pytest.mark.parametrize("command", [["calibrate", "--adapter", "{adapter}"],
                                     ["eval", "--task", "nli", "--adapter", "none"], ["bench"]])
@pytest.mark.parametrize("through", ["hard", "soft_to_hard"])
def test_a_report_through_a_hard_link_to_an_adapters_card_is_refused(command, through, tmp_path, capsys):
    """A review: ``calibrate --json x.json``, x.json a hard link to an adapter's card.json from outside the adapter's
    folder, replaced the card: the folder checks look at the name given (and a symlink's target), not at the file's
    other names. Any report option that names a file of more than one name is refused before the work."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    card = adapter / "card.json"
    card.write_text('{"name": "adapter"}')
    os.link(card, tmp_path / "hard.json")
    (tmp_path / "soft_to_hard.json").symlink_to(tmp_path / "hard.json")
    report = tmp_path / f"{through}.json"
    with pytest.raises(SystemExit) as exit_:
        main([arg.format(adapter=adapter) for arg in command] + ["--json", str(report)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert f"error: argument --json: {report} is a hard link, a file of 2 names: a report written there would change " \
           "it under its other names too" in err
    assert card.read_text() == '{"name": "adapter"}'


def test_loadtest_without_its_default_data_names_the_options_and_the_variable(tmp_path):
    """As train's: loadtest read its default questions, absent, with OSError's line naming no option (run in a process
    of its own: locust's gevent patches this one's ssl)."""
    if importlib.util.find_spec("locust") is None:  # not imported here: its gevent patches this process's ssl
        pytest.skip('needs locust: pip install -e ".[loadtest]"')
    folder = tmp_path / "no_data"
    env = {**os.environ, "LORASWAP_DATA_DIR": str(folder), "LORASWAP_ADMIN_KEY": "admin", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "service.cli.entry", *LOADTEST], env=env,  # run from this checkout
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"loraswap loadtest: error: LORASWAP_DATA_DIR {folder}: No such file or directory: "
        f"{folder / 'squad' / 'dev-v1.1.json.gz'} (or give --squad or --nli)"), done.stderr


def test_scale_routing_and_the_locustfile_without_their_data_name_the_variable(tmp_path):
    """A review: both read the data folder's files, absent, with FileNotFoundError's traceback naming no variable,
    scale_routing once its first ``loraswap scale`` had started. Now LORASWAP_DATA_DIR is named, by scale_routing in a
    usage error before any scale starts (one with its --base-model, absent, would end at once, as here on the old
    code). In processes of their own: locust's gevent patches this one's ssl."""
    if importlib.util.find_spec("locust") is None:  # not imported here: its gevent patches this process's ssl
        pytest.skip('needs locust: pip install -e ".[loadtest]"')
    folder = tmp_path / "no_data"
    env = {**os.environ, "LORASWAP_DATA_DIR": str(folder), "CUDA_VISIBLE_DEVICES": ""}
    absent = f"LORASWAP_DATA_DIR {folder}: No such file or directory: {folder / 'squad' / 'dev-v1.1.json.gz'}"
    routing = subprocess.run([sys.executable, "-m", "loadtest.scale_routing", "--json", str(tmp_path / "r.json"),
                              "--base-model", str(tmp_path / "no_model"), "--port", "8402"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert routing.returncode == 2 and routing.stderr.splitlines()[-1].endswith(f": error: {absent}"), routing.stderr
    rows = subprocess.run([sys.executable, "-c", "from loadtest.locustfile import squad_rows; squad_rows()"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert rows.stderr.splitlines()[-1] == f"service.cli.command.UsageError: {absent}", rows.stderr


def test_the_naming_a_command_gives_its_runtime_pickles_with_the_names_found_where_it_ran(monkeypatch):
    """A review: scale's replicas named settings by their fields in their log (max_new_tokens, qa_adapter). Ray sends
    the naming to each replica, so it pickles, and keeps the names found where the command ran (its options and
    environment), not a replica's."""
    import pickle

    from service.cli.command import naming

    monkeypatch.setenv("LORASWAP_MAX_QUEUE", "7")
    named = pickle.dumps(naming(build_parser().parse_args(["scale", "--replicas", "1", "--max-batch", "3"])))
    monkeypatch.delenv("LORASWAP_MAX_QUEUE")
    assert pickle.loads(named)("max_batch 3 + max_queue 7; max_input_tokens 1024 of adapters_dir/x.max_rank") == (
        "--max-batch 3 + LORASWAP_MAX_QUEUE 7; --max-input-tokens 1024 of adapters_dir/x.max_rank")


# a mistyped variable, one loraswap never read, and a setting's spelt in lower or mixed case (pydantic-settings read
# every spelling: the last failed serve as "--max-batch: Input should be a valid integer", a flag never given)
STRAY_VARIABLES = {"LORASWAP_MAX_BATHC": "4", "LORASWAP_APIKEY": "zz", "loraswap_max_batch": "abc",
                   "Loraswap_Max_New_Tokens": "9000"}
STRAY_WARNINGS = [
    "LORASWAP_APIKEY is no variable loraswap reads, and is ignored: did you mean LORASWAP_API_KEY?",
    "LORASWAP_MAX_BATHC is no variable loraswap reads, and is ignored: did you mean LORASWAP_MAX_BATCH?",
    "Loraswap_Max_New_Tokens is no variable loraswap reads, and is ignored: variables are read by their upper-case "
    "names; set LORASWAP_MAX_NEW_TOKENS",
    "loraswap_max_batch is no variable loraswap reads, and is ignored: variables are read by their upper-case names; "
    "set LORASWAP_MAX_BATCH"]


@pytest.mark.parametrize("argv,error", [
    (["serve", "--base-model", "/nonexistent/model"], "loraswap serve: error: --base-model /nonexistent/model"),
    (["eval", "--task", "nli", "--adapter", "none", "--data", str(NLI_SAMPLE), "--base-model", "/nonexistent/model",
      "--device", "cpu"], "loraswap eval: error: --base-model /nonexistent/model"),
    (["train", "--task", "nli", "--out", "x", "--data-dir", "/nonexistent"], "loraswap train: error: --data-dir"),
    (["merge", "--adapter", "missing", "--out", "x"], "loraswap merge: error: --adapter missing"),
    (LOADTEST, "loraswap loadtest: error: set LORASWAP_ADMIN_KEY"),
    (["side-by-side", "--system", "a=loraswap@http://h:1"], "loraswap side-by-side: error: need at least two"),
])
def test_every_command_warns_once_of_a_variable_it_does_not_read(argv, error, monkeypatch, capsys, caplog):
    """A review: ``LORASWAP_MAX_BATHC=4 LORASWAP_APIKEY=zz loraswap serve`` started without a word (the API key unset
    left the model's routes open). Each is warned of once, naming the nearest variable, and ignored."""
    for name, value in STRAY_VARIABLES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LORASWAP_ADMIN_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith(error)
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING
            and record.getMessage().startswith(tuple(STRAY_VARIABLES))] == STRAY_WARNINGS


def test_serve_warns_once_across_its_restart(tmp_path):
    """serve starts again without malloc's tcache: the warning is said by the process that runs the command, once."""
    env = {**os.environ, **STRAY_VARIABLES, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "service.cli.entry", "serve", "--base-model", "/nonexistent/model"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--base-model /nonexistent/model" in done.stderr
    assert [line.split(": ", 1)[1] for line in done.stderr.splitlines() if " WARNING " in line] == STRAY_WARNINGS


def test_the_variables_loraswap_reads_are_not_warned_of(monkeypatch):
    """Each setting's variable and each other one loraswap reads (the data folder's, loadtest's adapters', scale's
    ``WITHOUT_BITSANDBYTES``) are known; variables of other programs are none of loraswap's concern."""
    from service.settings import OTHER_VARIABLES, unknown_variables

    environ = {variable_of(name): "x" for name in Settings.model_fields} | dict.fromkeys(OTHER_VARIABLES, "x")
    assert unknown_variables({**environ, "VLLM_PORT": "1", "HOME": "/root"}) == []
    assert set(OTHER_VARIABLES) == {"LORASWAP_DATA_DIR", "LORASWAP_LOADTEST_ADAPTERS", "LORASWAP_WITHOUT_BITSANDBYTES"}


def test_a_setting_is_read_from_its_upper_case_variable_only(monkeypatch):
    monkeypatch.setenv("Loraswap_Max_New_Tokens", "9000")
    monkeypatch.setenv("loraswap_max_batch", "abc")
    assert (Settings().max_new_tokens, Settings().max_batch) == (64, 32)
    monkeypatch.setenv("LORASWAP_MAX_NEW_TOKENS", "9")
    assert Settings().max_new_tokens == 9


@pytest.mark.parametrize(("name", "hint"), [
    ("LORASWAP_MAX_NEW_TOKEN", ": did you mean LORASWAP_MAX_NEW_TOKENS?"),
    ("LORASWAP_ADMINKEY", ": did you mean LORASWAP_ADMIN_KEY?"),
    # a review: the prefix all share made each of these near LORASWAP_PORT, LORASWAP_DEVICE, LORASWAP_DRAFT_TOKENS
    *((name, "") for name in ("LORASWAP_GPU", "LORASWAP_FOO", "LORASWAP_X", "LORASWAP_", "LORASWAP_LOG_LEVEL",
                              "LORASWAP_TOKEN")),
])
def test_a_variable_not_read_is_said_near_a_known_one_only_by_the_part_after_the_prefix(name, hint):
    from service.settings import unknown_variables

    assert unknown_variables({name: "1"}) == [f"{name} is no variable loraswap reads, and is ignored{hint}"]

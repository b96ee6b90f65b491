"""The README's first command installs loraswap without extras: every `loraswap` command must start from that install.
Simulated here by making the modules of every installed distribution outside the core dependencies' closure
unimportable (those of the extras: pytest, locust, ray, openai, ...), then running `loraswap --help` and each
command's `--help` in a fresh interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
OWN_PACKAGES = {"service", "training", "loadtest"}

BLOCKING_RUN = """
import importlib.abc, json, os, sys

class Blocked(importlib.abc.MetaPathFinder):
    names = set(json.loads(os.environ["BLOCKED_MODULES"]))

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (not in a core install)", name=fullname)
        return None

sys.meta_path.insert(0, Blocked())
from service.cli.main import commands, main

for argv in [["--help"], *([name, "--help"] for name in ["serve", *commands()])]:
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
print("every command started")
"""


def core_closure() -> set[str]:
    """The canonical names of the distributions a core install of loraswap (no extras) holds: its dependencies and
    theirs, each with the extras it is asked for."""
    core = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    todo, seen = [(Requirement(text), "") for text in core], set()
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        for wanted in ("", *requirement.extras):
            if (name, wanted) not in seen:
                seen.add((name, wanted))
                todo += [(Requirement(text), wanted) for text in requires(name)]
    return {name for name, _ in seen}


def requires(name: str) -> list[str]:
    """The requirements of the installed distribution ``name`` ([] when it is not installed)."""
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []


def outside_modules(closure: set[str]) -> set[str]:
    """Top-level modules whose every distribution lies outside ``closure`` (loraswap's own left out)."""
    owners = metadata.packages_distributions()
    return {module for module, dists in owners.items()
            if module.isidentifier() and not module.startswith("_") and module not in OWN_PACKAGES
            and all(canonicalize_name(dist) not in closure for dist in dists)}


def test_every_command_starts_from_an_install_without_extras():
    blocked = outside_modules(core_closure())
    assert {"pytest", "locust", "openai"} <= blocked  # the extras' modules are what is blocked
    run = subprocess.run([sys.executable, "-c", BLOCKING_RUN], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "BLOCKED_MODULES": json.dumps(sorted(blocked)), "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0 and "every command started" in run.stdout, run.stderr[-3000:]

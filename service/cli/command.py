"""What a ``loraswap`` subcommand is, and the argument types the commands share. Light: the parser is built
without torch, so that ``--help`` and usage errors answer at once."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand of ``loraswap``, declared by its package in the ``loraswap.commands`` entry-point group of
    ``pyproject.toml`` (the entry point's name is the subcommand's). ``add_arguments`` must stay light; ``run``
    imports what the command needs when it is called. ``run`` raises AdapterError, FileNotFoundError or pydantic's
    ValidationError for what the user asked that cannot be done (a usage error, exit status 2)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


def positive(kind: type = int):
    """An argparse type: a number of ``kind`` above zero (a clear usage error otherwise, not a failure later)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"  # argparse names the type in its error message
    return parse

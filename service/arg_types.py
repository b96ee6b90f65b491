"""Argument types that every ``loraswap`` command shares (light: the parser is built without torch)."""
from __future__ import annotations

import argparse


def positive(kind: type = int):
    """An argparse type: a number of ``kind`` above zero (a clear usage error otherwise, not a failure later)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"  # argparse names the type in its error message
    return parse

"""The options of ``loraswap serve`` (and ``loraswap scale``): one flag per Settings field, and the Settings they
give. Light (pydantic only), as the parser is built without torch."""
from __future__ import annotations

import argparse
import typing
from pathlib import Path

from service.cli.command import flag
from service.settings import Settings


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field (``--base-model`` for ``base_model``); unset flags leave env/defaults, which the
    parser's description says (serve's and scale's ``--help``)."""
    prefix = Settings.model_config["env_prefix"]
    before = (parser.description or "").rstrip()  # a sentence of its own (a review: scale's "adapter A flag")
    before += "." if before and not before.endswith(".") else ""
    parser.description = (f"{before} A flag not given comes from its environment variable "
                          f"({prefix}MAX_BATCH for --max-batch), else the default shown.").lstrip()
    for name, field in Settings.model_fields.items():
        kind = field.annotation
        help_text = field.description or name.replace("_", " ")
        options: dict = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            options["choices"] = list(args)
        elif typing.get_origin(kind) is list:
            options.update(nargs="*", type=Path)
        else:
            base = args[0] if args else kind
            options["type"] = base if base in (int, float, Path) else str
        options["help"] += f" (default: {field.get_default(call_default_factory=True)})"
        parser.add_argument(flag(name), **options)
    parser.set_defaults(setting_options=tuple(Settings.model_fields))  # given_as names them by flag


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment with the flags given on the command line on top."""
    overrides = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**overrides)

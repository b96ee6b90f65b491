"""The ``loraswap`` command: serve, train, eval, sweep, merge, bench."""
from __future__ import annotations

import argparse
import importlib
import logging
import typing
from pathlib import Path

from pydantic import ValidationError

from service.adapter_files import AdapterError
from service.settings import Settings

# subcommand -> module exposing add_arguments(parser) and run(args)
COMMANDS = {
    "train": ("training.train", "train a LoRA adapter on SQuAD, NLI or RTE"),
    "eval": ("training.evaluate", "evaluate an adapter through the serving engine"),
    "sweep": ("training.sweep", "grid over rank, learning rate and target modules"),
    "merge": ("training.merge", "write a full model with one adapter merged in"),
    "bench": ("loadtest.bench", "throughput of the engine against transformers and peft"),
}


def positive(kind: type = int):
    """An argparse type: a number of ``kind`` above zero (a clear usage error otherwise, not a failure later)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"  # argparse names the type in its error message
    return parse


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field (``--base-model`` for ``base_model``); unset flags leave env/defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        options: dict = {"dest": name, "default": argparse.SUPPRESS, "help": field.description or name.replace("_", " ")}
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
        parser.add_argument(flag, **options)


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment with the flags given on the command line on top."""
    overrides = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraswap", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service", description="Run the HTTP service.")
    add_settings_arguments(serve)
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sub)
        sub.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            from service.server import serve

            serve(settings_from(args))
        else:
            importlib.import_module(args.module).run(args)
    except (AdapterError, FileNotFoundError, ValidationError) as exc:  # what the user asked for cannot be done
        parser.exit(2, f"loraswap {args.command}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

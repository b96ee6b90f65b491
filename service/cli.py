"""The ``loraswap`` command: serve, train, eval, sweep, merge, bench.

The parser is built from light modules (no torch, transformers or peft), so that ``--help`` and usage errors
answer at once; a command's own module, and with it torch, is imported only to run it.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import typing
from pathlib import Path

from pydantic import ValidationError

from service.errors import AdapterError
from service.settings import Settings

# subcommand -> (its options, "module:function" adding them to a parser; the module whose run(args) runs it; help)
COMMANDS = {
    "train": ("training.options:add_train_options", "training.train", "train a LoRA adapter on SQuAD, NLI or RTE"),
    "eval": ("training.options:add_eval_options", "training.evaluate",
             "evaluate an adapter through the serving engine"),
    "sweep": ("training.options:add_sweep_options", "training.sweep",
              "grid over rank, learning rate and target modules"),
    "merge": ("training.options:add_merge_options", "training.merge", "write a full model with one adapter merged in"),
    "bench": ("loadtest.options:add_bench_options", "loadtest.bench",
              "throughput of the engine against transformers and peft"),
}


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends each option with its default, except a required option's and a None default
    (whose help says in words what unset means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:  # argparse's hook for this formatter
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field (``--base-model`` for ``base_model``); unset flags leave env/defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
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
        parser.add_argument(flag, **options)


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment with the flags given on the command line on top."""
    overrides = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraswap", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prefix = Settings.model_config["env_prefix"]
    serve = commands.add_parser("serve", help="run the HTTP service", formatter_class=DefaultsHelp,
                                description=f"Run the HTTP service. A flag not given comes from its environment "
                                f"variable ({prefix}MAX_BATCH for --max-batch), else the default shown.")
    add_settings_arguments(serve)
    for name, (options, module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsHelp)
        options_module, function = options.split(":")
        getattr(importlib.import_module(options_module), function)(sub)
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

"""The ``loraswap`` command: ``serve``, and the subcommands packages declare (train, eval, sweep, merge, bench).

Subcommands other than ``serve`` are found through the ``loraswap.commands`` entry points
(``service.cli.command.Command``), so the service knows no other package. The parser is built from light modules
(no torch, transformers or peft), so that ``--help`` and usage errors answer at once; a command's own modules, and
with them torch, are imported only to run it.
"""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from importlib.metadata import entry_points
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.cli.command import (
    Command,
    UsageError,
    as_given,
    check_room_for_prompts,
    check_server_start,
    flag,
    given_as,
    naming,
    output_file,
    read_setting_defaults,
    regular_file,
    spare_inputs,
    take_port,
    take_stops,
)
from service.cli.entry import hold_stops
from service.cli.settings_options import add_settings_arguments, settings_from
from service.errors import AdapterError, TemplateRefused, UnsafeEnvironment
from service.model import malloc, server_process
from service.settings import Settings, unknown_variables, variable

COMMAND_GROUP = "loraswap.commands"  # the entry-point group of subcommands (pyproject.toml)
logger = logging.getLogger(__name__)


def commands() -> dict[str, Command]:
    """The installed subcommands, by name."""
    return {point.name: point.load() for point in entry_points(group=COMMAND_GROUP)}


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends each option with its default, except a required option's and a None default
    (whose help says in words what unset means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:  # argparse's hook for this formatter
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


class BriefErrors(argparse.ArgumentParser):
    """A parser whose usage errors are one line that points to ``--help``, not argparse's usage block first (serve's
    is 28 lines, with the error at their end). Its subparsers are ``BriefSubcommand``s."""

    def error(self, message: str):  # argparse's hook: print and exit with status 2
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # argparse's; the top-level parser's alone (subcommands' not)
        """argparse's, keeping the command line parsed as ``command_line`` (``loraswap ARGS``, shell-quoted): what
        ``train``'s and ``merge``'s cards record, the arguments given (``args``: ``main``'s argv), not this process's
        (a test or program calling ``main`` recorded its own command line)."""
        argv = sys.argv[1:] if args is None else [str(arg) for arg in args]
        parsed = super().parse_args(argv, namespace)
        parsed.command_line = shlex.join([self.prog, *argv])
        return parsed

    def parse_known_args(self, args=None, namespace=None):  # argparse's; parse_args calls it, as subcommands do
        """argparse's, then the defaults settings give read (``read_setting_defaults``; ``--help`` exits before):
        an invalid ``LORASWAP_`` variable they read is a usage error naming it."""
        parsed, extras = super().parse_known_args(args, namespace)
        try:
            read_setting_defaults(parsed)
        except (ValidationError, SettingsError) as exc:
            self.error(reason(exc, parsed))
        return parsed, extras


class BriefSubcommand(BriefErrors):
    """A subcommand's parser, whose arguments it does not know are its own usage error (``loraswap bench: error:
    unrecognized arguments: --x (see loraswap bench --help)``), as its other usage errors are: argparse leaves them to
    the top-level parser, which named no subcommand (a review). Those before the subcommand stay the top-level's."""

    def parse_known_args(self, args=None, namespace=None):  # the subparsers' action calls it for the subcommand
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    parser = BriefErrors(prog="loraswap", description="Serve many LoRA adapters on one frozen base model; "
                         "train, evaluate and benchmark them.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=BriefSubcommand)
    serve = subparsers.add_parser("serve", help="run the HTTP service", formatter_class=DefaultsHelp,
                                  description="Run the HTTP service.")
    add_settings_arguments(serve)
    for name, command in commands().items():
        sub = subparsers.add_parser(name, help=command.help, description=command.description,
                                    formatter_class=DefaultsHelp)
        command.add_arguments(sub)
        reports = [(action.dest, action.option_strings[0]) for action in sub._actions if action.type is output_file]
        inputs = [(action.dest, action.option_strings[0]) for action in sub._actions  # --help's default is SUPPRESS
                  if action.option_strings and action.type is not output_file and action.default != argparse.SUPPRESS]
        sub.set_defaults(run=command.run, report_files=reports, input_options=inputs,  # given_as reads option_dests
                         option_dests=frozenset(action.dest for action in sub._actions if action.option_strings),
                         own_threads=command.own_threads)
    return parser


def check_report_files(args: argparse.Namespace) -> None:
    """UsageError where two report options of the command (``output_file``) name one file: one report would be
    written over the other (``eval --json x --predictions x``, or through a symlink or a hard link). Files that are
    no regular files (``/dev/null``, ``/dev/stdout``) may take several. Then ``check_inputs_spared``."""
    named: dict[object, str] = {}
    for dest, option in args.report_files:
        path = getattr(args, dest)
        identity = None if path is None else file_identity(path)
        if identity is None:
            continue
        if identity in named:
            raise UsageError(f"{named[identity]} and {option} name one file, {path}: one report would be written "
                             "over the other")
        named[identity] = option
    check_inputs_spared(args)


def path_values(value: object) -> list[str | Path]:
    """The paths an option's parsed ``value`` may name: itself for a str or Path, the items of a list of them."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [item for item in values if isinstance(item, (str, Path)) and item]


def check_inputs_spared(args: argparse.Namespace) -> None:
    """UsageError where a report option names a file another option of the command names (``eval --data x --json x``
    wrote the report over the data: ``spare_inputs``), or lies in a model folder another option names (it holds
    config.json: ``--base-model m --json m/config.json``). What a command reads by default (the data folder's files)
    it checks itself."""
    reports = [(option, getattr(args, dest)) for dest, option in args.report_files]
    given = [(option, value) for dest, option in args.input_options for value in path_values(getattr(args, dest))]
    spare_inputs(reports, [(f"the file {option} names", value) for option, value in given])
    for option, value in given:
        folder = Path(value)
        if not (folder / "config.json").is_file():
            continue
        for report_option, report in reports:
            if report is not None and report.resolve().parent == folder.resolve():
                raise UsageError(f"{report_option} {report} lies in the model folder {option} names, {value}, which "
                                 "the command reads: a report would write over or beside its files")


def file_identity(path: Path) -> object:
    """What makes ``path`` the file it is: its device and inode if it exists (hard links share them), else its
    resolved path; None for an existing file that is no regular file (a device, a pipe)."""
    identity = regular_file(path)
    return identity if identity is not None or path.exists() else path.resolve()


def reason(exc: Exception, args: argparse.Namespace) -> str:
    """What went wrong, in one line, each setting named as the user gave it (``field_name`` for the setting at fault,
    ``as_given`` for those the words name: ``--max-batch`` or ``LORASWAP_MAX_BATCH``, not ``max_batch``). For a
    ValidationError, each field's problem without the value given, which may be a secret (the admin or API key), nor
    pydantic's "Value error, " before a validator's own words."""
    if isinstance(exc, SettingsError):  # pydantic-settings' own: 'error parsing value for field "x" from source ...'
        return re.sub(r'field "(\w+)"', lambda name: variable(name[1]), str(exc))
    if isinstance(exc, OSError):
        return os_error(exc, args)
    if isinstance(exc, UnsafeEnvironment) and exc.off:
        return f"{exc.message} ({off_switch(exc.off, args)})"
    if not isinstance(exc, ValidationError):
        return as_given(str(exc), args)
    return "; ".join(f"{field_name(error['loc'], exc.title, args)}: "
                     f"{as_given(error['msg'].removeprefix('Value error, '), args)}" for error in exc.errors())


def off_switch(name: str, args: argparse.Namespace) -> str:
    """How the command of ``args`` turns boolean setting ``name`` off: its flag and its variable where it has the
    option (serve's, scale's: ``--no-onednn, LORASWAP_ONEDNN=false``), else its variable alone (a review: train, eval
    and bench, which have no --no-onednn, named it)."""
    off = f"{variable(name)}=false"
    return f"{flag('no_' + name)}, {off}" if name in getattr(args, "setting_options", ()) else off


def os_error(exc: OSError, args: argparse.Namespace) -> str:
    """OSError's line naming the option whose path it is about, the path given or a file in that folder
    (``--data-dir /x: No such file or directory: /x/nli/mnli.jsonl.gz``; a review: it named no option), where one
    of the command's options (``input_options``) gives it; else OSError's own line, each setting it names by its field
    named as given (``as_given``: ``base_model.make_cache_dir``'s ``cache_dir``)."""
    if exc.filename is None or exc.strerror is None:
        return as_given(str(exc), args)
    failed = Path(exc.filename)
    for dest, option in getattr(args, "input_options", []):
        for value in path_values(getattr(args, dest, None)):
            if Path(value) == failed:
                return f"{option} {value}: {exc.strerror}"
            if str(value) not in (".", "") and Path(value) in failed.parents:
                return f"{option} {value}: {exc.strerror}: {exc.filename}"
    return str(exc)


def field_name(loc: tuple, model: str, args: argparse.Namespace) -> str:
    """How an error's ``loc`` in ``model`` is named to the user: a Settings field as ``given_as`` names it, items of a
    list in brackets (``--adapter-roots[0]``); else pydantic's dotted path, ``settings`` for the model as a whole."""
    if not loc:
        return "settings"
    if model != Settings.__name__:
        return ".".join(map(str, loc))
    return given_as(args, str(loc[0])) + "".join(f"[{part}]" for part in loc[1:])


def from_the_start(args: argparse.Namespace) -> None:
    """What a process that runs the command of ``args`` from its start does first: ``serve`` starts again without
    malloc's tcache (``malloc.restart_without_tcache``: before it reads its configuration, so that the process started
    again alone reads it; a review: serve built its Settings in both), a stop held back meanwhile (``entry.hold_stops``,
    where the entry point has not held them from the process's first step: a process that calls ``main`` itself); then a
    stop (SIGTERM, as Ctrl-C) ends it from now on (``take_stops``; loadtest and scale set their own later), and torch's
    threads are sized to the CPU quota (``threads_within_quota``, before torch is imported), but where the command sizes
    them itself (``Command.own_threads``: scale's replicas, by Ray)."""
    hold_stops()
    if args.command == "serve":
        malloc.restart_without_tcache()
    take_stops()
    if not getattr(args, "own_threads", False):
        from service.model.cpu_quota import threads_within_quota  # with joblib (0.2 s), once --help has answered

        threads_within_quota()


def close_progress_bars() -> None:
    """Close the progress bars still open (tqdm's: training's, a load's, the embedded base's conversion), each ending
    its line, so that what is written next starts a line of its own: a stop's line was written on the bar's (``...
    100/1000 [00:05<00:45, 19.9it/s]loraswap train: interrupted``). tqdm is not imported here where no bar was."""
    progress = sys.modules.get("tqdm.std")
    if progress is not None:
        for bar in list(progress.tqdm._instances):
            bar.close()


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` gives (None: this process's command line, the process being the command's from its
    start); its exit status. serve's process from its start does not return: it ends at once when the command does
    (``server_process.run_to_its_end``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request of a load test's clients
    server_process.quiet_bitsandbytes()  # imported with peft where --quantize nf4 needs it
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command == "serve":
        server_process.run_to_its_end(lambda: run(parser, args, argv))
    return run(parser, args, argv)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
    """Run the command of ``args``, parsed by ``parser`` from ``argv`` (None: this process's command line); its exit
    status, or SystemExit: 2 with one line for what cannot be done; for a stop (Ctrl-C, SIGTERM) 130, serve's 0."""
    try:
        if argv is None:  # this process is the command from its start (not a caller's, as in tests)
            from_the_start(args)
        for warning in unknown_variables():  # once: after serve's restart without the tcache
            logger.warning(warning)
        if args.command == "serve":
            settings = settings_from(args)
            if argv is None:  # readied before the checks import torch and peft
                server_process.prepare(settings.quantize)
            check_server_start(settings, args)
            named = naming(args)
            from service.http.server import serve  # before the memory check: the process it measures serves

            # the embedded base is not converted here: its first conversion runs while /health answers
            checked = check_room_for_prompts(settings, named=named, convert=False)
            sockets = take_port(settings, args)  # before the model loads; the server serves on these
            serve(settings, named, sockets, checked)
        else:
            check_report_files(args)
            if getattr(args, "quantize", "none") == "none":  # full precision (no --quantize: none): no bitsandbytes
                server_process.without_bitsandbytes()
            args.run(args)
    except (UsageError, AdapterError, OSError, ValidationError, SettingsError, UnsafeEnvironment,
            TemplateRefused) as exc:  # cannot be done (OSError: a file named that cannot be read or written)
        parser.exit(2, f"loraswap {args.command}: error: {reason(exc, args)}\n")
    except KeyboardInterrupt:  # Ctrl-C: the shell's status for SIGINT (128 + 2), not a traceback
        close_progress_bars()
        if args.command == "serve":  # stopped before its server serves: status 0, as a server stopped once serving
            parser.exit(0, "loraswap serve: stopped\n")
        if argv is None:  # this process is the command's: it ends now, whatever the stop left running
            server_process.end_stopped(f"loraswap {args.command}: interrupted", 130)
        parser.exit(130, f"loraswap {args.command}: interrupted\n")
    return 0


if __name__ == "__main__":  # not an entry point: loraswap's modules would load before the stops are held
    print("loraswap: python -m service.cli.main is not the command's entry point: run loraswap, or python -m "
          "service.cli.entry, which hold Ctrl-C and SIGTERM back from the process's first step", file=sys.stderr)
    raise SystemExit(2)

"""What a ``loraswap`` subcommand is, and the argument types the commands share. Light: the parser is built
without torch, so that ``--help`` and usage errors answer at once."""
from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import importlib.util
import math
import os
import re
import signal
import socket
import stat
import threading
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from service.cli.entry import STOPS
from service.settings import (
    ADAPTER_CONFIG_FILE,
    DEVICE_PATTERN,
    DEVICES,
    INT64_RULE,
    Settings,
    int64,
    known_host,
    setting,
    usable_path,
    variable,
    worded,
)


class UsageError(Exception):
    """What the user asked cannot be done, found once the options were parsed (options that do not go together, data
    too short for them): ``loraswap`` reports it in one line with exit status 2, as argparse does its own."""


@dataclass(frozen=True)
class Command:
    """A subcommand of ``loraswap``, declared by its package in the ``loraswap.commands`` entry-point group of
    ``pyproject.toml`` (the entry point's name is the subcommand's). ``add_arguments`` must stay light; ``run``
    imports what the command needs when it is called. ``run`` raises UsageError, AdapterError, OSError (a file it
    names that cannot be read or written: absent, a name too long), UnsafeEnvironment, TemplateRefused (an adapter's
    chat template refuses a prompt style's prompt) or pydantic's ValidationError for what the user asked that cannot
    be done (a usage error, exit status 2). ``reads``: the ``LORASWAP_`` variables it reads that no option's help
    names, in words, ending the description ``--help`` shows (``SERVING_VARIABLES`` for one that runs the engine or
    loads the base as serve does). ``own_threads``: the command sizes its processes' torch threads itself (``scale``:
    Ray gives each replica ``OMP_NUM_THREADS`` of its ``num_cpus``, where none is set), so ``main`` does not size them
    to the CPU quota (``cpu_quota.threads_within_quota``), which every replica would inherit."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    reads: str = ""
    own_threads: bool = False

    @property
    def description(self) -> str:
        """What ``--help`` says of the command before its options: ``help``, then ``reads``."""
        return f"{self.help}. {self.reads}" if self.reads else self.help


T = TypeVar("T")
# what a command that builds Settings (the engine's, or the base's as serve loads it) reads: serve's variables
SERVING_VARIABLES = ("Every other setting of loraswap serve (not one of the options here, which give theirs even by "
                     "default, nor one the command sets itself, such as the queue's bounds) comes from its "
                     f"{Settings.model_config['env_prefix']} variable, as serve's do ({variable('max_input_tokens')} "
                     f"for --max-input-tokens, {variable('onednn')} for --onednn: loraswap serve --help lists them); "
                     "an invalid one is a usage error.")


@dataclass(frozen=True)
class SettingDefault:
    """The default of an option that a setting gives (``--adapters-dir``: ``adapters_dir``, its ``LORASWAP_`` variable,
    else its default), read when the command runs (``read_setting_defaults``), not when the parser is built: ``--help``
    reads no environment variable, and an invalid one fails only a command that reads it. ``str``: what ``--help``
    shows."""

    name: str

    def __str__(self) -> str:
        default = Settings.model_fields[self.name].get_default(call_default_factory=True)
        return f"${variable(self.name)}, else {'unset' if default is None else default}"


def read_setting_defaults(args: argparse.Namespace) -> None:
    """Replace each SettingDefault left in ``args`` (its option was not given) by its setting's value (``setting``:
    its variable alone is read). Raises pydantic's ValidationError, or pydantic-settings' SettingsError, where such a
    ``LORASWAP_`` variable is invalid."""
    for name, value in list(vars(args).items()):
        if isinstance(value, SettingDefault):
            setattr(args, name, setting(value.name))
            args.settings_read = [*getattr(args, "settings_read", []), name]  # read by given_as


def sets_settings(parser: argparse.ArgumentParser, itself: dict[str, object] | None = None,
                  by: dict[str, str] | None = None) -> None:
    """Declare the Settings fields of the runtime (or base) the command of ``parser`` builds (``command_settings``)
    that neither an option of the field's own name nor the field's ``LORASWAP_`` variable gives, for
    ``command_settings`` to build them and ``given_as`` to name them: ``by``, each field an option gives under another
    name, by that option (bench's ``--adapters`` for ``max_resident``); ``itself``, each field the command sets
    itself, by its value, or by a function of the parsed arguments that gives it (eval's ``max_queue``, from
    ``--max-batch``), which no flag or variable changes."""
    parser.set_defaults(settings_by=dict(by or {}), settings_set=dict(itself or {}))


def command_settings(args: argparse.Namespace, **by: object) -> Settings:
    """The Settings the command of ``args`` (one that declares them: ``sets_settings``) builds: each field an option of
    its own name gives (``--max-batch``), ``by``, each field an option of another name gives (the fields
    ``sets_settings`` declared so), the fields the command sets itself, as ``sets_settings`` declared them, and every
    other from its ``LORASWAP_`` variable, else its default. The variable of a field given is never read (a review:
    ``LORASWAP_MAX_QUEUE=abc`` failed eval, which sets max_queue itself). Raises pydantic's ValidationError for an
    invalid variable or value, TypeError where ``by`` gives other fields than ``sets_settings`` declared."""
    if by.keys() != args.settings_by.keys():
        raise TypeError(f"{sorted(by)} given, {sorted(args.settings_by)} declared by another option's name")
    options = {name: getattr(args, name) for name in Settings.model_fields if name in args.option_dests}
    own = {name: value(args) if callable(value) else value for name, value in args.settings_set.items()}
    return Settings(**options, **by, **own)


def given_as(args: argparse.Namespace, name: str) -> str:
    """How setting ``name`` is named to the user of the command of ``args``, by what gives it its value there, so that
    no message names a flag or variable the command does not take: by the flag of the option that gives it
    (``--max-batch``, also for the option's own default; one of another name, ``sets_settings``: bench's ``--adapters``
    for ``max_resident``); where the command sets it itself (``sets_settings``), as the command's own (``calibrate's own
    max_new_tokens``: a review, it said ``--max-new-tokens``, which calibrate has not, and eval said
    ``LORASWAP_MAX_QUEUE``, which it does not read); where the value was read from the environment (no option gave it, a
    ``SettingDefault`` still stands for it, or ``read_setting_defaults`` put its setting's value in its place), by its
    variable (``LORASWAP_MAX_BATCH``); else, for a default of Settings', as the user could set it: by its flag where the
    command has that option (``setting_options``: serve's and scale's), else by its variable (a review: 'must be below
    max_input_tokens' named a setting no user sets by that name)."""
    by = getattr(args, "settings_by", {})
    if name in by:
        return by[name]
    if name in getattr(args, "settings_set", ()):
        return f"{getattr(args, 'command', 'the command')}'s own {name}"
    read = name in getattr(args, "settings_read", ()) or isinstance(getattr(args, name, SettingDefault(name)),
                                                                   SettingDefault)
    options = getattr(args, "setting_options", ())
    env = variable(name)
    if not read or (env not in os.environ and name in options):
        return flag(name)
    return env


@dataclass(frozen=True)
class SettingNames:
    """A text with each Settings field it names (``max_new_tokens 500 leaves ...``, as the runtime's checks say it:
    ``settings.worded``) named as ``given`` names it (field: ``--max-new-tokens`` or ``LORASWAP_MAX_NEW_TOKENS``). The
    names are found once, where the command runs (``naming``), so that they pickle and still say what its command
    line and environment gave: Ray sends them to each replica of ``scale`` (a review: replicas named fields)."""

    given: dict[str, str]

    def __call__(self, text: str) -> str:
        return worded(text, self.given.__getitem__)


def as_given(text: str, args: argparse.Namespace) -> str:
    """``text`` with each Settings field it names named as ``given_as`` names it (``--max-new-tokens 500 leaves ...``:
    ``naming``)."""
    return naming(args)(text)


def naming(args: argparse.Namespace) -> SettingNames:
    """Each Settings field named as ``given_as`` names it for ``args``: how the runtime a command starts names them in
    its log and its reasons (``Runtime``'s ``named``), on this machine or on a replica of ``scale``."""
    return SettingNames({name: given_as(args, name) for name in Settings.model_fields})


def interrupt(signum: int, frame) -> None:
    """A handler of SIGINT and SIGTERM: the KeyboardInterrupt Ctrl-C raises, so that a command stopped by ``timeout``,
    a container runtime or a CI job cleans up as one stopped by Ctrl-C (a review: ``train`` and ``sweep`` left their
    ``.NAME.partial-PID-*`` folders). A signal that lands in a finalizer (``__del__``, where Python only prints an
    exception: seen in regex's, during training) is sent again 0.1 s later. Once raised, SIGINT and SIGTERM are
    ignored: a second (``timeout`` signals the process group too; Ctrl-C pressed twice) raised in the clean-up, where
    it left a lock held (eval hung in the engine's stop), a traceback (in ``threading._shutdown``) or an abort (status
    134), and the interpreter, ending, would let it kill the process (status 143), not end with 130."""
    if frame is not None and frame.f_code.co_name == "__del__":
        threading.Timer(0.1, os.kill, (os.getpid(), signum)).start()
        return
    stop_taken()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_taken() -> None:
    """Once a stop is taken, SIGINT and SIGTERM do nothing (``ignore_stop``), and are ignored once the interpreter
    ends (``ignore_stops``)."""
    for number in STOPS:
        signal.signal(number, ignore_stop)
    atexit.unregister(ignore_stops)
    atexit.register(ignore_stops)


def ignore_stops() -> None:
    """SIGINT and SIGTERM ignored (SIG_IGN): at its end the interpreter gives a signal with a Python handler its
    default action back (CPython's ``_PySignal_Fini``), and a stop then ended the process with status 143, not 130
    (a train stopped twice)."""
    for number in STOPS:
        signal.signal(number, signal.SIG_IGN)


def ignore_stop(signum: int, frame) -> None:
    """SIGINT's and SIGTERM's handler once a stop was taken: nothing. Not SIG_IGN: where both signals came before
    Python ran either handler (a busy machine), Python runs SIGINT's first, then finds SIGTERM's handler changed to
    SIG_IGN and prints "Signal 15 ignored due to race condition" with a traceback (a CI run, eval stopped twice)."""


def run_until_stopped(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coroutine)``, where a stop (SIGINT, SIGTERM) cancels its task, as ``asyncio.run`` does Ctrl-C
    under Python's default handler, and raises KeyboardInterrupt once the tasks have unwound (the requests they queued
    withdrawn from the engine): ``interrupt`` raised it wherever the loop was, in asyncio's own code too, and the stop
    printed a task's exception "never retrieved" and a coroutine "never awaited" with their tracebacks (a CI run, eval
    stopped twice under load). Later stops do nothing (``stop_taken``); the handlers are as they were where none
    came."""
    stops: list[int] = []
    running: list[tuple[asyncio.Task, asyncio.AbstractEventLoop]] = []

    def stop(signum: int, frame) -> None:
        stops.append(signum)
        stop_taken()
        if not running:  # before the coroutine's first step: nothing runs yet to cancel
            raise KeyboardInterrupt(signal.Signals(signum).name)
        task, loop = running[0]
        task.cancel()
        loop.call_soon_threadsafe(lambda: None)  # wakes a loop waiting in select, as asyncio.Runner's handler does

    async def main() -> T:
        running.append((asyncio.current_task(), asyncio.get_running_loop()))
        return await coroutine

    handlers = [signal.getsignal(number) for number in STOPS]
    for number in STOPS:
        signal.signal(number, stop)
    try:
        result = asyncio.run(main())
    except asyncio.CancelledError:
        if not stops:
            raise
    finally:
        if not stops:
            for number, handler in zip(STOPS, handlers):
                signal.signal(number, handler)
    if stops:
        raise KeyboardInterrupt(signal.Signals(stops[0]).name)
    return result


def take_stops() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt (``interrupt``) from now on, and those held back until now
    (``entry.hold_stops``, from the process's first step and across ``malloc.restart_without_tcache``) at once. For a
    process that is the command from its start, as early as it can: as PID 1 (a container's) a process hears no signal
    it has no handler for, and ``serve`` ignored SIGTERM until uvicorn's handlers were set, after its checks had
    imported torch."""
    for number in STOPS:
        signal.signal(number, interrupt)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)


def require_extra(extra: str, *modules: str) -> None:
    """UsageError, naming the install command, where a module of the optional dependencies ``extra`` (pyproject's
    ``[project.optional-dependencies]``) is missing: ``modules`` are checked in order, a package before its
    submodules."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise UsageError(f'needs {module}, of the optional dependencies "{extra}": pip install -c '
                             f'requirements/lock.txt -e ".[{extra}]"')


def flag(name: str) -> str:
    """The command-line flag of option or setting ``name`` (``--top-k`` for ``top_k``)."""
    return "--" + name.replace("_", "-")


def positive(kind: type = int):
    """An argparse type: a number of ``kind`` above zero (a clear usage error otherwise, not a failure later)."""
    return bounded(kind, lambda value: value > 0, "above 0", "positive")


def nonnegative(kind: type = int):
    """An argparse type: a number of ``kind`` of at least zero."""
    return bounded(kind, lambda value: value >= 0, "at least 0", "non-negative")


def bounded(kind: type, holds: Callable[[object], bool], bound: str, adjective: str):
    """An argparse type: a ``kind`` for which ``holds`` (else a usage error saying it must be ``bound``). A float
    must be finite, an int a 64-bit one (``settings.int64``, as a setting must be; a review: ``train --max-steps`` of
    400 digits ended in transformers' OverflowError once the weights had loaded), whatever ``holds`` says."""
    def parse(text: str):
        value = kind(text)
        if isinstance(value, float) and not math.isfinite(value):  # inf, nan: no option means a bound by them (an
            # int is finite; math.isfinite raised OverflowError, a traceback, for one of 400 digits)
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, not {text}")
        if not holds(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
        try:
            return int64(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {bound} and {INT64_RULE}, not {text}") from None
    parse.__name__ = f"{adjective} {kind.__name__}"  # argparse names the type in its error message
    return parse


def comma_list(item: Callable[[str], object] = str, choices: Iterable[str] | None = None):
    """An argparse type: a comma-separated list (``4,8,16``), each item parsed by ``item`` and, with ``choices``,
    one of them; an empty item, a bad one, one outside the choices or one given twice (``base,base``, ``1e-3,0.001``:
    each list names runs, loads or modes to do once) is a usage error naming it."""
    allowed = None if choices is None else tuple(choices)

    def parse(text: str) -> list:
        items = text.split(",")
        for piece in items:
            if not piece.strip() or (allowed is not None and piece not in allowed):
                known = f" (one of {', '.join(allowed)})" if allowed is not None else ""
                raise argparse.ArgumentTypeError(f"{piece!r} in {text!r} is not an item of the list{known}")
        try:
            values = [item(piece) for piece in items]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: an item {exc}") from None
        except ValueError:
            kind = getattr(item, "__name__", item)
            raise argparse.ArgumentTypeError(f"{text!r}: every item must be {kind}") from None
        twice = next((piece for piece, value in zip(items, values) if values.count(value) > 1), None)
        if twice is not None:
            raise argparse.ArgumentTypeError(f"{text!r} names {twice!r} twice")
        return values
    parse.__name__ = "comma-separated list"
    return parse


def device(text: str) -> str:
    """An argparse type: a device the engine can run on here, ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (GPU N). Any
    other name, or a GPU this machine lacks, is a usage error; torch is imported only to count the GPUs of a CUDA
    name."""
    if not re.fullmatch(DEVICE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"must be {DEVICES}, not {text!r}")
    if text.startswith("cuda"):
        import torch

        index, count = int(text.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise argparse.ArgumentTypeError(f"{text!r} names GPU {index}, and this machine has {count} CUDA GPU(s)")
    return text


def check_device(name: str, given: str) -> None:
    """UsageError unless the server can run on device ``name`` here (``command.device``), naming the setting as it was
    ``given`` (``given_as``)."""
    try:
        device(name)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{given}: {exc}") from None


def check_onednn(settings: Settings) -> None:
    """UnsafeEnvironment where the environment would crash oneDNN's linear layers
    (``onednn_linear.bound_kernel_caches``)."""
    if settings.onednn:
        from service.model.onednn_linear import bound_kernel_caches

        bound_kernel_caches()


def check_server_start(settings: Settings, args: argparse.Namespace) -> None:
    """The checks of this machine ``serve`` makes before its server starts, and ``scale`` before it starts a Ray here,
    where its replicas run, with ``settings`` from ``args``: UsageError where the server cannot run on
    ``settings.device`` here (``check_device``), UnsafeEnvironment where the environment would crash oneDNN
    (``check_onednn``)."""
    check_device(settings.device, given_as(args, "device"))
    check_onednn(settings)


def check_room_for_prompts(settings: Settings, replicas: int = 1, named: Callable[[str], str] = str,
                           convert: bool = True) -> bool:
    """UsageError where the server's start would fail for the token budget or a size setting
    (``runtime.check_settings_fit``: ``max_new_tokens`` leaving too few of the base model's positions for a prompt,
    an ``answer_stride`` too long, a ``max_batch`` whose KV cache cannot exist, past 64 bits or, with the weights and
    the process, past the device's memory, as many times as ``replicas`` share it) or a base model it cannot read,
    found from the base model's config, not its weights: ``serve`` and ``scale`` refuse such settings before the model
    loads. ``named``: the message with its settings named as the user gave them (``naming``); ``convert``: as
    ``runtime.check_settings_fit`` takes it. Returns whether they were checked (``check_settings_fit``)."""
    from service.runtime import check_settings_fit

    try:
        return check_settings_fit(settings, replicas, convert)
    except (OSError, ValueError) as exc:
        raise UsageError(named(str(exc))) from None


def take_port(settings: Settings, args: argparse.Namespace) -> list[socket.socket]:
    """The sockets listening on ``settings.host``:``settings.port`` the server is to serve on
    (``listening.listening_sockets``), taken now, before the model loads. UsageError naming the option or variable at
    fault as ``args`` gave it (``given_as``): the port where it is in use or may not be taken (EADDRINUSE, EACCES),
    else the host (no address of this machine, EADDRNOTAVAIL; a name that resolves to none)."""
    from service.http.listening import PORT_ERRORS, listening_sockets

    try:
        return listening_sockets(settings.host, settings.port)
    except OSError as exc:
        name = "port" if exc.errno in PORT_ERRORS else "host"
        raise UsageError(f"{given_as(args, name)} {getattr(settings, name)}: cannot listen on port {settings.port} "
                         f"of {settings.host}: {exc.strerror or exc}") from None


def refusing_os_errors(check: Callable[[str], Path]) -> Callable[[str], Path]:
    """An argparse type that looks at the file system, whose OSError (a name too long, a folder it may not enter) is a
    usage error naming the option: argparse reports only a type's ArgumentTypeError, TypeError and ValueError (a
    review: a --json name of 300 characters ended in OSError's traceback)."""
    @functools.wraps(check)
    def parse(text: str) -> Path:
        try:
            return check(text)
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{text}: {exc.strerror or exc}") from None

    return parse


@refusing_os_errors
def input_name(text: str) -> str:
    """An argparse type: a name or a path a command reads or looks a name up by (``--adapter``, ``--base-model``), as
    given: a usage error naming the option where the file system refuses it as a path (``settings.usable_path``: a
    component over 255 bytes; it was OSError's line once the command ran, naming no option). Whether anything is
    there is for the command to say."""
    return str(usable_path(text))


def input_path(text: str) -> Path:
    """An argparse type: a file or folder a command reads (``--data``, ``--adapters-dir``), an ``input_name``."""
    return Path(input_name(text))


@refusing_os_errors
def output_file(text: str) -> Path:
    """An argparse type: a file to write, checked before the command works: not empty, not a folder, in a folder that
    exists and is no adapter's (a review: ``eval --json adapters/x/card.json`` replaced the adapter's card), nor a
    symlink to a file in one (a review: that got past the check) or into no folder, nor a hard link (``spare_links``).
    A command that writes its report after minutes of work must not find only then that it cannot."""
    path = Path(text)
    if not text:
        raise argparse.ArgumentTypeError("must name a file, not be empty")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file to write")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: there is no folder {path.parent} to write it in")
    spare_adapter_folder(text, path.parent, "lies in")
    try:
        target = path.resolve()  # where a write through symlinks (of the file or its folders) lands
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        raise argparse.ArgumentTypeError(f"{text} is a symlink loop, not a file to write") from None
    if not target.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a symlink to {target}: there is no folder {target.parent} to "
                                         "write it in")
    spare_adapter_folder(text, target.parent, f"leads to {target}, in")
    spare_links(text, path)
    return path


def spare_links(text: str, path: Path) -> None:
    """ArgumentTypeError where ``path`` (through symlinks) is a regular file of more than one name, a hard link: a
    report written there changes the file under each of its names, and where the others are cannot be told from
    this one (a review: ``calibrate --json x.json``, x.json a hard link to an adapter's card.json, replaced the card
    from outside the adapter's folder)."""
    try:
        status = path.stat()
    except (OSError, ValueError):  # nothing there yet
        return
    if stat.S_ISREG(status.st_mode) and status.st_nlink > 1:
        raise argparse.ArgumentTypeError(f"{text} is a hard link, a file of {status.st_nlink} names: a report written "
                                         "there would change it under its other names too (an adapter's card.json, "
                                         "say); name a new file, or remove this name first")


def spare_adapter_folder(text: str, folder: Path, where: str) -> None:
    """ArgumentTypeError where ``folder``, in which the output ``text`` names lands (``where`` says how: 'lies in',
    'is'), is an adapter folder (it holds ``ADAPTER_CONFIG_FILE``, through symlinks): a report would be written over
    or beside the adapter's own files."""
    if (folder / ADAPTER_CONFIG_FILE).exists():
        raise argparse.ArgumentTypeError(f"{text} {where} an adapter folder (it holds {ADAPTER_CONFIG_FILE}): a report "
                                         "would write over or beside the adapter's own files")


def server_url(text: str) -> str:
    """An argparse type: a server's URL, ``http(s)://HOST[:PORT][/PATH]``, returned without a trailing slash; a usage
    error for another scheme, no host, a host that is no name or address (``a b``, an unclosed ``[::1``: a review,
    the one accepted, the other argparse's "invalid server_url value"), a space or control character anywhere, or a
    port that is no number in 1-65535 (a review: ``--host http://127.0.0.1:99999`` was a "Connection refused" once
    the command ran)."""
    try:
        parts = urlsplit(text)
        port_ok = parts.port != 0  # None: the scheme's own port
    except ValueError:  # a port not a number or past 65535, an unclosed [ of an IPv6 address
        parts, port_ok = None, False
    if (not port_ok or parts.scheme not in ("http", "https") or not known_host(parts.hostname)
            or any(char.isspace() or not char.isprintable() for char in text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a server's URL, http://HOST:PORT (a port in 1-65535)")
    if "?" in text or "#" in text or "@" in parts.netloc:  # an empty query or fragment too (urlsplit drops them)
        # a review: '/path?q' gave '/path?q/adapters'; a user's password would be sent, and logged, as it is
        raise argparse.ArgumentTypeError(f"{text!r} is not a server's URL, http://HOST:PORT[/PATH]: no query (?), "
                                         "fragment (#) or user (@)")
    return text.rstrip("/")


def regular_file(path: str | Path) -> tuple[int, int] | None:
    """The device and inode of the regular file ``path`` names (through symlinks; hard links share them), None
    where it names none (absent, a folder, a device, not a path at all)."""
    try:
        status = Path(path).stat()
    except (OSError, ValueError):  # absent, unreadable; ValueError: a NUL in the name
        return None
    return (status.st_dev, status.st_ino) if stat.S_ISREG(status.st_mode) else None


def spare_inputs(reports: Iterable[tuple[str, Path | None]], inputs: Iterable[tuple[str, str | Path]]) -> None:
    """UsageError where one of ``reports`` (its option and path, None when not asked for) would be written over a file
    the command reads, one of ``inputs`` (what it is, in words, and its path): the same file by its path, through a
    symlink or a hard link (a review: ``eval --data X --json X`` replaced the data with the report)."""
    read: dict[tuple[int, int], str] = {}
    for what, path in inputs:
        identity = regular_file(path)
        if identity is not None:
            read.setdefault(identity, what)
    for option, path in reports:
        what = None if path is None else read.get(regular_file(path))
        if what is not None:
            raise UsageError(f"{option} {path} is {what}, which the command reads: the report would be written over "
                             "it")


@refusing_os_errors
def output_folder(text: str) -> Path:
    """An argparse type: a folder a command makes or writes into: not empty (``Path('')`` is the working directory),
    not an existing file nor a symlink to nothing, not below a file."""
    path = Path(text)
    if not text:
        raise argparse.ArgumentTypeError("must name a folder, not be empty")
    if path.is_symlink() and not path.exists():
        raise argparse.ArgumentTypeError(f"{text} is a symlink to nothing, not a folder")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    above = next(folder for folder in path.absolute().parents if folder.exists())  # the folders made go in it
    if not above.is_dir():
        raise argparse.ArgumentTypeError(f"{text} lies below a file, {above}: no folder can be made there")
    return path


@refusing_os_errors
def report_folder(text: str) -> Path:
    """An argparse type: an ``output_folder`` a command writes its reports into, beside what it holds: never an
    adapter folder, nor a symlink to one (``spare_adapter_folder``; a review: ``sweep --out adapters/squad`` wrote its
    tables beside the adapter's files)."""
    path = output_folder(text)
    spare_adapter_folder(text, path, "is")
    return path


@refusing_os_errors
def new_folder(text: str) -> Path:
    """An argparse type: a folder a command creates and fills: an ``output_folder`` that, where it exists, is empty (a
    command never writes over what a folder holds, an adapter's files least of all). Checked when parsed;
    ``training.output_folder`` keeps a folder filled later."""
    path = output_folder(text)
    try:
        holds = path.is_dir() and any(path.iterdir())
    except OSError as exc:  # a folder it may not read
        raise argparse.ArgumentTypeError(f"{text} cannot be read: {exc.strerror or exc}") from None
    if holds:
        raise argparse.ArgumentTypeError(f"{text} already holds files: name a new or empty folder")
    return path

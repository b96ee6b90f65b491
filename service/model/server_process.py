"""The server process, readied at its start, once it runs without malloc's tcache (``malloc.restart_without_tcache``,
which ``loraswap serve`` calls first): no bitsandbytes when the base is full precision; ended at once once it has
served (``run_to_its_end``), as a command's process is once stopped (``end_stopped``). Light: the CLI imports it.

peft imports bitsandbytes whenever it is installed (and bitsandbytes networkx): 44 MiB of resident memory that a
full-precision base never uses, and on a CPU a warning that its 4-bit kernels need the package ``kernels``. The other
commands of a full-precision base (``train``, ``eval``, ``bench``...) go without it too (``service.cli.main``).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

BITSANDBYTES_CPU_LOG = "bitsandbytes.backends.cpu.ops"  # the logger of bitsandbytes' CPU kernels (0.50)


def prepare(quantize: str) -> None:
    """Ready this process, started again without malloc's tcache (``malloc.restart_without_tcache``), for the
    server: for a full-precision base (``quantize`` "none") without bitsandbytes."""
    if quantize == "none":
        without_bitsandbytes()


def without_bitsandbytes() -> None:
    """Mark bitsandbytes absent from this process (unless it is imported already), so that peft, imported after this,
    does not import it: ``importlib.util.find_spec``, which peft asks, then finds none, and an import of it fails.
    Only for a process that never quantizes."""
    sys.modules.setdefault("bitsandbytes", None)


def quiet_bitsandbytes() -> None:
    """Keep bitsandbytes' CPU kernels' logger (``BITSANDBYTES_CPU_LOG``) to its errors, from before bitsandbytes is
    imported (with peft) in this process: on a CPU it warns, when imported, that its 4-bit kernel needs `pip install
    kernels`, advice not to follow, as that package fetches code from a model hub at run time, which loraswap never
    does (bitsandbytes goes on without that kernel). The process of every command, and of each of scale's replicas
    (``service.scale``)."""
    logging.getLogger(BITSANDBYTES_CPU_LOG).setLevel(logging.ERROR)


def run_to_its_end(command: Callable[[], int]) -> NoReturn:
    """Run ``command``, the whole work of this process, the server's from its start, then ``end`` it with the exit
    status ``command`` returns, or that of the SystemExit it raises (argparse's usage error, 2; uvicorn's failed
    start, 3)."""
    try:
        status = command()
    except SystemExit as exc:
        status = exc.code
    if isinstance(status, str):  # sys.exit(message): the message, then status 1, as the interpreter's end does
        print(status, file=sys.stderr)
    end(status if isinstance(status, int) else int(status is not None))


def end(status: int) -> NoReturn:
    """End this process at once with exit status ``status``, its logs and output flushed first, without the
    interpreter's end: its last garbage collection of the model's and the libraries' objects took a server that had
    served SmolLM2 2-5 s of the 10 s a container runtime grants after SIGTERM (more under load), and it joined the
    threads still running (a start's step that cannot be cut: 30-60 s of the embedded base's conversion); the exit
    hooks of torch it skips (the FakeTensor cache's statistics, dynamo's compile times) only log. Nothing is left
    half done: the engine has stopped and the render processes end with their pipe to this process."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def end_stopped(line: str, status: int) -> NoReturn:
    """End this process, a command's from its start, at once after a stop (Ctrl-C, SIGTERM): the exit hooks run
    (``atexit``'s: ray's shutdown where scale started a Ray, logging's flush, weakref finalizers' such as a temporary
    folder's removal), ``line`` is written on stderr, then ``end``. Not the interpreter's end, which waits for the
    work the stop left running: the threads not daemonic (``cpu_threads.on_passing_thread``'s: bench SIGTERMed during
    transformers' ``generate`` ended 26 s later), then ends the daemonic ones wherever they are, an abort 1 run in 4
    in torch's code (``terminate called without an active exception``)."""
    atexit._run_exitfuncs()
    print(line, file=sys.stderr)
    end(status)

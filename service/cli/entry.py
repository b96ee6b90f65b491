"""The ``loraswap`` command's entry point (pyproject's ``[project.scripts]``; ``python -m service.cli.entry`` where the
command is run from a checkout, as the load tests' scripts and the tests do): it holds back the stops (``STOPS``,
SIGINT and SIGTERM) from the process's first step, before loraswap's modules and their dependencies load (0.3 s, about
1 s on a busy machine, then serve's restart without malloc's tcache), until the command takes them
(``command.take_stops``). A stop meanwhile waits, blocked, and then ends the command as a stop a moment later would
(serve: 'loraswap serve: stopped', status 0): it does not kill the process by its default action (status 143), nor,
as PID 1 (a container's), is it dropped (the kernel drops a signal that PID 1 has no handler for, unless blocked).
Light: only ``signal`` is imported before the stops are held."""
from __future__ import annotations

import signal

STOPS = {signal.SIGINT, signal.SIGTERM}


def hold_stops() -> None:
    """Block ``STOPS`` in this thread, and in the threads and processes it starts (``exec`` keeps the mask), until
    ``command.take_stops`` unblocks them: one that arrives meanwhile stays pending."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)


def main() -> int:
    """The ``loraswap`` command (``service.cli.main.main``), the stops held back first."""
    hold_stops()
    from service.cli.main import main as command  # the parser's modules and pydantic: after the stops are held

    return command()


if __name__ == "__main__":
    raise SystemExit(main())

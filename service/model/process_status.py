"""A process's sizes from Linux /proc (standard library only: ``loraswap loadtest`` reads them before locust's gevent
patches the standard library, which torch must not precede)."""
from __future__ import annotations


def status_value(field: str, pid: int | str = "self") -> str:
    """The value of the line ``field`` of /proc/PID/status (its first word: ``Umask`` 0022, ``VmRSS`` 1234) of process
    ``pid`` (this one by default), as written there. Raises StopIteration for a field it does not hold (``Umask``
    before Linux 4.7), FileNotFoundError where there is no such process or no /proc."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return line.split()[1]


def proc_status(field: str, pid: int | str = "self") -> int:
    """A size from /proc/PID/status (``VmRSS``, ``VmHWM``) of process ``pid`` (this one by default), in bytes. Raises
    as ``status_value`` does."""
    return int(status_value(field, pid)) * 1024

"""A process's sizes from Linux /proc (standard library only: ``loraswap loadtest`` reads them before locust's gevent
patches the standard library, which torch must not precede)."""
from __future__ import annotations


def proc_status(field: str, pid: int | str = "self") -> int:
    """A size from /proc/PID/status (``VmRSS``, ``VmHWM``) of process ``pid`` (this one by default), in bytes. Raises
    StopIteration for a field it does not hold, FileNotFoundError where there is no such process or no /proc."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024

"""Torch's CPU threads sized to the CPU time the process may use, not to the cores it sees.

A container's CPU limit (``docker run --cpus 1``, a Kubernetes CPU limit) is a CFS bandwidth quota of its cgroup
(``cpu.max``; ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in cgroup v1): the kernel lets its threads run that many
CPUs' worth per period, then throttles them all until the next. Torch sizes its OpenMP team to the cores the process
may be scheduled on (its affinity), whatever the quota, so one op's team outnumbers what the quota runs at once, and
each parallel op waits on threads throttled or descheduled. On 2 cores under a 1-CPU quota, a server with torch's 2
threads answered one client's SQuAD questions at an eighth of the requests/s it did with 1 (docs/benchmarks.md, "A CPU
quota"). The count of CPUs the quota allows comes from joblib (``joblib.cpu_count``: the affinity, then the quota of
the cgroup a container sees as its root, rounded up); a quota set on a cgroup below the root seen, as systemd's
``CPUQuota=`` on a host, is not found by it.

OpenMP reads ``OMP_NUM_THREADS`` once, when torch is imported, and ``torch.set_num_threads`` sets the count for the
calling thread only, not for the engine's; so the count goes in the environment before torch is imported.
"""
from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

from joblib import cpu_count

THREADS = "OMP_NUM_THREADS"  # read by libgomp, and by MKL where MKL_NUM_THREADS is unset

log = logging.getLogger(__name__)


def threads_within_quota(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """Set ``OMP_NUM_THREADS`` in ``environ`` to the CPUs this process's CPU quota allows (``joblib.cpu_count``),
    where that is fewer than the cores it may be scheduled on and no one set it (a user's own value is kept; an empty
    one, as ``docker run -e OMP_NUM_THREADS=`` leaves, is none: OpenMP would take it for invalid and run a thread per
    core, a review found): the count set, or None where nothing was. Call before torch is imported: OpenMP reads it
    then, once."""
    if environ.get(THREADS, "").strip():
        return None
    allowed, cores = cpu_count(only_physical_cores=False), len(os.sched_getaffinity(0))
    if allowed >= cores:
        return None
    environ[THREADS] = str(allowed)
    log.info("torch runs %d thread(s), the CPUs this process's CPU quota allows of the %d cores it sees (set %s to "
             "choose)", allowed, cores, THREADS)
    return allowed

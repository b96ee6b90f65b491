"""Torch's threads under a CPU quota (service.model.cpu_quota): in a real cgroup with a 1-CPU quota, seen where a
container sees its own (``loadtest/in_cpu_quota.sh``: root only; the tests skip where it cannot make one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.model.cpu_quota import THREADS, threads_within_quota

IN_CPU_QUOTA = Path(__file__).parents[2] / "loadtest" / "in_cpu_quota.sh"
NO_CGROUP = 3  # in_cpu_quota.sh's exit status where it can make no cgroup
TORCH_THREADS = "import torch; print(torch.get_num_threads())"
SIZED = f"from service.model.cpu_quota import threads_within_quota; threads_within_quota(); {TORCH_THREADS}"


def in_one_cpu(code: str, **environ: str) -> subprocess.CompletedProcess:
    """Python ``code`` run under a 1-CPU quota, as a container limited to it (``--cpus 1``) runs it; skips where no
    such cgroup can be made here, or where 1 CPU is all this process may use anyway."""
    if os.geteuid() != 0 or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs root, to make a cgroup with a CPU quota, and 2 cores or more, for a 1-CPU quota to be less")
    env = {key: value for key, value in os.environ.items() if key != THREADS} | environ
    ran = subprocess.run(["bash", str(IN_CPU_QUOTA), "1", sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    if ran.returncode == NO_CGROUP:
        pytest.skip(f"no cgroup with a CPU quota can be made here: {ran.stderr.strip()}")
    return ran


def test_torch_runs_the_threads_a_cpu_quota_allows():
    unset, sized = in_one_cpu(TORCH_THREADS), in_one_cpu(SIZED)
    assert (unset.stdout.strip(), sized.stdout.strip()) == (str(len(os.sched_getaffinity(0))), "1"), \
        unset.stderr + sized.stderr


def test_the_loraswap_command_sizes_torch_to_the_quota_and_says_so():
    ran = in_one_cpu("import sys; sys.argv = ['loraswap', 'serve', '--max-batch', '0']; "
                     "from service.cli.main import main; main()")
    assert ran.returncode == 2 and "torch runs 1 threads, the CPUs this process's CPU quota allows of the" in ran.stderr


def test_a_thread_count_the_user_set_is_kept():
    assert in_one_cpu(SIZED, **{THREADS: "2"}).stdout.strip() == "2"


def test_a_thread_count_in_the_environment_is_left_as_it_is():
    environ = {THREADS: "3"}
    assert threads_within_quota(environ) is None and environ == {THREADS: "3"}

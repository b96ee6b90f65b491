#!/usr/bin/env bash
# Runs a command under a CPU quota of CPUS, as a container limited by `docker run --cpus CPUS` (or a Kubernetes CPU
# limit) sees it: in a new cgroup with that CFS bandwidth quota, bind-mounted over the cgroup root in a mount namespace
# of its own, where joblib.cpu_count reads a container's quota (service/model/cpu_quota.py). Root only; cgroup v1's
# cpu controller, or v2 with the cpu controller enabled for the root's children.
#   bash loadtest/in_cpu_quota.sh CPUS COMMAND [ARG...]       e.g. bash loadtest/in_cpu_quota.sh 1 loraswap serve
# Exit status: the command's; 3 where no such cgroup can be made here. The cgroup is removed once the command ends.
set -uo pipefail
cpus=$1; shift
period=100000
quota=$(python3 -c "import sys; print(round(float(sys.argv[1]) * $period))" "$cpus") || exit 2
if [ -e /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
  root=/sys/fs/cgroup/cpu
elif grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; then
  root=/sys/fs/cgroup
else
  echo "no cgroup hierarchy with the cpu controller under /sys/fs/cgroup" >&2; exit 3
fi
group=$root/loraswap-quota-$$
mkdir "$group" || exit 3
trap 'rmdir "$group"' EXIT
if [ "$root" = /sys/fs/cgroup ]; then
  echo "$quota $period" > "$group/cpu.max" || exit 3
else
  { echo $period > "$group/cpu.cfs_period_us" && echo "$quota" > "$group/cpu.cfs_quota_us"; } || exit 3
fi
# shellcheck disable=SC2016  # $1 and $2 are the inner shell's
unshare --mount --propagation private sh -c 'echo $$ > "$1/cgroup.procs" && mount --bind "$1" "$2" && shift 2 \
  && exec "$@"' sh "$group" "$root" "$@"

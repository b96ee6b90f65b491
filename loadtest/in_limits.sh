#!/usr/bin/env bash
# Runs a command under a container's limits, as `docker run --cpus CPUS --memory BYTES` (or a Kubernetes pod's limits)
# runs it: in a new cgroup with that CPU quota (CFS bandwidth) and memory limit, bind-mounted over the cgroup root in a
# mount namespace of its own, where a container sees its own cgroup (and where service/model/cpu_quota.py and
# service/model/device_room.py read its limits). Root only; cgroup v1's cpu and memory controllers, or v2 with them
# enabled for the root's children.
#   bash loadtest/in_limits.sh CPUS BYTES COMMAND [ARG...]     CPUS or BYTES "-": no such limit
#   e.g. bash loadtest/in_limits.sh 1 - loraswap serve;  bash loadtest/in_limits.sh - 2000000000 loraswap serve
# Exit status: the command's; 3 where no such cgroup can be made here. The cgroups are removed once it ends; SIGTERM
# and SIGINT are passed on to it.
set -uo pipefail
cpus=$1 bytes=$2; shift 2
period=100000
[ "$cpus" = - ] || quota=$(python3 -c "import sys; print(round(float(sys.argv[1]) * $period))" "$cpus") || exit 2
v1=/sys/fs/cgroup/cpu
[ -e $v1/cpu.cfs_quota_us ] || v1=
if [ -z "$v1" ] && ! grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; then
  echo "no cgroup hierarchy with the cpu controller under /sys/fs/cgroup" >&2; exit 3
fi
groups=() binds=()
trap 'for group in "${groups[@]}"; do rmdir "$group"; done' EXIT
made() {  # a new cgroup under hierarchy $1: its path, and where the command will see it
  local group=$1/loraswap-limits-$$
  mkdir "$group" || exit 3
  groups+=("$group") binds+=("$group" "$1")
}
limit() {  # write $2 to file $1, or fail with exit status 3
  echo "$2" > "$1" || { echo "cannot write $2 to $1" >&2; exit 3; }
}
if [ -n "$v1" ]; then
  if [ "$cpus" != - ]; then
    made $v1
    limit "${groups[-1]}/cpu.cfs_period_us" $period
    limit "${groups[-1]}/cpu.cfs_quota_us" "$quota"
  fi
  if [ "$bytes" != - ]; then
    made /sys/fs/cgroup/memory
    limit "${groups[-1]}/memory.limit_in_bytes" "$bytes"
    [ -e "${groups[-1]}/memory.memsw.limit_in_bytes" ] && limit "${groups[-1]}/memory.memsw.limit_in_bytes" "$bytes"
  fi
else
  made /sys/fs/cgroup
  [ "$cpus" != - ] && limit "${groups[-1]}/cpu.max" "$quota $period"
  [ "$bytes" != - ] && { limit "${groups[-1]}/memory.max" "$bytes"; limit "${groups[-1]}/memory.swap.max" 0; }
fi
# shellcheck disable=SC2016  # the inner shell's variables
unshare --mount --propagation private sh -c 'while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs" \
  && mount --bind "$1" "$2" || exit 3; shift 2; done; shift; exec "$@"' sh "${binds[@]}" -- "$@" &
command=$!  # the command itself, once unshare and sh have exec'd it
# SIGTERM or Ctrl-C to this script is passed on to the command, which is waited for before its cgroups are removed
# (a review: the script ended at once, its command left running and its cgroup busy)
trap 'kill -TERM $command 2>/dev/null' TERM
trap 'kill -INT $command 2>/dev/null' INT
while wait $command; status=$?; kill -0 $command 2>/dev/null; do :; done
exit $status

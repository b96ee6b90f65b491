#!/usr/bin/env bash
# Two versions of the service under the same client, alternated: OLD_TREE (a checkout of an older commit, e.g.
# `git worktree add /tmp/old COMMIT`) and this tree, ROUNDS rounds, each server started afresh on port 8768.
#   bash scripts/ab_servers.sh OLD_TREE OUT_DIR ROUNDS CLIENT [ARGS...]
# CLIENT runs against each server with WHICH (old or new), ROUND and OUT (OUT_DIR) in its environment; its output
# goes to OUT_DIR/WHICH_ROUND.txt and the server's log to OUT_DIR/serve_WHICH.log.
set -uo pipefail
old_tree=$1; out=$2; rounds=$3; shift 3
new_tree=$(git rev-parse --show-toplevel)
python=${PYTHON:-python}
mkdir -p "$out"
for round in $(seq 1 "$rounds"); do
  for which in old new; do
    tree=$new_tree; [ "$which" = old ] && tree=$old_tree
    (cd "$tree" && setsid nohup "$python" -m service.cli serve --port 8768 > "$out/serve_$which.log" 2>&1 < /dev/null &)
    for _ in $(seq 1 90); do sleep 2; curl -s localhost:8768/ready | grep -q true && break; done
    WHICH=$which ROUND=$round OUT=$out "$@" > "$out/${which}_$round.txt" 2>&1
    pkill -f "service.cli serve --port 8768"; sleep 3
  done
done

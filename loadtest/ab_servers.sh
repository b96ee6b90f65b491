#!/usr/bin/env bash
# Two versions of the service under the same client, alternated: OLD_TREE (a checkout of an older commit, e.g.
# `git worktree add /tmp/old COMMIT`) and this tree, ROUNDS rounds, each server started afresh on port 8768.
#   bash loadtest/ab_servers.sh OLD_TREE OUT_DIR ROUNDS CLIENT [ARGS...]
# CLIENT runs against each server with WHICH (old or new), ROUND and OUT (OUT_DIR) in its environment; its output
# goes to OUT_DIR/WHICH_ROUND.txt and the server's log to OUT_DIR/serve_WHICH.log. PYTHON (default: python from
# PATH) runs both servers. Each server is stopped by its own process id, also when this script is interrupted.
set -uo pipefail
old_tree=$1; out=$2; rounds=$3; shift 3
new_tree=$(git rev-parse --show-toplevel)
python=$(command -v "${PYTHON:-python}") || { echo "no python: ${PYTHON:-python}" >&2; exit 1; }
[[ $python = /* ]] || python=$PWD/$python  # the servers run from the trees
port=8768
server=
stop_server() {  # SIGTERM to the server this script started, then wait until it has exited (the port is free)
  if [ -n "$server" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; server=; fi
}
trap stop_server EXIT
trap 'exit 130' INT TERM
mkdir -p "$out"
for round in $(seq 1 "$rounds"); do
  for which in old new; do
    tree=$new_tree; [ "$which" = old ] && tree=$old_tree
    (cd "$tree" && exec "$python" -m service.cli.entry serve --port "$port") > "$out/serve_$which.log" 2>&1 < /dev/null &
    server=$!
    until curl -s "localhost:$port/ready" | grep -q true; do
      kill -0 "$server" 2>/dev/null || { echo "the $which server exited, see $out/serve_$which.log" >&2; exit 1; }
      sleep 2
    done
    WHICH=$which ROUND=$round OUT=$out "$@" > "$out/${which}_$round.txt" 2>&1
    stop_server
  done
done

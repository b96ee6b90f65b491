#!/usr/bin/env bash
# Two versions of the service under the same locust load, alternated: OLD_TREE (a checkout of an older
# commit, e.g. `git worktree add /tmp/old COMMIT`) and this tree, ROUNDS rounds of 60 s each, on port 8768.
#   bash scripts/locust_ab.sh /tmp/old OUT_DIR [ROUNDS]
# Writes OUT_DIR/{old,new}_ROUND_stats.csv (locust's CSV).
set -uo pipefail
old_tree=$1; out=$2; rounds=${3:-2}
new_tree=$(git rev-parse --show-toplevel)
python=${PYTHON:-python}
mkdir -p "$out"
for round in $(seq 1 "$rounds"); do
  for which in old new; do
    tree=$new_tree; [ "$which" = old ] && tree=$old_tree
    (cd "$tree" && setsid nohup "$python" -m service.cli serve --port 8768 > "$out/serve_$which.log" 2>&1 < /dev/null &)
    for _ in $(seq 1 90); do sleep 2; curl -s localhost:8768/ready | grep -q true && break; done
    timeout 120 locust -f "$new_tree/loadtest/locustfile.py" --headless -u 8 -r 8 -t 60s \
      --host http://127.0.0.1:8768 --csv "$out/${which}_$round" > /dev/null 2>&1
    pkill -f "service.cli serve --port 8768"; sleep 3
  done
done

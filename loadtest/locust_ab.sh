#!/usr/bin/env bash
# Two versions of the service under the same locust load (8 users, 60 s per round), alternated (loadtest/ab_servers.sh).
#   bash loadtest/locust_ab.sh OLD_TREE OUT_DIR [ROUNDS]
# Writes OUT_DIR/{old,new}_ROUND_stats.csv (locust's CSV).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/ab_servers.sh" "$1" "$2" "${3:-2}" sh -c 'timeout 120 locust -f "$0" --headless -u 8 -r 8 -t 60s \
  --host http://127.0.0.1:8768 --csv "$OUT/${WHICH}_$ROUND"' "$here/locustfile.py"

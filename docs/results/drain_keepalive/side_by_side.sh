#!/bin/bash
# usage: side_by_side.sh CHECKOUT PORT THREADS
# Serves the embedded default from CHECKOUT (on PYTHONPATH, this venv's python) with --drain-seconds 1, runs
# keep_alive_clients.py against it (SIGTERM after 3 s), prints its line.
here=$(cd "$(dirname "$0")" && pwd) tree=$1 port=$2 threads=$3
cd "$tree" || exit 2
HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES= PYTHONPATH=$tree setsid python -m service.cli.entry serve --port "$port" \
    --drain-seconds 1 > "/tmp/drain_keepalive.$port.log" 2>&1 &
pid=$!
for _ in $(seq 1 240); do
  curl -s -o /dev/null -w '%{http_code}' "localhost:$port/ready" 2>/dev/null | grep -q 200 && break
  sleep 0.5
done
python "$here/keep_alive_clients.py" "$port" "$pid" "$threads" 2>&1 | tail -1
wait "$pid"

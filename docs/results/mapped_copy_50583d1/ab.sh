#!/bin/bash
# Two loraswap servers side by side under one `loraswap side-by-side` run: A from tree $1, B from tree $2 (each with
# the environment in AENV / BENV), each started afresh, peak RSS by --pid. The rest: side-by-side options, e.g.
#   bash ab.sh /tmp/old /work/main --questions 96 --rounds 2 --warmup 0 --cache-prompt          (defaults)
#   LORASWAP_PREFIX_CACHE_BYTES=0 bash ab.sh /tmp/old /work/main --questions 48 --rounds 2      (caching off)
# (run at 467d1db with /work/main/.venv, before side-by-side had kind loraswap-free: kind loraswap was free decoding)
a=$1; b=$2; shift 2
export CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1
python=${PYTHON:-/work/main/.venv/bin/python}
(cd "$a" && exec env $AENV "$python" -m service.cli.entry serve --port 8392) > /tmp/ab_a.log 2>&1 &
A=$!
(cd "$b" && exec env $BENV "$python" -m service.cli.entry serve --port 8393) > /tmp/ab_b.log 2>&1 &
B=$!
trap 'kill $A $B; wait' EXIT
until curl -s localhost:8392/ready | grep -q true && curl -s localhost:8393/ready | grep -q true; do sleep 1; done
"$python" -m service.cli.entry side-by-side --system a=loraswap-free@http://127.0.0.1:8392 \
  --system b=loraswap-free@http://127.0.0.1:8393 --pid a=$A --pid b=$B "$@"

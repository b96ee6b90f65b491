#!/usr/bin/env bash
# llama.cpp's llama-server (F32, built and converted as docs/llamacpp.md says) beside loraswap servers, each started
# afresh, under one alternated `loraswap side-by-side` run; every server is stopped by its own process id at the end.
#   bash loadtest/side_by_side_servers.sh CACHING OUT_DIR NAME=TREE[,FLAG...] ... [-- SIDE_BY_SIDE_OPTION...]
# CACHING is off (llama-server's three cache flags, LORASWAP_PREFIX_CACHE_BYTES=0) or on (each server's defaults,
# --cache-prompt). Each NAME=TREE is a loraswap server run from the checkout TREE with the serve flags after it, comma
# separated (e.g. nomerge=.,--no-auto-merge or old=/tmp/old), on ports 8000 and up; each llama-server is llama_NAME on
# 8081 and up, NAME=GGUF for each of LLAMA_MODELS (split at spaces; default f32=gguf/smollm2-135m-instruct-f32.gguf, a
# path under LLAMACPP, e.g. "f32=gguf/smollm2-135m-instruct-f32.gguf bf16=gguf/smollm2-135m-instruct-bf16.gguf").
# The report goes to OUT_DIR/side_by_side.{json,md}, the servers' logs beside it. LLAMACPP (default /tmp/llamacpp)
# holds build/ and gguf/; LLAMA_FLAGS, more llama-server flags (split at spaces, e.g. its speculative decoding:
# "--spec-type ngram-simple"); PYTHON (default: python from PATH) runs loraswap.
set -uo pipefail
caching=$1; out=$(realpath -m "$2"); shift 2
llamacpp=${LLAMACPP:-/tmp/llamacpp}
python=$(command -v "${PYTHON:-python}") || { echo "no python: ${PYTHON:-python}" >&2; exit 1; }
[[ $python = /* ]] || python=$PWD/$python  # the servers run from their trees
flags=(--lora gguf/squad-f32.gguf,gguf/nli-f32.gguf --lora-init-without-apply -t 2 -np 8 -c 8192 --host 127.0.0.1)
read -r -a more <<< "${LLAMA_FLAGS:-}"
flags+=("${more[@]}")
options=()
case $caching in
  off) flags+=(--no-cache-prompt --cache-reuse 0 --cache-ram 0); export LORASWAP_PREFIX_CACHE_BYTES=0 ;;
  on) options+=(--cache-prompt) ;;
  *) echo "CACHING is off or on, not $caching" >&2; exit 2 ;;
esac
# no bound on the wait in the queue (--max-queue-wait): a benchmark measures every request, it sheds none
export CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1 LORASWAP_MAX_QUEUE_WAIT=0
mkdir -p "$out"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT
read -r -a models <<< "${LLAMA_MODELS:-f32=gguf/smollm2-135m-instruct-f32.gguf}"
port=8081
for model in "${models[@]}"; do
  name=llama_${model%%=*}
  (cd "$llamacpp" && exec build/bin/llama-server -m "${model#*=}" "${flags[@]}" --port $port) > "$out/$name.log" 2>&1 &
  pids+=($!)
  options+=(--system "$name=llamacpp@http://127.0.0.1:$port" --pid "$name=$!")
  port=$((port + 1))
done
port=8000
while [ $# -gt 0 ] && [ "$1" != -- ]; do
  name=${1%%=*}; IFS=, read -r -a spec <<< "${1#*=}"; shift
  (cd "${spec[0]}" && exec "$python" -m service.cli.entry serve --port "$port" "${spec[@]:1}") > "$out/$name.log" 2>&1 &
  pids+=($!)
  options+=(--system "$name=loraswap-free@http://127.0.0.1:$port" --pid "$name=$!")
  until curl -s "localhost:$port/ready" | grep -q true; do
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "$name exited, see $out/$name.log" >&2; exit 1; }
    sleep 2
  done
  port=$((port + 1))
done
[ "${1:-}" = -- ] && shift
for ((port = 8081; port < 8081 + ${#models[@]}; port++)); do
  until curl -s "localhost:$port/health" | grep -q ok; do sleep 1; done
done
uptime
"$python" -m service.cli.entry side-by-side "${options[@]}" "$@" --json "$out/side_by_side.json" \
  --markdown "$out/side_by_side.md"
uptime

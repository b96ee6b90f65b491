#!/usr/bin/env bash
# What produced the shipped adapters and the GPU figures in docs/: train, evaluate, benchmark.
# Runs on the GPU machine after staging (../shared/GPU.md), from the repository root:
#   . /root/stage/env.sh && LORASWAP_DATA_DIR=/root/data bash scripts/gpu_pipeline.sh /root/results [STAGE...]
# Stages (default: all, in this order): train_squad train_nli eval_squad bench zero_shot decoding qlora sweep
# serve_nf4 (not in the default: the server in 4-bit NF4 under loraswap loadtest). The subcommands are found through
# the project's entry points: install a wheel of this tree there (pip wheel --no-deps .) with the staged wheels, and,
# for serve_nf4, locust and its needs (docs/results/gpu_nf4_h200/runs.md)
set -uo pipefail
results=${1:-results}
shift || true
mkdir -p "$results"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
loraswap() { python -m service.cli.entry "$@"; }
step() { echo "== $(date +%T) $*"; }

train_squad() {
  loraswap train --task squad --out "$results/squad" --rank 16 --alpha 32 --target-modules all_linear \
    --lr 5e-4 --epochs 1 --max-examples 24000 --batch-size 32 --max-length 384 --eval-examples 300 > "$results/train_squad.log" 2>&1
}
train_nli() {
  loraswap train --task nli --out "$results/nli" --rank 16 --alpha 32 --target-modules all_linear \
    --lr 5e-4 --epochs "${NLI_EPOCHS:-1}" --batch-size 32 --max-length 256 --eval-examples 300 > "$results/train_nli.log" 2>&1
  loraswap eval --task nli --adapter "$results/nli" --max-batch 256 --json "$results/eval_nli.json" > "$results/eval_nli.log" 2>&1
}
eval_squad() {
  loraswap eval --task squad --adapter "$results/squad" --max-batch 256 --json "$results/eval_squad.json" \
    --predictions "$results/predictions_squad.json" > "$results/eval_squad.log" 2>&1
}
bench() {
  loraswap bench --device cuda --batch-sizes 1,16,64,256 --adapters 16 --prompt-tokens 192 --new-tokens 16 \
    --rounds 3 --json "$results/bench_cuda.json" "$@" > "$results/bench_cuda.log" 2>&1
}
zero_shot() {
  loraswap eval --task nli --adapter none --max-batch 256 --json "$results/eval_nli_base.json" > "$results/eval_nli_base.log" 2>&1
  loraswap eval --task squad --adapter none --max-batch 256 --json "$results/eval_squad_base.json" > "$results/eval_squad_base.log" 2>&1
}
decoding() {  # the squad adapter (trained here, or the shipped one) on a seeded sample of 1,000 dev questions
  # (--limit; before commit e5ee73d the first 1,000, as in docs/quality.md)
  local adapter=$results/squad
  [ -d "$adapter" ] || adapter=adapters/squad
  mkdir -p "$results/decoding"
  for spec in greedy top_k:10 top_k:25 top_k:50 nucleus:0.8 nucleus:0.9 nucleus:0.95 temperature:0.7 temperature:1.3; do
    strategy=${spec%%:*}; value=${spec#*:}
    case $strategy in
      top_k) extra=(--top-k "$value" --temperature 1.0) ;;
      nucleus) extra=(--top-p "$value" --temperature 1.0) ;;
      temperature) extra=(--temperature "$value") ;;
      *) extra=() ;;
    esac
    [ -f "$results/decoding/${spec/:/_}.json" ] && continue
    loraswap eval --task squad --adapter "$adapter" --limit 1000 --strategy "$strategy" "${extra[@]}" \
      --max-batch 256 --json "$results/decoding/${spec/:/_}.json" > /dev/null 2>> "$results/decoding.log"
  done
}
qlora() {  # QLoRA: 4-bit NF4 base, a short run on 4,000 questions, evaluated on the 4-bit base
  loraswap train --task squad --quantize nf4 --out "$results/qlora_squad" --rank 16 --alpha 32 --target-modules all_linear \
    --lr 5e-4 --max-examples 4000 --batch-size 32 --max-length 384 --eval-examples 200 > "$results/train_qlora.log" 2>&1
  loraswap eval --task squad --adapter "$results/qlora_squad" --quantize nf4 --limit 1000 --max-batch 256 \
    --json "$results/eval_qlora_squad.json" > "$results/eval_qlora.log" 2>&1
}
sweep() {
  loraswap sweep --task squad --out "$results/sweep" --ranks 4,16,64 --lrs 7e-5,1e-3 --targets all_linear,attention \
    --max-steps 100 --batch-size 16 --max-examples 3200 --eval-examples 200 --eval-every 0.5 > "$results/sweep.log" 2>&1
}
serve_ready() {  # PORT PID: wait until the server on PORT says ready (0), or its process PID has exited (1)
  until python -c "import sys, urllib.request as u; sys.exit(b'true' not in u.urlopen('http://127.0.0.1:$1/ready').read())" \
      2> /dev/null; do
    kill -0 "$2" 2> /dev/null || return 1
    sleep 2
  done
}
serve_nf4() {  # SmolLM2 in 4-bit NF4 with the shipped adapters, loraswap loadtest's scenarios at 1 and 64 users
  # and plain locust on the shipped adapters (LOADTEST_SECONDS each, default 30; USERS, SCENARIOS and LOCUST=0 narrow
  # it; SERVE_FLAGS adds to the server's; QUANTIZE=none for a trial where bitsandbytes cannot run); GPU memory by
  # nvidia-smi at ready and every second after; the server's /metrics at its end
  local root=$results/loadtest_adapters port=8000 key=gpu-loadtest server users scenario
  mkdir -p "$root"
  # exec: $! is the server's own process, which the stage stops at its end
  (exec python -m service.cli.entry serve --quantize "${QUANTIZE:-nf4}" --adapter-roots "$root" --admin-key "$key" \
    --port $port --max-batch 64 ${SERVE_FLAGS:-}) > "$results/serve_nf4.log" 2>&1 < /dev/null &
  server=$!
  serve_ready $port $server || { echo "the server exited, see $results/serve_nf4.log"; return 1; }
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$results/gpu_memory_ready.csv" 2>&1
  while kill -0 $server 2> /dev/null; do nvidia-smi --query-gpu=memory.used --format=csv,noheader; sleep 1; done \
    > "$results/gpu_memory_trace.txt" 2>&1 &
  for users in ${USERS:-1 64}; do
    for scenario in ${SCENARIOS:-uniform zipf}; do
      step "loadtest $scenario $users"
      LORASWAP_ADMIN_KEY=$key loraswap loadtest --scenario $scenario --users $users --duration "${LOADTEST_SECONDS:-30}" \
        --host http://127.0.0.1:$port --adapter-root "$root" --source squad \
        --json "$results/loadtest_${scenario}_$users.json" --md "$results/loadtest_${scenario}_$users.md" \
        > "$results/loadtest_${scenario}_$users.log" 2>&1
      echo "exit status $?" >> "$results/loadtest_${scenario}_$users.log"
    done
    [ "${LOCUST:-1}" = 0 ] && continue
    step "locust on the shipped adapters, $users users"  # loadtest/locustfile.py: /answer and /nli, adapters squad, nli
    python -m locust -f loadtest/locustfile.py --headless --users $users --spawn-rate $users \
      --run-time "${LOADTEST_SECONDS:-30}s" --host http://127.0.0.1:$port --csv "$results/locust_shipped_$users" \
      --only-summary > "$results/locust_shipped_$users.log" 2>&1
  done
  python -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$port/metrics').read().decode())" \
    > "$results/metrics_nf4.txt"
  kill $server; wait $server
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(train_squad train_nli eval_squad bench zero_shot decoding qlora sweep)
for stage in "${stages[@]}"; do
  step "$stage"
  "$stage"
done
step done

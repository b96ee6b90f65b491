#!/usr/bin/env bash
# What produced the shipped adapters and the GPU figures in docs/: train, evaluate, benchmark.
# Runs on the GPU machine after staging (../shared/GPU.md), from the repository root:
#   . /root/stage/env.sh && LORASWAP_DATA_DIR=/root/data bash scripts/gpu_pipeline.sh /root/results
set -uo pipefail
results=${1:-results}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
loraswap() { python -m service.cli "$@"; }
step() { echo "== $(date +%T) $*"; }

step train squad
loraswap train --task squad --out "$results/squad" --rank 16 --alpha 32 --target-modules all_linear \
  --lr 5e-4 --epochs 1 --max-examples 24000 --batch-size 32 --max-length 384 --eval-examples 300 > "$results/train_squad.log" 2>&1
step train nli
loraswap train --task nli --out "$results/nli" --rank 16 --alpha 32 --target-modules all_linear \
  --lr 5e-4 --epochs 1 --batch-size 32 --max-length 256 --eval-examples 300 > "$results/train_nli.log" 2>&1

step eval adapters
loraswap eval --task squad --adapter "$results/squad" --max-batch 256 --json "$results/eval_squad.json" \
  --predictions "$results/predictions_squad.json" > "$results/eval_squad.log" 2>&1
loraswap eval --task nli --adapter "$results/nli" --max-batch 256 --json "$results/eval_nli.json" > "$results/eval_nli.log" 2>&1

step bench
loraswap bench --device cuda --batch-sizes 1,16,64,256 --adapters 16 --prompt-tokens 192 --new-tokens 16 \
  --json "$results/bench_cuda.json" > "$results/bench_cuda.log" 2>&1

step eval zero-shot base nli
loraswap eval --task nli --adapter none --max-batch 256 --json "$results/eval_nli_base.json" > "$results/eval_nli_base.log" 2>&1

step decoding table
for spec in greedy top_k:10 top_k:25 top_k:50 nucleus:0.8 nucleus:0.9 nucleus:0.95 temperature:0.7 temperature:1.3; do
  strategy=${spec%%:*}; value=${spec#*:}
  case $strategy in
    top_k) extra=(--top-k "$value" --temperature 1.0) ;;
    nucleus) extra=(--top-p "$value" --temperature 1.0) ;;
    temperature) extra=(--temperature "$value") ;;
    *) extra=() ;;
  esac
  loraswap eval --task squad --adapter "$results/squad" --limit 1000 --strategy "$strategy" "${extra[@]}" \
    --max-batch 256 --json "$results/decoding_${spec/:/_}.json" > /dev/null 2>> "$results/decoding.log"
done
step eval zero-shot base squad
loraswap eval --task squad --adapter none --max-batch 256 --json "$results/eval_squad_base.json" > "$results/eval_squad_base.log" 2>&1
step done

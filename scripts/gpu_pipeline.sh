#!/usr/bin/env bash
# What produced the shipped adapters and the GPU figures in docs/: train, evaluate, benchmark.
# Runs on the GPU machine after staging (../shared/GPU.md), from the repository root:
#   . /root/stage/env.sh && LORASWAP_DATA_DIR=/root/data bash scripts/gpu_pipeline.sh /root/results [STAGE...]
# Stages (default: all, in this order): train_squad train_nli eval_squad bench zero_shot decoding qlora sweep
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

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(train_squad train_nli eval_squad bench zero_shot decoding qlora sweep)
for stage in "${stages[@]}"; do
  step "$stage"
  "$stage"
done
step done

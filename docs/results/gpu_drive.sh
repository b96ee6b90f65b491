#!/bin/bash
# GPU session driver (a copy of the git-ignored .gpu/drive/drive.sh; .gpu/alt/dense_prompts.patch is docs/results/dense_prompts_ab/dense_prompts.patch,
# .gpu/alt/no_groups.patch is docs/results/input_groups_ab/no_groups.patch, .gpu/alt/fused_base.patch is
# docs/results/fused_base_ab/fused_base.patch):
#   bash .gpu/drive/drive.sh STAGE... ; results land in $OUT
. /root/stage/env.sh
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 LORASWAP_DATA_DIR=$PWD/.gpudata
B="python -m service.cli bench --device cuda --adapters 16 --prompt-tokens 192 --new-tokens 16"
# the shipped code against it with .gpu/alt/$1.patch applied, alternated twice: base and mixed at 64 and 256
ab_patch() {
  rm -rf /root/alt && mkdir /root/alt && cp -r service loadtest training pyproject.toml /root/alt/ && \
  (cd /root/alt && patch -p0 < $OLDPWD/.gpu/alt/$1.patch >/dev/null)
  for round in 1 2; do for variant in shipped $1; do
    root=$PWD; [ $variant = $1 ] && root=/root/alt
    (cd $root && PYTHONPATH=$root:$PYTHONPATH timeout 250 $B --modes hf_base,base,mixed --batch-sizes 64,256 --rounds 10 \
      --hot-loads 0 --registered 0 --json $OUT/ab_${1}_${variant}_$round.json > $OUT/ab_${1}_${variant}_$round.log 2>&1)
    tail -3 $OUT/ab_${1}_${variant}_$round.log
  done; done
}
for stage in "$@"; do
  echo "== $(date +%T) $stage" | tee -a $OUT/progress
  case $stage in
    tests) python -m pip install -q --no-index --no-deps --target /root/site .gpu/pytest/*.whl 2>&1 | tail -2
           timeout 300 python -m pytest -q -p no:cacheprovider tests/test_decode_step.py > $OUT/pytest_cuda.log 2>&1; tail -3 $OUT/pytest_cuda.log ;;
    stall_chunked) timeout 300 $B --modes mixed --batch-sizes 1 --rounds 1 --registered 0 --prefill-chunk 64 \
           --json $OUT/bench_cuda_stall_chunked.json > $OUT/bench_cuda_stall_chunked.log 2>&1; tail -3 $OUT/bench_cuda_stall_chunked.log ;;
    full) timeout 560 $B --batch-sizes 1,16,64,256 --rounds 3 --json $OUT/bench_cuda.json > $OUT/bench_cuda.log 2>&1; tail -4 $OUT/bench_cuda.log ;;
    ratios) timeout 300 $B --modes hf_base,base,mixed --batch-sizes 64,256 --rounds 20 --hot-loads 0 --registered 0 \
           --json $OUT/bench_cuda_ratios.json > $OUT/bench_cuda_ratios.log 2>&1; tail -2 $OUT/bench_cuda_ratios.log ;;
    ab_gathered) timeout 300 $B --modes base,mixed --batch-sizes 16,64 --rounds 10 --registered 0 \
           --json $OUT/bench_cuda_prompts_gathered.json > $OUT/bench_cuda_prompts_gathered.log 2>&1; tail -3 $OUT/bench_cuda_prompts_gathered.log ;;
    ab_dense) rm -rf /root/alt && mkdir /root/alt && cp -r service loadtest training pyproject.toml /root/alt/ && \
           (cd /root/alt && patch -p0 < $OLDPWD/.gpu/alt/dense_prompts.patch && PYTHONPATH=/root/alt:$PYTHONPATH timeout 300 $B \
           --modes base,mixed --batch-sizes 16,64 --rounds 10 --registered 0 \
           --json $OUT/bench_cuda_prompts_dense.json > $OUT/bench_cuda_prompts_dense.log 2>&1); tail -3 $OUT/bench_cuda_prompts_dense.log ;;
    profile) timeout 300 python scripts/profile_hot_load.py --device cuda --loads 30 > $OUT/profile_hot_load.log 2>&1; grep " ms$" $OUT/profile_hot_load.log ;;
    stall) timeout 300 $B --modes mixed --batch-sizes 1 --rounds 1 --registered 0 \
           --json $OUT/bench_cuda_stall.json > $OUT/bench_cuda_stall.log 2>&1; tail -1 $OUT/bench_cuda_stall.log ;;
    ab_stall) rm -rf /root/alt && mkdir /root/alt && cp -r service loadtest training pyproject.toml /root/alt/ && \
           (cd /root/alt && patch -p0 < $OLDPWD/.gpu/alt/dense_prompts.patch >/dev/null)
           for round in 1 2; do for variant in gathered dense; do
             root=$PWD; [ $variant = dense ] && root=/root/alt
             (cd $root && PYTHONPATH=$root:$PYTHONPATH timeout 200 $B --modes base,mixed --batch-sizes 16,64 --rounds 5 --registered 0 \
               --json $OUT/ab_${variant}_$round.json > $OUT/ab_${variant}_$round.log 2>&1); tail -2 $OUT/ab_${variant}_$round.log
           done; done ;;
    ab_gil) for variant in new control; do
             interval=0.0005; [ $variant = control ] && interval=0.005
             timeout 150 python -c "import sys, service.engine as e; e.GIL_SWITCH_SECONDS = $interval; from service.cli import main; sys.exit(main(sys.argv[1:]))" \
               bench --device cuda --adapters 16 --prompt-tokens 192 --new-tokens 16 --modes mixed --batch-sizes 1 --rounds 1 --registered 0 \
               --json $OUT/gil_$variant.json > $OUT/gil_$variant.log 2>&1; tail -1 $OUT/gil_$variant.log
           done ;;
    ab_groups) ab_patch no_groups ;;
    ab_fused) ab_patch fused_base ;;
  esac
done
echo "== $(date +%T) done" | tee -a $OUT/progress

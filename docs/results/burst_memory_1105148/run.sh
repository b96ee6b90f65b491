#!/bin/bash
# alternated: old (dd2c6e1) and new (HEAD) checkouts, same venv
export CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1
PY=/work/main/.venv/bin/python
for round in 1 2; do
  for tree in /tmp/old /work/main; do
    cd $tree
    echo "== $tree round $round mixed"
    $PY -c "from service.cli.main import main; import sys; sys.exit(main(sys.argv[1:]))" bench --device cpu --modes base,mixed --batch-sizes 16,32 --hot-loads 0 --registered 0 --rounds 2 2>&1 | grep '"mode"\|^|'
    echo "== $tree round $round memory"
    $PY -c "from service.cli.main import main; import sys; sys.exit(main(sys.argv[1:]))" bench --device cpu --modes single --batch-sizes 32 --rank 64 --targets all_linear --hot-loads 0 --registered 0 --prompt-tokens 192 --new-tokens 16 --rounds 1 2>&1 | grep '"mode"'
  done
done

#!/usr/bin/env bash
# Needs uv (pip install uv). Writes requirements/lock.txt: every dependency of loraswap and its extras, pinned, for Python 3.11 on x86_64
# Linux. README and .ci/run install with `-c requirements/lock.txt`, so installs are the same until the lock is
# compiled again, on purpose: `bash requirements/compile.sh --upgrade` (or --upgrade-package NAME), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
exec uv pip compile pyproject.toml --all-extras --constraint requirements/torch-cpu.txt \
    --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --output-file requirements/lock.txt "$@"

#!/usr/bin/env bash
# Set up (first run only; re-runs are free) and run the default, hermetic, CPU-only test suite.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/deploy/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two pytest-xdist workers by default (FEDBRIDGE_TEST_WORKERS=N for another count, 0 for one process). Most tests wait
# on the processes they start, so a second worker roughly halves the run even on two cores. `--dist loadfile` keeps a
# file's tests on one worker (module fixtures are built once); tests/conftest.py starts the longest files first.
workers=${FEDBRIDGE_TEST_WORKERS:-2}
par=()
if [ "$workers" != "0" ]; then
  par=(-n "$workers" --dist loadfile --no-loadscope-reorder)
fi
exec "$root/.venv/bin/python" -m pytest "${par[@]}" "$@"

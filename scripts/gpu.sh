#!/usr/bin/env bash
# One GPU window, one command: fail-fast CUDA checks, short benchmarks, then Table 4 at one seed, inside
# a hard time budget of BUDGET_S seconds (the phases, the plan and the files: scripts/gpu_window.py).
#   bash scripts/gpu.sh 540                  # on a GPU machine, with SAM_CIFAR10_JPEG=<the JPEG CIFAR-10 folder>
#   bash scripts/gpu.sh 540 --plan           # what would run in 540 s, every command printed, nothing run
#   bash scripts/gpu.sh 100000 --dry-run     # every phase on the CPU with tiny settings (tests/test_gpu_window.py)
# Results in $OUT (default results/bench/gpu-<date>), 8 files at most. Then:
#   for f in $OUT/*.jsonl; do cat "$f" >> results/bench/$(basename "$f"); done; tar -xzf $OUT/table4_runs.tar.gz -C results/runs/ && make table
# PYTHON picks the interpreter (default python3: the one the project is installed into).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_window.py" "$@"

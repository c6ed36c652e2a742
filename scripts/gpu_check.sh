#!/usr/bin/env bash
# The GPU check, as ONE device call (about 8 minutes on an H100); run from the project root:
#   here, once: put into .devcarry/ the Hydra/OmegaConf wheels the GPU image lacks, the JPEG CIFAR-10
#   archive and a gpu_setup.sh that installs them offline and exports SAM_CIFAR10_JPEG (your machine's
#   staging step: not part of this project)
#   device run: source .devcarry/gpu_setup.sh && bash scripts/gpu_check.sh     (carry [".devcarry"])
# Writes everything under $OUT (the device tool brings it back) or results/bench/gpu-<date>.
# Then copy $OUT/*.jsonl into results/bench/ and the run logs under $OUT/runs into results/runs/.
# Table 4 (issue 9) is its own device call of about 10 minutes: scripts/gpu_table4.sh.
set -uo pipefail
OUT=${OUT:-results/bench/gpu-$(date +%Y%m%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# 1. The checks only a GPU can make: no host sync in the SAM step and in the loader, CUDA replay.
python3 -m pytest -q -p no:cacheprovider tests/test_sam.py tests/test_loaders.py tests/test_stochastic.py \
  -k "cuda or synchron" 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"

# 2. Step and end-to-end benchmarks (issue 2 and 3 targets), side by side in one process each.
timeout 420 python3 scripts/bench_step.py --device cuda --suite gpu --out "$OUT"   # + per-device rows (issue 8)
timeout 180 python3 scripts/bench_engine.py --device cuda --out "$OUT"
# packed runs (issue 9): packs of 1, 8, 16 ResNet-32 against as many solo runs, with a profile of the pack of 16
timeout 180 python3 scripts/bench_pack.py --device cuda --sizes 1,8,16 --steps 10 --out "$OUT" --profile "$OUT"

# 3. A short real-data run per optimizer on the JPEG CIFAR-10 (a budget run: labelled as such).
if [[ -n "${SAM_CIFAR10_JPEG:-}" ]]; then
  timeout 240 sam-train -m dataset=cifar10 dataset.source=folder dataset.root="$SAM_CIFAR10_JPEG" \
    model=wrn16_4 epochs=10 batch_size=256 optim=sgd,sam seed=0 name=budget_h100_cifar10jpeg_wrn16_4 \
    runs_root="$OUT/runs" engine.progress=false 2>&1 | grep -E "epoch|error" | tail -25
  find "$OUT/runs" -name checkpoint.pt -delete
  tar -czf "$OUT/runs.tar.gz" -C "$OUT" runs && rm -rf "$OUT/runs"
fi
ls -la "$OUT"

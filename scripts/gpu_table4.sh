#!/usr/bin/env bash
# Table 4 of the SAM paper in ONE GPU call of about 10 minutes: the presets as they stand
# (ResNet-32, 200 epochs, batch 256 in devices of 32, 20/40/60/80 % symmetric noise) x {SAM, SGD},
# trained as packed runs (hydra/launcher=pack: the 4 SAM runs are one pack, the 4 SGD runs another),
# seed 0 first, then further seeds while the time budget allows another whole seed. The data is the
# JPEG CIFAR-10 copy: these are BUDGET rows (not the official data), and the run directories say so.
#
#   here, once:  stage .devcarry/ as scripts/gpu_check.sh's header says (wheels, JPEG CIFAR-10, gpu_setup.sh)
#   device call: source .devcarry/gpu_setup.sh && bash scripts/gpu_table4.sh         (carry [".devcarry"])
#   CPU test:    SAM_CIFAR10_JPEG=/tmp/cifar10-jpeg OUT=/tmp/t4 bash scripts/gpu_table4.sh epochs=1 engine=cpu
#
# Extra arguments reach every sam-train call. Leaves in $OUT: table4_runs.tar.gz (the run
# directories without checkpoints, below <NAME>/), table4.log (the sweeps' output), gpu.txt.
# Commit:  tar -xzf $OUT/table4_runs.tar.gz -C results/runs/ && make table
set -uo pipefail
OUT=${OUT:-results/bench/gpu-table4-$(date +%Y%m%d)}
BUDGET_S=${BUDGET_S:-600}      # wall time for the training sweeps (the archive is made after)
MAX_SEEDS=${MAX_SEEDS:-5}
: "${SAM_CIFAR10_JPEG:?set SAM_CIFAR10_JPEG to the unpacked JPEG CIFAR-10 (gpu_setup.sh does)}"
SAM_TRAIN=${SAM_TRAIN:-sam-train}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
  NAME=${NAME:-budget_$(sed 's/.*\(H100\|H200\|A100\).*/\1/;q' "$OUT/gpu.txt" | tr 'A-Z' 'a-z')_cifar10jpeg_table4}
else
  echo "no GPU (a CPU test run)" > "$OUT/gpu.txt"
  NAME=${NAME:-budget_cpu_cifar10jpeg_table4_test}
fi
RUNS=$OUT/runs/$NAME
EXPERIMENTS=t4_cifar10_resnet32_noise20,t4_cifar10_resnet32_noise40,t4_cifar10_resnet32_noise60,t4_cifar10_resnet32_noise80

one_seed() {  # seed, seconds left, extra overrides: the 8 runs of Table 4 at one seed, one sweep (two packs of 4)
  # SIGINT at the budget: the pack marks its members interrupted (resumable), after their last epoch's files
  timeout --signal=INT --kill-after=60 "$2" "$SAM_TRAIN" -m hydra/launcher=pack experiment=$EXPERIMENTS \
    optim=sam,sgd seed="$1" dataset.source=folder dataset.root="$SAM_CIFAR10_JPEG" engine.progress=false \
    runs_root="$RUNS" "${@:3}"
}

start=$(date +%s)
seed=0
while (( seed < MAX_SEEDS )); do
  now=$(date +%s)
  left=$(( BUDGET_S - (now - start) ))
  # seed 0 always runs (cut at the budget: its metrics.jsonl keep what was done); another seed only
  # when the last one's duration (plus 10 %) fits in what is left
  if (( seed > 0 )) && (( last * 11 / 10 > left )); then
    echo "gpu_table4: $left s left, a seed takes about $last s: stopping after $seed seed(s)" | tee -a "$OUT/table4.log"
    break
  fi
  t0=$(date +%s)
  one_seed "$seed" "$left" "$@" 2>&1 | grep -E "pack of|runs alone|epoch [0-9]+/[0-9]+ .*test_err|sweep|error|Error" \
    >> "$OUT/table4.log"
  last=$(( $(date +%s) - t0 ))
  echo "gpu_table4: seed $seed took $last s" | tee -a "$OUT/table4.log"
  seed=$(( seed + 1 ))
done
tail -n 12 "$OUT/table4.log"

# the run directories, without checkpoints, as one archive (the device returns at most 8 files)
find "$OUT/runs" -name checkpoint.pt -delete
find "$OUT/runs" -name ".sweeps" -prune -exec rm -rf {} +
tar -czf "$OUT/table4_runs.tar.gz" -C "$OUT/runs" "$NAME" && rm -rf "$OUT/runs"
ls -la "$OUT"

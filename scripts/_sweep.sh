# Sourced by the table<N>.sh scripts. `run` executes one sam-train sweep, or prints it with DRY_RUN=1.
# Extra arguments given to a table script reach every sam-train call, e.g.
#   bash scripts/table1.sh hydra/launcher=slurm            # submit to SLURM (docs/cluster.md)
#   bash scripts/table1.sh hydra/launcher=joblib hydra.launcher.n_jobs=4   # 4 runs at once on one GPU
# Each configuration has its own run directory, so re-running a script resumes killed runs and
# skips completed ones.
set -euo pipefail
SEEDS=${SEEDS:-0,1,2,3,4}
SAM_TRAIN=${SAM_TRAIN:-sam-train}

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "$SAM_TRAIN -m $*"
  else
    "$SAM_TRAIN" -m "$@"
  fi
}

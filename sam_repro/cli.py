"""Entry points: `sam-train` (a Hydra app over configs/) and `sam-report`.

    sam-train experiment=t1_cifar10_wrn28_10_200ep augment=cutout optim=sam seed=0
    sam-train -m experiment=t4_cifar10_resnet32_noise40 optim=sgd,sam seed=0,1,2
    sam-train experiment=smoke                      # 20 s on a CPU, synthetic data
    sam-train --cfg job experiment=...              # print the composed config, run nothing
    sam-train engine.ddp=true experiment=...        # DistributedDataParallel over every visible GPU
    torchrun --nproc_per_node=8 $(which sam-train) experiment=...   # the same, launched by hand
    sam-train -m hydra/launcher=slurm experiment=... seed=0,1,2     # a sweep on SLURM (docs/cluster.md)

Exit status: 0 done (or already completed), 1 diverged or failed, 2 bad input (config, data, a run
directory that is busy, damaged or on a full disk), 143 stopped by SIGTERM (re-run to resume).
A sweep (-m) ends with one line per job status; it exits 1 when any job diverged or failed (2 when
every such job had bad input), naming them.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from sam_repro.config import config_dir, register_configs
from sam_repro.errors import EXIT_BAD_INPUT, EXIT_TERMINATED, Terminated, UserError, print_error, sigterm_interrupts

log = logging.getLogger("sam_repro")


def _train_task(cfg: DictConfig) -> Optional[int]:
    """One run: validate, then train into Hydra's output directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sam_repro.engine import distributed
    from sam_repro.engine.loop import fit
    from sam_repro.validate import validate

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        validate(cfg)  # before any data is read or any GPU touched
        if cfg.engine.ddp and not distributed.under_torchrun():
            # this job's own overrides (not a sweep's argv), into this job's run directory
            code = distributed.relaunch(cfg.engine.nproc, list(hydra_cfg.overrides.task), run_dir)
        else:
            with sigterm_interrupts():
                code = fit(cfg, run_dir)
    except UserError as err:
        print_error("sam-train", err)
        code = EXIT_BAD_INPUT
    except Terminated:
        log.error("%s: stopped by SIGTERM; re-run the same command to resume", run_dir)
        code = EXIT_TERMINATED
        if multirun:
            raise  # a terminated sweep stops: the rest of it has not been asked to run
    if code and not multirun:
        sys.exit(code)  # a sweep goes on past one bad run; its metrics.json says what happened
    return code


def train_main() -> None:
    """The `sam-train` console script."""
    import hydra
    from hydra.core.plugins import Plugins

    from hydra_plugins.sam_repro_pack_launcher.pack_launcher import PackLauncher

    register_configs()
    # hydra/launcher=pack: registered by hand, because Hydra's plugin scan walks hydra_plugins with
    # pkgutil, which does not see into an editable install (`pip install -e .`)
    Plugins.instance().register(PackLauncher)
    if int(os.environ.get("RANK", "0")) > 0:
        # ranks > 0 of a distributed run leave the run directory to rank 0: no .hydra/, no train.log
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(_train_task)
    try:
        app()
    except Terminated:  # a sweep stopped by SIGTERM: the job that was running recorded it
        sys.exit(EXIT_TERMINATED)
    from sam_repro import sweep

    if sweep.exit_code:  # a sweep with a diverged, failed or invalid job (sam_repro.sweep prints which)
        sys.exit(sweep.exit_code)


def report_main() -> None:
    """The `sam-report` console script."""
    from sam_repro.report.cli import main

    sys.exit(main(sys.argv[1:]))

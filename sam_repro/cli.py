"""Entry points: `sam-train` (a Hydra app over configs/) and `sam-report`.

    sam-train experiment=t1_cifar10_wrn28_10_200ep augment=cutout optim=sam seed=0
    sam-train -m experiment=t4_cifar10_resnet32_noise40 optim=sgd,sam seed=0,1,2
    sam-train experiment=smoke                      # 20 s on a CPU, synthetic data
    sam-train --cfg job experiment=...              # print the composed config, run nothing

Exit status: 0 done (or already completed), 1 diverged or failed, 2 bad input (config or data).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from sam_repro.config import config_dir, register_configs

EXIT_BAD_INPUT = 2
log = logging.getLogger("sam_repro")


def _fail(lines: list[str]) -> None:
    for line in lines:
        print(f"sam-train: error: {line}", file=sys.stderr)


def _train_task(cfg: DictConfig) -> Optional[int]:
    """One run: validate, then train into Hydra's output directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sam_repro.data import DataError
    from sam_repro.validate import ConfigError, validate

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    from sam_repro.engine.loop import RunDirError, fit

    try:
        validate(cfg)  # before any data is read or any GPU touched
        code = fit(cfg, Path(hydra_cfg.runtime.output_dir))
    except (ConfigError, DataError, RunDirError) as err:
        _fail(str(err).splitlines())
        code = EXIT_BAD_INPUT
    if code and not multirun:
        sys.exit(code)  # a sweep goes on past one bad run; its metrics.json says what happened
    return code


def train_main() -> None:
    """The `sam-train` console script."""
    import hydra

    register_configs()
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(_train_task)
    app()


def report_main() -> None:
    """The `sam-report` console script."""
    from sam_repro.report.cli import main

    sys.exit(main(sys.argv[1:]))

"""`hydra/launcher=pack`: a sweep's jobs that agree on everything that fixes tensor shapes and the
step are trained together, up to `size` at a time, as one vectorized model (sam_repro/engine/grid.py).

    sam-train -m hydra/launcher=pack experiment=t4_cifar10_resnet32_noise20,t4_cifar10_resnet32_noise40 optim=sam,sgd seed=0,1

Every job still gets what Hydra gives a job (its run directory, .hydra/, train.log, the sweep
callbacks): each pack member goes through Hydra's own `run_job` with a task that only records its
config and directory; then the pack trains them all and each job's return value is its exit code.
A job that cannot join a pack runs alone through the normal task, after one log line saying why.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger("sam_repro")


def _task_config(sweep_config: DictConfig) -> DictConfig:
    """The config the task function would get: the job's, without the hydra node."""
    cfg = copy.deepcopy(sweep_config)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


class PackLauncher(Launcher):
    """Configured by configs/hydra/launcher/pack.yaml (`size`: members per pack at most)."""

    def __init__(self, size: int = 8) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"hydra.launcher.size={size!r}: the most members per pack, an integer >= 1")
        self.size = size
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.sam_repro_pack_launcher.plan import plan_packs
        from sam_repro.validate import ConfigError, validate

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        sweep_configs = []
        for offset, overrides in enumerate(job_overrides):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = sweep_config.hydra.job.num = initial_job_idx + offset
            sweep_configs.append(sweep_config)
        task_configs: list[Optional[DictConfig]] = []
        for sweep_config in sweep_configs:
            cfg = _task_config(sweep_config)
            try:
                validate(cfg)
            except ConfigError:
                cfg = None  # the normal task reports it, alone
            task_configs.append(cfg)
        plan = plan_packs(task_configs, self.size)
        log.info("pack launcher: %d jobs -> %d packs and %d jobs alone", len(sweep_configs),
                 sum(why is None for _, why in plan), sum(why is not None for _, why in plan))
        returns: list[Optional[JobReturn]] = [None] * len(sweep_configs)
        for members, why in plan:
            if why is not None:
                i = members[0]
                log.info("job #%d runs alone: %s (%s)", initial_job_idx + i, why,
                         " ".join(filter_overrides(job_overrides[i])))
                returns[i] = self._run(sweep_configs[i], self.task_function)
            else:
                for i, ret in zip(members, self._run_pack([sweep_configs[i] for i in members])):
                    returns[i] = ret
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns

    def _run(self, sweep_config: DictConfig, task_function: TaskFunction) -> JobReturn:
        assert self.hydra_context is not None
        return run_job(hydra_context=self.hydra_context, task_function=task_function, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    def _run_pack(self, sweep_configs: list[DictConfig]) -> list[JobReturn]:
        """Hydra's job set-up for every member (run directory, .hydra/, the callbacks' job start), then
        one pack trains them; each JobReturn then carries its member's exit code."""
        from sam_repro.engine.loop import fit_pack
        from sam_repro.errors import print_error, sigterm_interrupts

        assert self.hydra_context is not None
        prepared: list[tuple[DictConfig, Path]] = []

        def prepare(cfg: DictConfig) -> None:
            prepared.append((cfg, Path(HydraConfig.get().runtime.output_dir)))

        returns = [self._run(sweep_config, prepare) for sweep_config in sweep_configs]
        assert self.config is not None  # back to the sweep's logging: run_job left the last member's file on
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        to_train = [j for j, (_, run_dir) in enumerate(prepared) if not _completed(run_dir)]
        for j in sorted(set(range(len(prepared))) - set(to_train)):
            log.info("%s already completed: skipped", prepared[j][1])
            returns[j].return_value = 0
        handlers = [logging.FileHandler(prepared[j][1] / "train.log") for j in to_train]
        for handler in handlers:  # the pack's lines go into every member's train.log
            handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
            log.addHandler(handler)
        try:
            with sigterm_interrupts():
                codes = fit_pack([prepared[j] for j in to_train]) if to_train else []
            for j, code in zip(to_train, codes):
                returns[j].return_value = code
        except Exception as err:  # bad data, or a crash: every member that was training says so
            print_error("sam-train", err)
            for j in to_train:
                returns[j].status, returns[j]._return_value = JobStatus.FAILED, err
        finally:
            for handler in handlers:
                log.removeHandler(handler)
                handler.close()
        for sweep_config, ret in zip(sweep_configs, returns):  # the sweep summary records the real outcome
            self.hydra_context.callbacks.on_job_end(config=sweep_config, job_return=ret)
        return returns


def _completed(run_dir: Path) -> bool:
    from sam_repro.rundir import read_summary

    return (read_summary(run_dir) or {}).get("status") == "completed"

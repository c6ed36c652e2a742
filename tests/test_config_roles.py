"""The roles the schema declares for its keys (sam_repro/config.py) against what reads them: the run
directory's name (Hydra's override_dirname), the resume check and the pack planner."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hydra_plugins.sam_repro_pack_launcher.plan import pack_key
from sam_repro.config import MEMBER, RESUME_FREE, UNNAMED, flatten, has_role, keys_with
from sam_repro.engine.loop import RunDirError, check_same_config
from tests.conftest import compose_config

NOT_SCHEMA = ["experiment", "hydra.run.dir", "hydra.sweep.dir", "hydra/launcher"]


def composed_keys() -> set[str]:
    flat = flatten(OmegaConf.to_container(compose_config(["experiment=smoke"]), resolve=True))
    return {prefix for key in flat for prefix in (".".join(key.split(".")[:i + 1]) for i in range(key.count(".") + 1))}


@pytest.mark.parametrize("role", [MEMBER, RESUME_FREE, UNNAMED])
def test_every_declared_key_is_a_key_of_the_composed_config(role: str) -> None:
    keys = composed_keys() | {"logger.tensorboard.dir", "logger.wandb.project", "logger.wandb.entity", "logger.wandb.group",
                              "logger.wandb.tags", "logger.wandb.mode", "logger.mlflow.tracking_uri", "logger.mlflow.experiment",
                              "logger.tensorboard", "logger.wandb", "logger.mlflow"}  # null until a tracker is chosen
    assert keys_with(role) and set(keys_with(role)) <= keys


def test_the_run_directory_name_leaves_out_exactly_the_unnamed_keys() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sam_repro.config import config_dir, register_configs

    unnamed = {"dataset.root": "/x", "engine.progress": "false", "engine.num_workers": 2, "resume": "never",
               "runs_root": "/tmp/r", "wait_for_lock": "true", "logger.wandb.project": "p", "name": "n",
               "engine.device": "cpu", "dataset.cache_dir": "/c"}
    named = {"optim.rho": 0.1, "seed": 3, "optim.m": 8, "sched.name": "step"}
    register_configs()
    GlobalHydra.instance().clear()
    overrides = ["experiment=smoke", "logger=wandb", *(f"{k}={v}" for k, v in {**unnamed, **named}.items())]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    assert list(cfg.hydra.job.config.override_dirname.exclude_keys) == [*NOT_SCHEMA, *keys_with(UNNAMED)]
    name = cfg.hydra.job.override_dirname
    assert name == ",".join(sorted(f"{k}={v}" for k, v in named.items()))
    assert all(has_role(k, UNNAMED) for k in unnamed) and not any(has_role(k, UNNAMED) for k in named)


def test_resume_accepts_a_change_of_every_resume_free_key_and_refuses_any_other() -> None:
    base = OmegaConf.to_container(compose_config(["experiment=smoke"]), resolve=True)
    free = {"dataset.root": "/moved", "data_root": "/elsewhere", "engine.num_workers": 3, "engine.progress": False,
            "model.checkpoint": "/w.pt", "resume": "must", "runs_root": "/r", "wait_for_lock": True}
    moved = OmegaConf.to_container(compose_config(["experiment=smoke", *(f"{k}={v}" for k, v in free.items())]), resolve=True)
    check_same_config(base, moved, Path("run"))  # no error
    assert all(has_role(k, RESUME_FREE) for k in free)
    for change in ("optim.rho=0.2", "engine.device=cuda", "seed=1", "model.name=resnet32"):
        other = OmegaConf.to_container(compose_config(["experiment=smoke", change]), resolve=True)
        with pytest.raises(RunDirError, match=change.split("=")[0]):
            check_same_config(base, other, Path("run"))


def test_runs_that_differ_only_in_member_keys_share_a_pack_key_and_no_other_key_does() -> None:
    base = ["experiment=smoke"]
    key = pack_key(compose_config(base))[0]
    members = {"seed": 4, "optim.lr": 0.3, "optim.rho": 0.2, "optim.weight_decay": 0.001, "optim.momentum": 0.8,
               "optim.nesterov": "false", "optim.grad_clip": 1.0, "optim.eta": 0.1, "dataset.label_noise": 0.4,
               "dataset.noise_seed": 2, "sched.name": "step", "name": "other", "method_rho.sam": 0.3}
    for k, v in members.items():
        assert has_role(k, MEMBER), k
        assert pack_key(compose_config([*base, f"{k}={v}"]))[0] == key, k
    for change in ("optim.m=16", "model.name=resnet32", "batch_size=64", "epochs=4", "optim.bn_stats=both",
                   "augment.cutout=8", "dataset.train_size=512", "engine.precision=fp64"):
        assert not has_role(change.split("=")[0], MEMBER)
        assert pack_key(compose_config([*base, change]))[0] != key, change


def test_a_key_added_to_the_schema_since_the_run_resumes_at_its_default_only() -> None:
    """A run directory from before a key existed was trained with what the key's default now says."""
    current = OmegaConf.to_container(compose_config(["experiment=smoke"]), resolve=True)
    saved = OmegaConf.to_container(compose_config(["experiment=smoke"]), resolve=True)
    del saved["optim"]["esam_beta"], saved["engine"]["pack_execution"]
    check_same_config(saved, current, Path("run"))  # both at their defaults: the old run's behaviour
    changed = OmegaConf.to_container(compose_config(["experiment=smoke", "optim.esam_beta=0.3"]), resolve=True)
    with pytest.raises(RunDirError, match="optim.esam_beta: None -> 0.3"):
        check_same_config(saved, changed, Path("run"))

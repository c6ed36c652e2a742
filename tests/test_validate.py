"""sam_repro.validate at the edges of every range: the last good value passes, the first bad one fails.

`test_configs.py` checks the message of a few bad values; here each numeric bound is pinned from
both sides, so a bound written `<` for `<=` (or a falsy check such as `not grad_clip`, which lets
0 through and silently turns clipping off) cannot pass.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
from omegaconf import OmegaConf, ValueNode, open_dict

from sam_repro.data import DATASETS
from sam_repro.models import list_models
from sam_repro.models.finetune import BOTH_WAYS
from sam_repro.validate import ConfigError, validate
from tests.conftest import compose_config, composed_shared

# (key, values that must fail, values that must pass); the base is the smoke preset (synthetic data).
BOUNDS = [
    ("optim.grad_clip", ["0", "-1.0"], ["null", "1e-6", "5.0"]),
    ("optim.momentum", ["1.0", "-0.1", "1.5"], ["0.0", "0.999"]),
    ("optim.lr", ["0", "-0.1"], ["1e-9"]),
    ("optim.weight_decay", ["-1e-9"], ["0", "5e-4"]),
    ("optim.rho", ["-1e-9"], ["0", "0.05"]),
    ("optim.eta", ["-1e-9"], ["0"]),
    ("optim.label_smoothing", ["1.0", "-0.1"], ["0", "0.999"]),
    ("dataset.label_noise", ["1.0", "-0.1"], ["0", "0.999"]),
    ("dataset.val_fraction", ["1.0", "-0.1"], ["0", "0.999"]),
    ("augment.padding", ["-1"], ["0", "4"]),
    ("augment.cutout", ["-1"], ["0", "16"]),
    ("epochs", ["0", "-1"], ["1"]),
    ("train_steps", ["0"], ["1", "null"]),
    ("sched.warmup_epochs", ["-0.5"], ["0", "0.5"]),
    ("sched.gamma", ["0", "1.01", "-0.2"], ["1.0", "0.2"]),
    ("engine.eval_batch_size", ["0"], ["1"]),
    ("engine.eval_every", ["0"], ["1", "3"]),
    ("engine.eval_every_steps", ["0"], ["1", "null"]),
    ("engine.num_workers", ["-1"], ["0"]),
    ("engine.nproc", ["0"], ["1", "null"]),
    ("engine.device", ["gpu", "cuda:", "cuda:x", "cpu:0"], ["auto", "cpu", "cuda", "cuda:3"]),
    # the SAM family's hyperparameters (smoke: optim.rho 0.05, optim.lr 0.05)
    ("optim.gsam_alpha", ["-1e-9"], ["0", "0.4"]),
    ("optim.gsam_rho_min", ["-1e-9", "0.0500001"], ["0", "0.05", "null"]),
    ("optim.gsam_lr_min", ["-1e-9", "0.0500001"], ["0", "0.05"]),
    ("optim.gsam_adaptive", ["asam", "true"], ["none", "pytorch", "jax"]),
    ("optim.esam_beta", ["0", "1.01"], ["1e-6", "1.0"]),
    ("optim.esam_gamma", ["0", "1.01"], ["1e-6", "1.0"]),
    ("optim.esam_selection", ["top"], ["strict", "topk"]),
    ("optim.esam_swp_draw", ["start"], ["end_of_step", "start_of_step"]),
    ("optim.esam_sharpness_bn", ["both"], ["update", "frozen"]),
    ("optim.fsam_sigma", ["-1e-9"], ["0", "1.0"]),
    ("optim.fsam_lambda", ["-1e-9", "1.0"], ["0", "0.999"]),
    ("optim.vasso_theta", ["-1e-9", "1.01"], ["0", "1.0"]),
    ("optim.samon_select", ["module"], ["type", "name"]),
    ("optim.sam_interval", ["0", "-1"], ["1", "10"]),
    ("optim.looksam_k", ["0"], ["1", "5"]),
    ("optim.looksam_alpha", ["-1e-9"], ["0", "0.7"]),
    ("optim.looksam_projection", ["layer"], ["model", "tensor"]),
    ("optim.rwp_alpha", ["-1e-9", "1.01"], ["0", "1.0"]),
    ("optim.rwp_gamma", ["-1e-9"], ["0", "0.01"]),
    ("optim.wsam_gamma", ["-1e-9", "1.0"], ["0", "0.999"]),
    ("optim.wsam_max_norm", ["0", "-1.0"], ["null", "1e-6", "1.0"]),
]
CASES = [(key, v, False) for key, bad, _ in BOUNDS for v in bad] + [(key, v, True) for key, _, good in BOUNDS for v in good]


def problems(*overrides: str) -> list[str]:
    try:
        validate(compose_config(["experiment=smoke", *overrides]))
    except ConfigError as err:
        return err.problems
    return []


def test_the_base_config_is_valid() -> None:
    assert problems() == []


@pytest.mark.parametrize("key, value, ok", CASES, ids=[f"{k}={v}" for k, v, _ in CASES])
def test_each_bound_accepts_the_last_good_value_and_refuses_the_first_bad_one(key: str, value: str, ok: bool) -> None:
    got = problems(f"{key}={value}")
    if ok:
        assert got == []
    else:
        assert len(got) == 1 and got[0].startswith(f"{key}="), got


def test_rwp_is_accepted_by_sam_train() -> None:
    """The engine halves the batch into RWP's clean and noisy passes (its layouts: tests/optim/methods/test_rwp_engine.py)."""
    assert problems("optim=rwp") == []


@pytest.mark.parametrize("method", ["gsam", "esam", "fsam", "vasso", "samon", "asam_on", "interval_sam", "looksam",
                                    "wsam"])
def test_the_sam_family_is_defined_for_p_2_only(method: str) -> None:
    assert problems(f"optim={method}") == []
    got = problems(f"optim={method}", "optim.p=inf")
    assert len(got) == 1 and got[0] == f"optim.p=inf is invalid: optim={method} is defined for p=2 only", got


def test_m_must_divide_the_per_device_batch() -> None:
    assert problems("optim.m=32") == [] and problems("optim.m=128") == [] and problems("optim.m=1") == []
    for m in ("0", "48", "256"):
        got = problems(f"optim.m={m}")
        assert len(got) == 1 and got[0].startswith("optim.m=") and "(128)" in got[0], got


def test_every_problem_is_reported_at_once() -> None:
    got = problems("optim.grad_clip=0", "optim.momentum=1.0", "epochs=0")
    assert [line.split("=")[0] for line in got] == ["optim.momentum", "optim.grad_clip", "epochs"]


# ---- every rule's exact line -------------------------------------------------------------------
# The error line is the contract for bad input: the key, the value (repr) and what is allowed. Each
# case changes the composed smoke config (or a file-backed preset) in place, which costs a few ms,
# so the whole table runs in well under a second (and kills a mutant of validate() quickly).
_ABSENT = object()


def _raw(cfg: Any, key: str) -> tuple[Any, str, Any]:
    """(parent node, leaf name, the leaf's raw value: an interpolation stays one) of a dotted key."""
    head, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, head) if head else cfg
    if parent is None or leaf not in parent:
        return parent, leaf, _ABSENT
    node = parent._get_node(leaf)
    return parent, leaf, node._value() if isinstance(node, ValueNode) else node


def problems_after(changes: dict[str, Any], preset: str = "smoke", *groups: str) -> list[str]:
    """The problems of `experiment=<preset> <groups>` (composed once per process) with `changes` set.
    The composed config is shared and each change undone afterwards: a copy per case was 60 % of
    the case's time, and `make mutate` runs these cases hundreds of times (docs/testing.md)."""
    cfg = composed_shared([f"experiment={preset}", *groups])
    saved = {key: _raw(cfg, key) for key in changes}
    try:
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value, merge=False)
        validate(cfg)
    except ConfigError as err:
        assert str(err) == "\n".join(err.problems)  # str() is the lines the CLI prints
        return err.problems
    finally:
        for key, (_, leaf, old) in reversed(list(saved.items())):
            if old is _ABSENT:  # added by the case (if the update got that far): remove it again
                parent = _raw(cfg, key)[0]
                if parent is not None and leaf in parent:
                    with open_dict(parent):
                        del parent[leaf]
            else:
                OmegaConf.update(cfg, key, old, merge=False)
    return []


def one_of(*choices: str) -> str:
    return "choose one of: " + ", ".join(choices)


DATASET_NAMES = one_of(*sorted(DATASETS))
MODEL_NAMES = one_of(*list_models()) + " (any wrn<depth>_<k> with depth = 6n+4), or timm/<name>"
SHARED_E = ("one shared e(w) for the whole batch excludes per-device perturbations: set device_batch=null "
            "and optim.m=null, or optim.sync_perturbation=false")
REFUSED_CROP = ("augment.random_resized_crop=True is invalid: only file-backed datasets (imagenet, the finetuning "
                "sets) take the Inception crop; use augment=basic here")
REFUSED: list[tuple[dict[str, Any], list[str]]] = [
    ({"dataset.source": "x"}, ["dataset.source='x' is invalid: " + one_of("folder", "synthetic", "torchvision"),
                               "dataset.name='synthetic' is invalid: " + DATASET_NAMES]),
    ({"dataset.source": "torchvision", "dataset.name": "nope"}, ["dataset.name='nope' is invalid: " + DATASET_NAMES]),
    ({"dataset.noise_kind": "x"}, ["dataset.noise_kind='x' is invalid: " + one_of("asymmetric", "symmetric")]),
    ({"dataset.label_noise": 1.0}, ["dataset.label_noise=1.0 is invalid: must be in [0, 1)"]),
    ({"dataset.val_fraction": -0.1}, ["dataset.val_fraction=-0.1 is invalid: must be in [0, 1)"]),
    *[({f"dataset.{key}": 0}, [f"dataset.{key}=0 is invalid: must be >= 1"])
      for key in ("num_classes", "image_size", "channels", "train_size", "test_size")],
    ({"dataset.input_size": 0},
     ["dataset.input_size=0 is invalid: must be >= 1 (pixels), or null for the dataset's (or a pretrained model's) size"]),
    ({"model.name": "resnet33"}, ["model.name='resnet33' is invalid: " + MODEL_NAMES]),
    ({"model.pretrained": True}, ["model.pretrained=True is invalid: pretrained weights come from timm: use a timm model "
                                  "(timm/<name>), or model.checkpoint=<file> for resnet20"]),
    ({"model.checkpoint": "/no/such.pt"}, [f"model.checkpoint='/no/such.pt' is invalid: no such file; {BOTH_WAYS}"]),
    ({"augment.padding": -1}, ["augment.padding=-1 is invalid: must be >= 0"]),
    ({"augment.pad_mode": "x"}, ["augment.pad_mode='x' is invalid: " + one_of("reflect", "constant")]),
    ({"augment.cutout": -1}, ["augment.cutout=-1 is invalid: must be >= 0 (pixels; 0 = off)"]),
    ({"augment.cutout_per": "x"}, ["augment.cutout_per='x' is invalid: " + one_of("batch", "sample")]),
    ({"augment.autoaugment": "x"}, ["augment.autoaugment='x' is invalid: " + one_of("null", "cifar10", "svhn")]),
    ({"augment.random_resized_crop": True}, [REFUSED_CROP]),
    ({"optim.name": "x"}, ["optim.name='x' is invalid: " + one_of("sgd", "sam", "asam", "gsam", "esam", "fsam", "vasso",
                                                                   "samon", "asam_on", "interval_sam", "looksam", "rwp",
                                                                   "wsam")]),
    ({"optim.base": "x"}, ["optim.base='x' is invalid: " + one_of("sgd", "adamw")]),
    ({"optim.lr": 0.0}, ["optim.lr=0.0 is invalid: must be > 0"]),
    ({"optim.momentum": 1.0}, ["optim.momentum=1.0 is invalid: must be in [0, 1)"]),
    ({"optim.weight_decay": -1.0}, ["optim.weight_decay=-1.0 is invalid: must be >= 0"]),
    ({"optim.wd_mode": "x"}, ["optim.wd_mode='x' is invalid: " + one_of("loss", "decoupled")]),
    ({"optim.rho": -1.0}, ["optim.rho=-1.0 is invalid: must be >= 0"]),
    ({"optim.p": 3.0}, ["optim.p=3.0 is invalid: must be 2 or inf"]),
    ({"optim.name": "asam", "optim.p": math.inf}, ["optim.p=inf is invalid: ASAM (optim=asam) is defined for p=2 only"]),
    ({"optim.eta": -1.0}, ["optim.eta=-1.0 is invalid: must be >= 0"]),
    ({"optim.bn_stats": "x"}, ["optim.bn_stats='x' is invalid: " + one_of("first_pass", "both")]),
    ({"optim.shakedrop_mask": "x"}, ["optim.shakedrop_mask='x' is invalid: " + one_of("fresh", "replay")]),
    ({"optim.asam_scale": "x"}, ["optim.asam_scale='x' is invalid: " + one_of("weights", "all")]),
    ({"method_rho.asam": -1.0}, ["method_rho.asam=-1.0 is invalid: must be >= 0"]),
    ({"optim.grad_clip": 0.0}, ["optim.grad_clip=0.0 is invalid: must be > 0, or null for no clipping"]),
    ({"optim.label_smoothing": 1.0}, ["optim.label_smoothing=1.0 is invalid: must be in [0, 1)"]),
    ({"batch_size": 0}, ["batch_size=0 is invalid: must be >= 1"]),
    ({"engine.ddp": True, "engine.nproc": 3}, ["batch_size=128 is invalid: must be divisible by the 3 processes"]),
    ({"engine.ddp": True, "engine.nproc": 2, "device_batch": 48},
     ["device_batch=48 is invalid: must divide the batch of each of the 2 processes (64), "
      "or be null (one device per process)"]),
    ({"batch_size": 1, "device_batch": 2}, ["device_batch=2 is invalid: must divide the batch of each of the 1 processes "
                                            "(1), or be null (one device per process)"]),
    ({"batch_size": 1, "engine.ddp": True, "engine.nproc": 2}, ["batch_size=1 is invalid: must be divisible by the 2 processes"]),
    ({"device_batch": 1, "optim.m": 2}, ["optim.m=2 is invalid: must divide the per-device batch (1), or be null (m = the "
                                         "per-device batch)"]),
    ({"device_batch": 0}, ["device_batch=0 is invalid: must divide the batch of each of the 1 processes (128), "
                           "or be null (one device per process)"]),
    ({"optim.m": 0}, ["optim.m=0 is invalid: must divide the per-device batch (128), or be null (m = the per-device batch)"]),
    ({"optim.m": 48}, ["optim.m=48 is invalid: must divide the per-device batch (128), or be null (m = the per-device batch)"]),
    ({"device_batch": 32, "optim.m": 64},
     ["optim.m=64 is invalid: must divide the per-device batch (32), or be null (m = the per-device batch)"]),
    ({"device_batch": 48, "optim.m": 64},  # a bad device_batch leaves m checked against the process's batch
     ["device_batch=48 is invalid: must divide the batch of each of the 1 processes (128), "
      "or be null (one device per process)"]),
    ({"optim.sync_perturbation": True, "device_batch": 32}, ["optim.sync_perturbation=True is invalid: " + SHARED_E]),
    ({"optim.sync_perturbation": True, "optim.m": 32}, ["optim.sync_perturbation=True is invalid: " + SHARED_E]),
    ({"epochs": 0}, ["epochs=0 is invalid: must be >= 1"]),
    ({"train_steps": 0}, ["train_steps=0 is invalid: must be >= 1, or null"]),
    ({"resume": "x"}, ["resume='x' is invalid: " + one_of("auto", "never", "must")]),
    ({"sched.name": "x"}, ["sched.name='x' is invalid: " + one_of("constant", "cosine", "step")]),
    ({"sched.warmup_epochs": -1.0}, ["sched.warmup_epochs=-1.0 is invalid: must be >= 0"]),
    ({"sched.gamma": 0.0}, ["sched.gamma=0.0 is invalid: must be in (0, 1]"]),
    ({"engine.precision": "x"}, ["engine.precision='x' is invalid: " + one_of("auto", "fp32", "tf32", "bf16", "fp16", "fp64")]),
    ({"engine.loader": "x"}, ["engine.loader='x' is invalid: " + one_of("auto", "device", "files", "workers")]),
    ({"engine.loader": "files"},
     ["engine.loader='files' is invalid: dataset 'synthetic' is held in memory: choose auto or one of: device, workers"]),
    ({"engine.nproc": 0}, ["engine.nproc=0 is invalid: must be >= 1, or null for every visible GPU"]),
    ({"engine.ddp": True}, ["engine.nproc=None is invalid: engine.ddp=true on the CPU needs engine.nproc=N (N gloo processes)"]),
    ({"engine.device": "gpu"}, ["engine.device='gpu' is invalid: use auto, cpu, cuda or cuda:N"]),
    ({"engine.eval_batch_size": 0}, ["engine.eval_batch_size=0 is invalid: must be >= 1"]),
    ({"engine.eval_every": 0}, ["engine.eval_every=0 is invalid: must be >= 1 (epochs)"]),
    ({"engine.eval_every_steps": 0},
     ["engine.eval_every_steps=0 is invalid: must be >= 1, or null (use engine.eval_every epochs)"]),
    ({"engine.num_workers": -1}, ["engine.num_workers=-1 is invalid: must be >= 0"]),
]
# the last good value of each rule above (and combinations that must stay legal)
ACCEPTED: list[dict[str, Any]] = [
    {"dataset.name": "nope"},  # synthetic data takes its shape from the synthetic fields, not a name
    *[{f"dataset.{key}": 1} for key in ("num_classes", "image_size", "channels", "train_size", "test_size")],
    {"dataset.input_size": 1}, {"optim.p": math.inf}, {"optim.name": "asam", "optim.p": 2.0}, {"method_rho.asam": 0.0},
    {"batch_size": 1}, {"batch_size": 1, "device_batch": 1, "optim.m": 1}, {"engine.ddp": True, "engine.nproc": 2},
    {"device_batch": 32}, {"device_batch": 128}, {"device_batch": 32, "optim.m": 16}, {"device_batch": 32, "optim.m": 32},
    {"optim.sync_perturbation": True, "optim.m": 128}, {"optim.sync_perturbation": True, "device_batch": 128},
    {"engine.loader": "device"}, {"engine.loader": "workers"}, {"engine.precision": "bf16"},
    {"augment.autoaugment": "cifar10"}, {"augment.pad_mode": "constant"},
]


@pytest.mark.parametrize("changes, expected", REFUSED, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c, _ in REFUSED])
def test_each_rule_refuses_with_its_exact_line(changes: dict[str, Any], expected: list[str]) -> None:
    assert problems_after(changes) == expected


@pytest.mark.parametrize("changes", ACCEPTED, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in ACCEPTED])
def test_the_edge_of_each_rule_is_accepted(changes: dict[str, Any]) -> None:
    assert problems_after(changes) == []


def test_a_file_backed_dataset_takes_the_files_loader_and_the_inception_crop_only() -> None:
    preset = "t2_imagenet_resnet50_100ep"
    assert problems_after({}, preset) == []
    assert problems_after({"engine.loader": "files", "augment.random_resized_crop": True}, preset) == []
    assert problems_after({"engine.loader": "device"}, preset) == [
        "engine.loader='device' is invalid: dataset 'imagenet' is read from image files: choose auto or one of: files"]
    # the same name from the synthetic source is held in memory: the array loaders fit, the crop does not
    assert problems_after({"dataset.source": "synthetic", "engine.loader": "device"}, preset) == [
        REFUSED_CROP]
    assert problems_after({"dataset.source": "synthetic", "engine.loader": "device",
                           "augment.random_resized_crop": False}, preset) == []


def test_pretrained_weights_need_a_timm_model_or_a_checkpoint(tmp_path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    assert problems_after({"model.pretrained": True, "model.checkpoint": str(weights)}) == []
    assert problems_after({"model.checkpoint": str(weights)}) == []
    assert problems_after({"model.name": "timm/resnet18", "model.pretrained": True}) == []
    # an unknown name is reported once, by model.name, not again by model.pretrained
    assert problems_after({"model.name": "resnet33", "model.pretrained": True}) == ["model.name='resnet33' is invalid: " + MODEL_NAMES]


def test_a_missing_tracker_package_and_a_bad_wandb_mode_are_lines_too(monkeypatch) -> None:
    import sam_repro.validate as validate_module
    from sam_repro.trackers import TRACKERS

    monkeypatch.setattr(validate_module, "not_installed", lambda cfg: [("wandb", TRACKERS["wandb"])])
    assert problems_after({}) == [
        f"logger='wandb' is invalid: the {TRACKERS['wandb'].package} package is not installed: "
        f"pip install 'sam-repro[{TRACKERS['wandb'].extra}]'"]
    monkeypatch.setattr(validate_module, "not_installed", lambda cfg: [])
    assert problems_after({"logger.wandb.mode": "x"}, "smoke", "logger=wandb") == [
        "logger.wandb.mode='x' is invalid: " + one_of("null", "online", "offline", "disabled")]
    assert problems_after({"logger.wandb.mode": None}, "smoke", "logger=wandb") == []
    assert problems_after({"logger.wandb.mode": "offline"}, "smoke", "logger=wandb") == []


def test_every_shared_config_is_left_as_composed() -> None:
    """problems_after undoes its changes: each cached config still equals a fresh composition
    (interpolations unresolved), after whichever cases ran before this test in the process."""
    for overrides in (["experiment=smoke"], ["experiment=t2_imagenet_resnet50_100ep"], ["experiment=smoke", "logger=wandb"]):
        problems_after({"optim.rho": 0.5, "engine.nproc": 2}, *overrides[0].split("=")[1:], *overrides[1:])
        shared = OmegaConf.to_container(composed_shared(overrides), resolve=False)
        assert shared == OmegaConf.to_container(compose_config(overrides), resolve=False), overrides

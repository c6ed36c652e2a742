"""sam_repro.validate at the edges of every range: the last good value passes, the first bad one fails.

`test_configs.py` checks the message of a few bad values; here each numeric bound is pinned from
both sides, so a bound written `<` for `<=` (or a falsy check such as `not grad_clip`, which lets
0 through and silently turns clipping off) cannot pass.
"""
from __future__ import annotations

import pytest

from sam_repro.validate import ConfigError, validate
from tests.conftest import compose_config

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


def test_m_must_divide_the_per_device_batch() -> None:
    assert problems("optim.m=32") == [] and problems("optim.m=128") == [] and problems("optim.m=1") == []
    for m in ("0", "48", "256"):
        got = problems(f"optim.m={m}")
        assert len(got) == 1 and got[0].startswith("optim.m=") and "(128)" in got[0], got


def test_every_problem_is_reported_at_once() -> None:
    got = problems("optim.grad_clip=0", "optim.momentum=1.0", "epochs=0")
    assert [line.split("=")[0] for line in got] == ["optim.momentum", "optim.grad_clip", "epochs"]

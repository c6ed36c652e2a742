"""The paper's per-device setting as a user meets it: presets, validation, the run log, the report.

The step itself (per-device BatchNorm and perturbation against literal devices) is tested in
tests/engine/test_step.py; its equality with a real 2-process DDP run in tests/engine/test_distributed.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sam_repro.models import ShakeDrop, create_model
from sam_repro.report import paper
from sam_repro.report.tables import differences
from sam_repro.runlog import summary_config
from sam_repro.validate import ConfigError, validate
from tests.conftest import compose_config

PAPER_FROM_SCRATCH = [
    "t1_cifar10_wrn28_10_200ep", "t1_cifar100_shakeshake", "t1_cifar10_pyramidnet_shakedrop",
    "t4_cifar10_resnet32_noise40", "t5_svhn_wrn28_10", "t5_fashion_mnist_shakeshake",
]


@pytest.mark.parametrize("preset", PAPER_FROM_SCRATCH)
@pytest.mark.parametrize("optim", ["sam", "sgd"])
def test_from_scratch_presets_use_the_official_8_devices_of_32(preset: str, optim: str) -> None:
    cfg = compose_config([f"experiment={preset}", f"optim={optim}"])
    validate(cfg)
    assert cfg.batch_size == 256 and cfg.device_batch == 32 and cfg.optim.m is None
    flat = summary_config(cfg, "bf16")
    assert flat["device_batch"] == 32 and flat["devices"] == 1
    assert flat["m"] == (32 if optim == "sam" else None)


def test_device_batch_null_is_one_device_per_process() -> None:
    flat = summary_config(compose_config(["experiment=t1_cifar10_wrn28_10_200ep", "device_batch=null"]), "bf16")
    assert flat["device_batch"] == 256 and flat["m"] == 256
    flat = summary_config(compose_config(["experiment=smoke", "optim.sync_perturbation=true"]), "fp32", world_size=2)
    assert flat["device_batch"] == 64 and flat["m"] is None  # one synchronized e for the whole batch


@pytest.mark.parametrize("overrides, line", [
    (["device_batch=48"], "device_batch=48 is invalid: must divide the batch of each of the 1 processes (256), "
                          "or be null (one device per process)"),
    (["optim.m=64"], "optim.m=64 is invalid: must divide the per-device batch (32), or be null (m = the per-device batch)"),
    (["optim.sync_perturbation=true"], "optim.sync_perturbation=True is invalid: one shared e(w) for the whole batch "
                                       "excludes per-device perturbations: set device_batch=null and optim.m=null, "
                                       "or optim.sync_perturbation=false"),
    (["optim.shakedrop_mask=same"], "optim.shakedrop_mask='same' is invalid: choose one of: fresh, replay"),
    (["optim=asam", "optim.asam_scale=bias"], "optim.asam_scale='bias' is invalid: choose one of: weights, all"),
])
def test_bad_per_device_values_get_one_line(overrides: list[str], line: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["experiment=t1_cifar10_wrn28_10_200ep", *overrides]))
    assert err.value.problems == [line]


@pytest.mark.parametrize("preset, sam_rho, asam_rho", [
    ("t1_cifar10_wrn28_10_200ep", 0.05, 0.5), ("t1_cifar100_wrn28_10_200ep", 0.1, 1.0),
    ("t4_cifar10_resnet32_noise80", 0.05, 0.5),
])
def test_each_method_gets_its_own_rho_from_a_preset(preset: str, sam_rho: float, asam_rho: float) -> None:
    assert compose_config([f"experiment={preset}"]).optim.rho == sam_rho
    asam = compose_config([f"experiment={preset}", "optim=asam"])
    assert asam.optim.rho == asam_rho and asam.optim.eta == 0.01 and asam.optim.asam_scale == "weights"
    assert compose_config([f"experiment={preset}", "optim=asam", "optim.rho=0.3"]).optim.rho == 0.3


def test_the_report_holds_the_per_device_batch_to_the_paper() -> None:
    rows = paper.paper_csv()
    t1_sam = paper.expected(rows[(rows.table == 1) & (rows.method == "sam") & (rows.dataset == "cifar10")
                                 & (rows.model == "wrn28_10")].iloc[0])
    assert t1_sam.device_batch == 32 and t1_sam.m == 32
    setting = summary_config(compose_config(["experiment=t1_cifar10_wrn28_10_200ep", "optim=sam"]), "bf16")
    setting["data.source"] = "torchvision"
    assert differences(setting, t1_sam) == []
    one_device = summary_config(compose_config(["experiment=t1_cifar10_wrn28_10_200ep", "device_batch=null"]), "bf16")
    one_device["data.source"] = "torchvision"
    assert differences(one_device, t1_sam) == ["device_batch 256 (paper 32: BatchNorm per device)", "m 256 (paper 32)"]
    t2 = paper.expected(rows[rows.table == 2].iloc[0])
    assert t2.device_batch is None and t2.m is None  # ImageNet: not checked


def test_imagenet_resnets_start_each_block_as_the_identity() -> None:
    """The official code zero-initializes the last BatchNorm scale of every residual block."""
    for name in ("resnet50", "resnet101"):
        model = create_model(name, num_classes=10)
        last_bns = [block.bn3 for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
        assert last_bns and all(torch.count_nonzero(bn.weight) == 0 for bn in last_bns)
        assert torch.all(model.bn1.weight == 1) and all(torch.all(b.bn1.weight == 1) for b in model.layer1)
    torchvision_default = create_model("resnet50", num_classes=10, zero_init_residual=False)
    assert torch.all(torchvision_default.layer1[0].bn3.weight == 1)


def test_svhn_autoaugment_is_the_policy_and_cutout_without_crop_or_flip() -> None:
    augment = compose_config(["experiment=t5_svhn_wrn28_10", "augment=autoaugment_svhn"]).augment
    assert augment.autoaugment == "svhn" and augment.cutout == 16
    assert augment.crop is False and augment.flip is False


def test_imagenet_l2_finetuning_follows_the_official_readme_where_the_paper_is_silent() -> None:
    cfg = compose_config(["experiment=t3_imagenet_efficientnet_l2"])
    assert cfg.optim.label_smoothing == 0.1 and cfg.optim.grad_clip == 1.0
    assert cfg.optim.rho == 0.05  # the paper's stated rho wins over the README's 0.1


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = ShakeDrop(keep_prob=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x)


@pytest.mark.parametrize("replay_mask", [False, True])
def test_shakedrop_redraws_its_mask_in_the_perturbed_pass_unless_told_to_replay(replay_mask: bool) -> None:
    """Both passes start from the same generator state (RandomDraws.replay): alpha and beta repeat;
    the keep/drop mask is fresh in the perturbed pass (official), or repeats with replay_mask."""
    layer = Branch().train()
    layer.drop.replay_mask = replay_mask
    x = torch.ones(4096, 1, 1, 1)
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    layer.drop.perturbed_pass = True
    second = layer(x)
    torch.manual_seed(3)
    u = torch.rand(4, 4096, 1, 1, 1)  # what the layer draws: mask, alpha, beta, the fresh mask
    alpha = -1.0 + 2.0 * u[1]
    for out, mask_u in ((first, u[0]), (second, u[0] if replay_mask else u[3])):
        keep = (mask_u < 0.5).float()
        torch.testing.assert_close(out, keep + alpha - keep * alpha)
    assert torch.equal(first, second) == replay_mask


def test_per_device_step_under_bf16_autocast_and_channels_last_tracks_fp32() -> None:
    """The GPU default (bf16 autocast, channels_last) on the per-device path: vmap neither casts a
    convolution's batched weights nor lets BatchNorm mix bf16 input with fp32 statistics, so the step
    does both itself. Two steps stay as close to fp32 as the one-device path's bf16 does."""
    from sam_repro.config import OptimConfig
    from sam_repro.engine.step import StepConfig, TrainStep
    from sam_repro.optim.factory import build_optimizer

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)

    def trained(device_batch: int | None, bf16: bool) -> nn.Module:
        torch.manual_seed(0)
        model = create_model("resnet20", num_classes=10)
        if bf16:
            model = model.to(memory_format=torch.channels_last)
        opt, sam = build_optimizer(model, OptimConfig(name="sam", lr=0.1))
        step = TrainStep(model, opt, sam, StepConfig(device_batch=device_batch, autocast_dtype=torch.bfloat16 if bf16 else None,
                                                     channels_last=bf16))
        model.train()
        for _ in range(2):
            step(x, y)
        return model

    def gap(a: nn.Module, b: nn.Module) -> float:
        return max(float((u.float() - v.float()).abs().max()) for u, v in zip(a.state_dict().values(), b.state_dict().values()))

    per_device = gap(trained(8, True), trained(8, False))
    one_device = gap(trained(None, True), trained(None, False))
    assert 0 < per_device < 3 * one_device
    assert gap(trained(8, False), trained(None, False)) > per_device  # the setting matters more than bf16

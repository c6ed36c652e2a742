"""The model zoo: every registered model trains a step, counts match the papers, the registry
resolves names (exact, wrn<depth>_<k> pattern, timm/) and rejects bad ones in one line."""
import math

import pytest
import torch
from torch import nn

from sam_repro.models import (ShakeDrop, ShakeShake, StochasticLayer, WideResNet,
                              create_model, is_model, list_models, register_model,
                              validate_model_name)

NUM_CLASSES = 7  # odd, so a model that ignores num_classes cannot pass by accident
IMAGENET = {"resnet50", "resnet101", "resnet152"}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, num_classes: int, **kw) -> nn.Module:
    """Build on the meta device: shapes (and so parameter counts) without allocation or init."""
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes, **kw)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_gives_finite_grad_on_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES).train()
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES]
    assert len(heads) == 1, f"{name}: one classifier with num_classes outputs"
    seen: list[torch.Tensor] = []
    heads[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, NUM_CLASSES)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    # The classifier's gradient by hand: L = mean(out^2), dL/dout = 2 out / numel, dL/dW = dout^T h.
    dout = 2 * out.detach() / out.numel()
    torch.testing.assert_close(heads[0].weight.grad, dout.T @ seen[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(heads[0].bias.grad, dout.sum(0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", list_models())
def test_one_channel_28px_input(name):
    """Fashion-MNIST: 1 channel, 28x28 (the CIFAR models pool adaptively)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, in_chans=1).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    # In float64: eval uses no batch statistics, so an example alone gives what it gives in a batch,
    # up to rounding. float32 rounding (which the CPU's kernels choose per batch size) reached 2e-4 of
    # 865 on resnet44; float64's stays below 1e-14 of the output's scale, by which batch statistics
    # would change it.
    model.double()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        pair, alone = model(x), model(x[1:])
    assert pair.shape == (2, NUM_CLASSES)
    assert torch.isfinite(pair).all()
    assert not torch.allclose(pair[0], pair[1])  # the output depends on the image
    torch.testing.assert_close(alone[0], pair[1], rtol=0, atol=1e-10 * float(pair.abs().max()))


# (name, kwargs, num_classes, published count); WRN numbers are the WRN paper's, whose shortcut is
# a 1x1 projection (shortcut="conv"); the official SAM code's default shortcut has none (below).
PUBLISHED = [
    ("wrn28_10", {"shortcut": "conv"}, 10, 36.5e6),
    ("wrn16_8", {"shortcut": "conv"}, 10, 11.0e6),
    ("pyramidnet272_shakedrop", {}, 10, 26.0e6),
    ("pyramidnet272", {}, 10, 26.0e6),
    ("shakeshake26_2x96d", {}, 10, 26.2e6),
    ("resnet32", {}, 10, 0.46e6),
    ("resnet50", {}, 1000, 25.6e6),
    ("resnet101", {}, 1000, 44.5e6),
    ("resnet152", {}, 1000, 60.2e6),
]


@pytest.mark.parametrize("name,kw,num_classes,published", PUBLISHED,
                         ids=[f"{p[0]}{'-' + p[1]['shortcut'] if p[1] else ''}" for p in PUBLISHED])
def test_parameter_count_within_1pct_of_published(name, kw, num_classes, published):
    count = n_params(meta_model(name, num_classes, **kw))
    assert abs(count - published) / published < 0.01, f"{name}: {count:,} vs {published:,.0f}"


@pytest.mark.parametrize("name,kw,expected", [
    ("wrn28_10", {"shortcut": "conv"}, 36_479_194),  # the standard PyTorch WRN count
    ("wrn28_10", {}, 36_220_634),  # official: pool + zero-pad shortcuts, 258,560 fewer
    ("wrn16_8", {}, 10_795_482),
    ("resnet32", {}, 464_154),  # He et al. option A
])
def test_exact_parameter_counts(name, kw, expected):
    assert n_params(meta_model(name, 10, **kw)) == expected


def test_official_initialization():
    torch.manual_seed(0)
    model = create_model("wrn16_8", num_classes=100)
    conv = model.blocks[-1].conv2.weight  # 512 -> 512, 3x3: fan_out = 9 * 512
    assert conv.std().item() == pytest.approx(math.sqrt(2.0 / (9 * 512)), rel=0.02)
    bound = 1.0 / math.sqrt(100)
    assert model.fc.weight.abs().max().item() <= bound
    assert model.fc.weight.abs().max().item() > 0.9 * bound
    assert torch.all(model.fc.bias == 0)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 and m.eps == 1e-5 for m in bns)


def test_wrn_has_no_dropout_by_default_and_takes_the_keyword():
    assert not any(isinstance(m, nn.Dropout) for m in meta_model("wrn16_4", 10).modules())
    drops = [m for m in meta_model("wrn16_4", 10, dropout=0.3).modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 6 and all(m.p == 0.3 for m in drops)


def test_pyramidnet_shakedrop_follows_the_linear_depth_rule():
    model = meta_model("pyramidnet272_shakedrop", 10)
    layers = [m for m in model.modules() if isinstance(m, ShakeDrop)]
    assert len(layers) == 90  # (272 - 2) / 9 blocks per group, 3 groups
    keep = torch.tensor([m.keep_prob for m in layers], dtype=torch.float64)
    expected = 1 - torch.arange(1, 91, dtype=torch.float64) / 90 * 0.5  # drop prob reaches 0.5
    assert torch.allclose(keep, expected)
    assert all(m.alpha_range == (-1.0, 1.0) and m.beta_range == (0.0, 1.0) for m in layers)
    assert model.fc.in_features == 4 * 216  # widened by alpha = 200 from 16


def test_plain_pyramidnet_is_the_same_network_without_shakedrop():
    plain, shaken = meta_model("pyramidnet272", 10), meta_model("pyramidnet272_shakedrop", 10)
    assert not any(isinstance(m, StochasticLayer) for m in plain.modules())
    assert [p.shape for p in plain.parameters()] == [p.shape for p in shaken.parameters()]


def test_shakeshake_has_one_shake_per_block():
    model = meta_model("shakeshake26_2x96d", 10)
    assert sum(isinstance(m, ShakeShake) for m in model.modules()) == 12
    assert model.fc.in_features == 384


# ----- registry -----

def test_duplicate_registration_raises():
    before = list_models()
    with pytest.raises(ValueError, match="resnet32"):
        register_model("resnet32")(lambda num_classes, in_chans=3: nn.Linear(1, 1))
    assert list_models() == before
    assert isinstance(create_model("resnet32", 10).fc, nn.Linear)
    assert create_model("resnet32", 10).fc.in_features == 64  # still the original


def test_unknown_name_gives_one_line_listing_the_names():
    with pytest.raises(ValueError) as info:
        create_model("wrn28_11x", num_classes=10)
    msg = str(info.value)
    assert "\n" not in msg
    assert "'wrn28_11x'" in msg
    assert all(name in msg for name in list_models())
    assert "wrn<depth>_<k>" in msg and "timm/<name>" in msg
    assert not is_model("wrn28_11x")


def test_wrn_pattern_builds_unlisted_depths():
    assert "wrn22_4" not in list_models()
    assert is_model("wrn22_4")
    model = create_model("wrn22_4", num_classes=10)
    assert isinstance(model, WideResNet)
    assert len(model.blocks) == 9  # (22 - 4) / 6 = 3 per group
    assert model.fc.in_features == 64 * 4
    assert n_params(model) == n_params(WideResNet(22, 4, num_classes=10))


def test_wrn_pattern_rejects_invalid_depth():
    assert not is_model("wrn27_4")
    with pytest.raises(ValueError, match=r"'wrn27_4'.*6n\+4.*27"):
        create_model("wrn27_4", num_classes=10)
    with pytest.raises(ValueError, match="6n"):
        validate_model_name("wrn27_4")


def test_timm_prefix_goes_to_timm():
    import timm

    model = create_model("timm/resnet18", num_classes=5, in_chans=1)
    assert isinstance(model, timm.models.ResNet)
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    assert is_model("timm/resnet18")


def test_unknown_timm_name_is_a_clear_error():
    assert not is_model("timm/not_a_real_net")
    with pytest.raises(ValueError, match="'not_a_real_net' is not a timm model"):
        create_model("timm/not_a_real_net", num_classes=10)


def test_kwargs_reach_the_constructor():
    model = meta_model("pyramidnet272_shakedrop", 10, max_drop=0.2)
    assert min(m.keep_prob for m in model.modules() if isinstance(m, ShakeDrop)) == pytest.approx(0.8)
    model = meta_model("wrn16_4", 10, shortcut="conv")
    assert n_params(model) > n_params(meta_model("wrn16_4", 10))
    with pytest.raises(TypeError):
        create_model("resnet32", 10, no_such_option=1)

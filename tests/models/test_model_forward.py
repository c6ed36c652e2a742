"""Each CIFAR architecture's forward pass against a functional re-implementation written here from
its paper / the official code's description (sam_repro/models/*.py docstrings), on small members
of each family in float64: the modules' own weights, read by position, go through plain F.conv2d /
F.batch_norm / F.linear in the order the architecture prescribes. Eval mode, with random BatchNorm
statistics and affine parameters, so a BatchNorm applied in the wrong place or skipped shows.
Also: the official initializers, and the ImageNet ResNets' stem and zero-initialized blocks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sam_repro.models import CifarResNet, PyramidNet, ShakeDrop, ShakeShakeResNet, WideResNet, create_model
from sam_repro.models.wrn import pool_and_pad, wrn_blocks_per_group

F64 = torch.float64


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """model in float64 eval mode with random BatchNorm running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g, dtype=F64))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=F64))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=F64))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g, dtype=F64))
            elif isinstance(m, nn.Linear):
                m.bias.copy_(0.1 * torch.randn(m.out_features, generator=g, dtype=F64))
    return model


def bn(x: torch.Tensor, m: nn.BatchNorm2d) -> torch.Tensor:
    """Eval BatchNorm written out: (x - mean) / sqrt(var + 1e-5) * weight + bias."""
    shape = (1, -1, 1, 1)
    return ((x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + 1e-5)
            * m.weight.view(shape) + m.bias.view(shape))


def conv(x: torch.Tensor, m: nn.Conv2d, stride: int = 1) -> torch.Tensor:
    """A bias-free conv with 'same' padding for odd kernels, at the stride the architecture says."""
    assert m.bias is None
    k = m.weight.shape[-1]
    return F.conv2d(x, m.weight, stride=stride, padding=k // 2)


def head(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    return x.mean(dim=(2, 3)) @ fc.weight.T + fc.bias


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    extra = x.new_zeros(x.shape[0], channels - x.shape[1], *x.shape[2:])
    return torch.cat([x, extra], dim=1)


def images(n: int = 3, size: int = 9, chans: int = 3, seed: int = 1) -> torch.Tensor:
    # an odd size: every downsampling sees an odd input (ceil-mode pooling vs a stride-2 conv)
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- Wide ResNet: pre-activation; the first block's shortcut carries the activated input ----------

def reference_wrn(model: WideResNet, x: torch.Tensor, depth: int, width: int, shortcut: str) -> torch.Tensor:
    n = (depth - 4) // 6
    x = conv(x, model.conv)
    blocks = iter(model.blocks)
    cin = 16
    for group, channels in enumerate((16 * width, 32 * width, 64 * width)):
        for i in range(n):
            blk = next(blocks)
            stride = 2 if group > 0 and i == 0 else 1
            a = F.relu(bn(x, blk.bn1))
            y = conv(a, blk.conv1, stride)
            y = conv(F.relu(bn(y, blk.bn2)), blk.conv2)
            if cin == channels and stride == 1:
                residual = a if (group, i) == (0, 0) else x
            elif shortcut == "conv":
                residual = F.conv2d(a, blk.projection.weight, stride=stride)
            else:  # average-pool (ceil mode on odd sizes) and zero-pad the new channels
                src = a if (group, i) == (0, 0) else x
                if stride > 1:
                    src = F.avg_pool2d(src, 2, 2, ceil_mode=True)
                residual = pad_channels(src, channels)
            x, cin = y + residual, channels
    return head(F.relu(bn(x, model.bn)), model.fc)


@pytest.mark.parametrize("depth, width, shortcut", [(10, 1, "pad"), (16, 2, "pad"), (10, 2, "conv")])
def test_wide_resnet_forward(depth: int, width: int, shortcut: str) -> None:
    torch.manual_seed(0)
    model = randomized(WideResNet(depth, width, num_classes=5, shortcut=shortcut))
    x = images()
    with torch.no_grad():
        assert torch.allclose(model(x), reference_wrn(model, x, depth, width, shortcut), rtol=1e-10, atol=1e-12)
    assert len(model.blocks) == 3 * (depth - 4) // 6 == 3 * wrn_blocks_per_group(depth)


def test_wrn_dropout_sits_between_the_two_convs_of_each_block() -> None:
    model = WideResNet(10, 1, num_classes=5, dropout=0.25)
    for blk in model.blocks:
        assert isinstance(blk.dropout, nn.Dropout) and blk.dropout.p == 0.25
    model = randomized(model)
    x = images()
    with torch.no_grad():  # eval: dropout is the identity, the same network as without it
        assert torch.allclose(model(x), reference_wrn(model, x, 10, 1, "pad"), rtol=1e-10, atol=1e-12)
        model.train()
        for blk in model.blocks:  # train: a dropped conv2 input changes the output
            blk.bn1.eval(), blk.bn2.eval()
        model.bn.eval()
        assert not torch.allclose(model(x), reference_wrn(model, x, 10, 1, "pad"))


@pytest.mark.parametrize("depth", [4, 9, 11, 27])
def test_wrn_depth_must_be_6n_plus_4(depth: int) -> None:
    with pytest.raises(ValueError, match="6n"):
        wrn_blocks_per_group(depth)


def test_wrn_checks_its_keywords() -> None:
    assert wrn_blocks_per_group(10) == 1 and wrn_blocks_per_group(28) == 4
    with pytest.raises(ValueError, match="shortcut"):
        WideResNet(10, 1, shortcut="proj")
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            WideResNet(10, 1, dropout=bad)
    WideResNet(10, 1, dropout=0.0)  # the edge that is allowed
    with pytest.raises(ValueError, match="width"):
        create_model("wrn10_0", num_classes=5)


def test_pool_and_pad() -> None:
    x = images(n=2, size=5, chans=3)
    out = pool_and_pad(x, 7, 2)
    expected = pad_channels(F.avg_pool2d(x, 2, 2, ceil_mode=True), 7)
    assert out.shape == (2, 7, 3, 3) and torch.equal(out, expected)
    assert torch.equal(pool_and_pad(x, 3, 1), x)  # stride 1, same channels: the input itself
    assert torch.equal(pool_and_pad(x, 4, 1), pad_channels(x, 4))


# -- CIFAR ResNet: post-activation basic blocks, option A shortcuts --------------------------------

def reference_cifar_resnet(model: CifarResNet, x: torch.Tensor, depth: int) -> torch.Tensor:
    n = (depth - 2) // 6
    x = F.relu(bn(conv(x, model.conv), model.bn))
    blocks, cin = iter(model.blocks), 16
    for group, channels in enumerate((16, 32, 64)):
        for i in range(n):
            blk = next(blocks)
            stride = 2 if group > 0 and i == 0 else 1
            y = F.relu(bn(conv(x, blk.conv1, stride), blk.bn1))
            y = bn(conv(y, blk.conv2), blk.bn2)
            shortcut = x
            if stride > 1 or cin != channels:  # subsample, zero channels split evenly on both sides
                sub = x[:, :, ::stride, ::stride]
                pad = channels - cin
                zeros = lambda c: sub.new_zeros(sub.shape[0], c, *sub.shape[2:])
                shortcut = torch.cat([zeros(pad // 2), sub, zeros(pad - pad // 2)], dim=1)
            x, cin = F.relu(y + shortcut), channels
    return head(x, model.fc)


@pytest.mark.parametrize("depth", [8, 14])
def test_cifar_resnet_forward(depth: int) -> None:
    torch.manual_seed(0)
    model = randomized(CifarResNet(depth, num_classes=5))
    x = images()
    with torch.no_grad():
        assert torch.allclose(model(x), reference_cifar_resnet(model, x, depth), rtol=1e-10, atol=1e-12)


def test_cifar_resnet_init_and_depth_rule() -> None:
    torch.manual_seed(0)
    model = CifarResNet(20, num_classes=10)
    w = model.blocks[-1].conv2.weight  # 64 -> 64, 3x3: Kaiming normal, fan_out = 9 * 64
    assert w.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
    assert model.conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 16)), rel=0.2)
    for depth in (7, 9, 21):
        with pytest.raises(ValueError, match="6n\\+2"):
            CifarResNet(depth)
    assert len(CifarResNet(8).blocks) == 3
    assert [name for name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
            if len(create_model(name, 10).blocks) == 3 * (int(name[6:]) - 2) // 6] == [
        "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


# -- PyramidNet: bottleneck blocks widened linearly, ShakeDrop (eval: its expectation) ------------

def reference_pyramidnet(model: PyramidNet, x: torch.Tensor, depth: int, alpha: float, shakedrop: bool,
                         max_drop: float = 0.5, alpha_range=(-1.0, 1.0)) -> torch.Tensor:
    n = (depth - 2) // 9
    total = 3 * n
    x = bn(conv(x, model.stem[0]), model.stem[1])
    width, cin = 16.0, 16
    for k, blk in enumerate(model.blocks, start=1):
        width += alpha / total
        channels = int(round(width))
        stride = 2 if k in (n + 1, 2 * n + 1) else 1
        b = blk.branch
        y = conv(bn(x, b[0]), b[1])
        y = conv(F.relu(bn(y, b[2])), b[4], stride)
        y = bn(conv(F.relu(bn(y, b[5])), b[7]), b[8])
        assert y.shape[1] == 4 * channels
        if shakedrop:  # eval: E[b + alpha - b alpha] = keep + mean_alpha (1 - keep)
            keep = 1 - k / total * max_drop
            mean_alpha = sum(alpha_range) / 2
            y = (keep + mean_alpha - keep * mean_alpha) * y
        src = F.avg_pool2d(x, 2, 2, ceil_mode=True) if stride > 1 else x
        x, cin = pad_channels(src, 4 * channels) + y, 4 * channels
    return head(F.relu(bn(x, model.bn)), model.fc)


@pytest.mark.parametrize("depth, alpha, shakedrop", [(11, 12, True), (20, 30, True), (11, 12, False)])
def test_pyramidnet_forward(depth: int, alpha: float, shakedrop: bool) -> None:
    torch.manual_seed(0)
    model = randomized(PyramidNet(depth, alpha, num_classes=5, shakedrop=shakedrop))
    x = images()
    with torch.no_grad():
        assert torch.allclose(model(x), reference_pyramidnet(model, x, depth, alpha, shakedrop), rtol=1e-10, atol=1e-12)


def test_pyramidnet_shakedrop_ranges_and_max_drop_reach_its_layers() -> None:
    model = PyramidNet(20, 30, num_classes=5, max_drop=0.3, shake_alpha=(-0.5, 0.25), shake_beta=(0.1, 0.9))
    layers = [blk.shakedrop for blk in model.blocks]
    assert all(isinstance(m, ShakeDrop) for m in layers) and len(layers) == 6
    assert [m.keep_prob for m in layers] == pytest.approx([1 - k / 6 * 0.3 for k in range(1, 7)], rel=1e-12)
    assert all(m.alpha_range == (-0.5, 0.25) and m.beta_range == (0.1, 0.9) for m in layers)
    model = randomized(model)
    x = images()
    with torch.no_grad():
        assert torch.allclose(model(x), reference_pyramidnet(model, x, 20, 30, True, 0.3, (-0.5, 0.25)),
                              rtol=1e-10, atol=1e-12)


def test_pyramidnet_checks_depth_and_max_drop() -> None:
    for depth in (2, 10, 12, 21):
        with pytest.raises(ValueError, match="9n\\+2"):
            PyramidNet(depth, 12)
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError, match="max_drop"):
            PyramidNet(11, 12, max_drop=bad)
    assert len(PyramidNet(11, 12, max_drop=1.0).blocks) == 3 and len(PyramidNet(11, 12, max_drop=0.0).blocks) == 3


# -- Shake-Shake: two ReLU-first branches (eval: their mean), the two-path shortcut ----------------

def reference_shakeshake(model: ShakeShakeResNet, x: torch.Tensor, per_group: int, base: int) -> torch.Tensor:
    x = bn(conv(x, model.stem[0]), model.stem[1])
    blocks, cin = iter(model.blocks), 16
    for group, mult in enumerate((1, 2, 4)):
        for i in range(per_group):
            blk = next(blocks)
            cout, stride = base * mult, 2 if group > 0 and i == 0 else 1

            def branch(b: nn.Sequential) -> torch.Tensor:
                y = conv(F.relu(x), b[1], stride)
                return bn(conv(F.relu(bn(y, b[2])), b[4]), b[5])

            mixed = 0.5 * (branch(blk.branch_a) + branch(blk.branch_b))
            if cin == cout:
                shortcut = x
            else:  # [1x1 conv of x[::s], 1x1 conv of x shifted one pixel right and down, [::s]] -> BN
                s = blk.shortcut
                shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
                h = torch.cat([F.conv2d(x[:, :, ::stride, ::stride], s.conv1.weight),
                               F.conv2d(shifted[:, :, ::stride, ::stride], s.conv2.weight)], dim=1)
                assert s.conv1.weight.shape[0] == cout // 2
                shortcut = bn(h, s.bn)
            x, cin = shortcut + mixed, cout
    return head(F.relu(x), model.fc)


@pytest.mark.parametrize("per_group, base", [(1, 4), (2, 5)])
def test_shakeshake_forward(per_group: int, base: int) -> None:
    torch.manual_seed(0)
    model = randomized(ShakeShakeResNet(per_group, base, num_classes=5))
    x = images()
    with torch.no_grad():
        assert torch.allclose(model(x), reference_shakeshake(model, x, per_group, base), rtol=1e-10, atol=1e-12)


def test_shakeshake_checks_its_sizes() -> None:
    for kw in ({"blocks_per_group": 0}, {"base_width": 0}):
        with pytest.raises(ValueError, match="blocks_per_group >= 1"):
            ShakeShakeResNet(**kw)
    assert len(ShakeShakeResNet(1, 2).blocks) == 3


# -- the official initializers ------------------------------------------------------------------------

@pytest.mark.parametrize("build", [lambda: WideResNet(10, 8, num_classes=50), lambda: PyramidNet(11, 240, num_classes=50),
                                   lambda: ShakeShakeResNet(1, 128, num_classes=50)], ids=["wrn", "pyramidnet", "shakeshake"])
def test_official_initializers(build) -> None:
    """Kaiming normal with fan_out for every conv (std sqrt(2 / (k^2 c_out))), BN scale 1 and
    bias 0, the classifier U[-1/sqrt(classes), 1/sqrt(classes)] with bias 0."""
    torch.manual_seed(0)
    model = build()
    convs = sorted((m for m in model.modules() if isinstance(m, nn.Conv2d)), key=lambda m: -m.weight.numel())
    for m in convs[:3]:  # the largest: enough weights for a 5 % check of the std
        fan_out = m.weight.shape[0] * m.weight.shape[2] * m.weight.shape[3]
        assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
        assert abs(m.weight.mean().item()) < 0.1 * math.sqrt(2 / fan_out)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    bound = 1 / math.sqrt(50)
    w = model.fc.weight
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.95 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # uniform on [-b, b]
    assert torch.all(model.fc.bias == 0)


# -- ImageNet ResNets (torchvision) ----------------------------------------------------------------

def test_imagenet_resnet_blocks_start_as_the_identity_unless_asked_otherwise() -> None:
    from torchvision.models.resnet import Bottleneck

    torch.manual_seed(0)
    model = create_model("resnet50", num_classes=10)
    last_bns = [m.bn3 for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(last_bns) == 16 and all(torch.all(b.weight == 0) for b in last_bns)
    assert model.fc.out_features == 10 and model.conv1.in_channels == 3
    default = create_model("resnet50", num_classes=10, zero_init_residual=False)
    assert all(torch.all(m.bn3.weight == 1) for m in default.modules() if isinstance(m, Bottleneck))


@pytest.mark.parametrize("name, blocks", [("resnet50", 16), ("resnet101", 33), ("resnet152", 50)])
def test_imagenet_resnet_stem_follows_the_input_channels(name: str, blocks: int) -> None:
    from torchvision.models.resnet import Bottleneck

    with torch.device("meta"):
        model = create_model(name, num_classes=7, in_chans=1)
    c = model.conv1
    assert (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.bias) == (1, 64, (7, 7), (2, 2), (3, 3), None)
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == blocks and model.fc.out_features == 7


def test_imagenet_stem_of_other_channels_is_kaiming_initialized() -> None:
    torch.manual_seed(0)
    stem = create_model("resnet50", num_classes=10, in_chans=5).conv1.weight  # 64 x 5 x 7 x 7
    assert stem.shape == (64, 5, 7, 7)
    assert stem.std().item() == pytest.approx(math.sqrt(2 / (64 * 49)), rel=0.05)

"""engine/step.py: what memory layout and what dtype reach the model, and that they change no number.

- `channels_last`: the step hands the model a channels_last batch (the layout cuDNN's fast kernels
  want) and otherwise the batch as given; the layout changes no result.
- bf16 autocast on the per-device path: BatchNorm reads its input in fp32 (its statistics' dtype)
  and hands back bf16, only inside the step's vmapped forward; the step tracks a literal per-device
  bf16 reference (each device's plain autocast forward) within bf16's tolerance.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sam_repro.config import OptimConfig
from sam_repro.engine.step import StepConfig, TrainStep
from sam_repro.optim.factory import build_optimizer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def make(dtype: torch.dtype = torch.float64) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 3, 6, 6, generator=g).to(dtype), torch.randint(0, 5, (8,), generator=g)


def ocfg(name: str) -> OptimConfig:
    return OptimConfig(name=name, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3, rho=0.3, eps=0.0,
                       grad_clip=None)


def layouts_seen(model: nn.Module) -> list[bool]:
    """Records, per call of the model, whether its input is channels_last (and not plain contiguous)."""
    seen: list[bool] = []

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())

    model.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("name", ["sgd", "sam"])
def test_channels_last_reaches_the_model_and_changes_no_number(name: str) -> None:
    x, y = data()
    runs = {}
    for channels_last in (False, True):
        model = make()
        opt, sam = build_optimizer(model, ocfg(name))
        cfg = StepConfig(channels_last=True) if channels_last else StepConfig()  # the default: off
        step = TrainStep(model, opt, sam, cfg)
        seen = layouts_seen(model)
        model.train()
        stats = [step(x, y) for _ in range(2)]
        assert seen and all(s == channels_last for s in seen)  # every pass (SAM: both), every step
        runs[channels_last] = (model, stats)
    (plain, plain_stats), (cl, cl_stats) = runs[False], runs[True]
    for (key, a), b in zip(plain.state_dict().items(), cl.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=key)
    for a, b in zip(plain_stats, cl_stats):
        torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=1e-12, atol=0)
        assert torch.equal(a.correct, b.correct)


def test_channels_last_on_the_per_device_path_changes_no_number() -> None:
    x, y = data()
    models = []
    for channels_last in (False, True):
        model = make()
        opt, sam = build_optimizer(model, ocfg("sam"))
        step = TrainStep(model, opt, sam, StepConfig(device_batch=4, channels_last=channels_last))
        model.train()
        for _ in range(2):
            step(x, y)
        models.append(model)
    for (key, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=key)


def test_a_non_image_batch_is_left_as_given() -> None:
    """channels_last applies to 4-d batches only (a 2-d batch has no such layout)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    opt, _ = build_optimizer(model, ocfg("sgd"))
    step = TrainStep(model, opt, None, StepConfig(channels_last=True))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    step(x, y)
    assert seen[0] is x


# -- bf16 autocast on the per-device path: BatchNorm in fp32 inside, bf16 out ------------------
def bn_dtypes(model: nn.Module) -> list[tuple[torch.dtype, torch.dtype, torch.dtype, torch.dtype]]:
    """(input, output, running_mean, weight) dtypes of each BatchNorm call, as the layer itself sees them
    (hooks registered after the step's own, so they see what the step's hooks made of them; inside the
    step's functional call `m.weight` is the weight the step passed in)."""
    seen: list = []
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.register_forward_hook(
                lambda m, args, out: seen.append((args[0].dtype, out.dtype, m.running_mean.dtype, m.weight.dtype)))
    return seen


def literal_devices_bf16(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                         k: int, l2: float) -> torch.Tensor:
    """One SGD step of k devices, each its plain one-device bf16 autocast forward over its slice (loss in
    fp32), gradients averaged, the L2 term added (wd_mode=loss): the reference. Returns the mean loss."""
    losses = []
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(xs)
        loss = nn.functional.cross_entropy(logits.float(), ys)
        (loss / k).backward()
        losses.append(loss.detach())
    with torch.no_grad():
        for p in model.parameters():
            p.grad += l2 * p
    opt.step()
    opt.zero_grad()
    return torch.stack(losses).mean()


def test_per_device_bf16_batchnorm_reads_fp32_returns_bf16_and_tracks_literal_devices() -> None:
    x, y = data(torch.float32)
    model, ref = make(torch.float32), make(torch.float32)
    before = copy.deepcopy(model.state_dict())
    opt, _ = build_optimizer(model, ocfg("sgd"))
    ref_opt, _ = build_optimizer(ref, ocfg("sgd"))
    step = TrainStep(model, opt, None, StepConfig(device_batch=4, autocast_dtype=torch.bfloat16))
    seen = bn_dtypes(model)
    model.eval()
    assert model(x).dtype == torch.float32 and seen == [(torch.float32,) * 4]  # the hooks idle before the step too
    seen.clear()
    model.train(), ref.train()
    stats = step(x, y)
    assert seen and all(s == (torch.float32, torch.bfloat16, torch.float32, torch.float32) for s in seen)  # BN weights stay fp32
    ref_loss = literal_devices_bf16(ref, ref_opt, x, y, k=2, l2=ocfg("sgd").weight_decay)
    torch.testing.assert_close(stats.loss_sum / 8, ref_loss, rtol=2e-2, atol=0)
    for name in ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"):
        a, b, w0 = model.state_dict()[name], ref.state_dict()[name], before[name]
        assert (a - w0).abs().max() > 1e-4  # the step moved the weights ...
        torch.testing.assert_close(a - w0, b - w0, rtol=0, atol=0.05 * float((b - w0).abs().max()), msg=name)  # ... as the reference did
    # the hooks act only inside the step: a plain forward afterwards is an fp32 model's, BatchNorm untouched
    seen.clear()
    model.eval(), ref.eval()
    out = model(x)
    assert out.dtype == torch.float32 and seen == [(torch.float32,) * 4]
    plain = copy.deepcopy(model)  # deepcopy keeps hooks; compare with a fresh module holding the same state
    fresh = make(torch.float32)
    fresh.load_state_dict(plain.state_dict())
    fresh.eval()
    torch.testing.assert_close(out, fresh(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sgd", "sam"])
def test_per_device_bf16_step_tracks_the_fp32_per_device_step(name: str) -> None:
    """bf16 changes the step's numbers by bf16's rounding only, on both optimizers' per-device paths."""
    x, y = data(torch.float32)
    models, seen_bf16 = [], None
    for dtype in (None, torch.bfloat16):
        model = make(torch.float32)
        opt, sam = build_optimizer(model, ocfg(name))
        step = TrainStep(model, opt, sam, StepConfig(device_batch=4, autocast_dtype=dtype))
        seen = bn_dtypes(model)
        model.train()
        for _ in range(2):
            step(x, y)
        if dtype is not None:
            seen_bf16 = seen
        models.append(model)
    assert seen_bf16 and all(s == (torch.float32, torch.bfloat16, torch.float32, torch.float32) for s in seen_bf16)
    start = make(torch.float32).state_dict()
    for (key, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        if key.endswith("num_batches_tracked"):
            assert torch.equal(a, b)
            continue
        moved = float((a - start[key]).abs().max())
        assert moved > 1e-4, key
        # bf16 keeps 8 bits: a few % of the move (measured on conv.weight: SGD 5.1 %, SAM 7.9 %)
        torch.testing.assert_close(b, a, rtol=0, atol=0.2 * moved, msg=key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, device_batch", [
    ("sgd", None), ("sam", None), ("sgd", 4), ("sam", 4)])
def test_the_forward_runs_in_the_autocast_dtype_asked(dtype: torch.dtype, name: str, device_batch) -> None:
    """fp16 is not autocast's CPU default (bf16 is; on CUDA it is the other way round): the step must
    ask for the dtype it was given; every convolution of the step (SAM: both passes) runs in it."""
    x, y = data(torch.float32)
    model = make(torch.float32)
    opt, sam = build_optimizer(model, ocfg(name))
    step = TrainStep(model, opt, sam, StepConfig(device_batch=device_batch, autocast_dtype=dtype))
    seen: list[torch.dtype] = []
    model.conv.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    model.train()
    step(x, y)
    assert seen == [dtype] * (2 if name == "sam" else 1)

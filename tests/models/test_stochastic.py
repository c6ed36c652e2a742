"""SAM's two passes share random draws: RandomDraws replays them, the shake layers' gradients follow
`true_gradient`, eval mode is the expectation of train mode, and it all survives bf16 and compile."""
import pytest
import torch
from torch import nn

from sam_repro.models import (PyramidNet, RandomDraws, ShakeDrop, ShakeShake, ShakeShakeResNet,
                              StochasticLayer, WideResNet, set_true_gradient)

CPU = torch.device("cpu")


def small_models():
    """Tiny members of each family with random layers (fast on CPU)."""
    return {
        "shakeshake": ShakeShakeResNet(blocks_per_group=1, base_width=8, num_classes=5),
        "pyramidnet_shakedrop": PyramidNet(depth=11, alpha=12, num_classes=5),
        "wrn_dropout": WideResNet(depth=10, width=1, num_classes=5, dropout=0.5),
    }


@pytest.mark.parametrize("name", list(small_models()))
def test_replay_repeats_the_draws_bit_for_bit(name):
    torch.manual_seed(0)
    model = small_models()[name].train()
    x = torch.randn(8, 3, 16, 16)
    draws = RandomDraws(CPU)
    draws.capture()
    first = model(x)
    first.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    draws.replay()
    second = model(x)
    second.sum().backward()
    assert torch.equal(first, second)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    third = model(x)  # no replay: fresh draws
    assert not torch.allclose(first, third)


@pytest.mark.parametrize("layer", [nn.Dropout(0.5), pytest.param("droppath", id="timm-DropPath")])
def test_replay_covers_layers_that_are_not_ours(layer):
    if layer == "droppath":
        from timm.layers import DropPath

        layer = DropPath(0.5)
    layer.train()
    x = torch.randn(64, 4, 3, 3)
    draws = RandomDraws(CPU)
    draws.capture()
    first = layer(x)
    draws.replay()
    assert torch.equal(first, layer(x))
    assert not torch.equal(first, layer(x))


def test_replay_restores_the_cuda_generator_of_its_device(monkeypatch):
    """The CUDA path on any machine, through a stand-in for torch.cuda's generator API: capture
    snapshots the generator of draws.device (cuda:1, not the current device) and replay writes
    that very snapshot back to that device, after restoring the CPU generator."""
    calls = []
    snapshot = torch.tensor([7, 1, 3], dtype=torch.uint8)

    def get_rng_state(device="cuda"):
        calls.append(("get", device))
        return snapshot

    def set_rng_state(new_state, device="cuda"):
        calls.append(("set", new_state, device))

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    device = torch.device("cuda", 1)
    draws = RandomDraws(device)
    torch.manual_seed(0)
    draws.capture()
    first = torch.rand(3)
    assert calls == [("get", device)]
    draws.replay()
    assert torch.equal(first, torch.rand(3))  # the CPU generator too
    assert len(calls) == 2 and calls[1][0] == "set" and calls[1][1] is snapshot and calls[1][2] == device


def test_replay_before_capture_is_an_error():
    with pytest.raises(RuntimeError, match="capture"):
        RandomDraws(CPU).replay()


@pytest.mark.parametrize("layer_fn", [
    pytest.param(lambda: ShakeShakeResNet(blocks_per_group=1, base_width=8), id="shakeshake"),
    pytest.param(lambda: PyramidNet(depth=11, alpha=12), id="shakedrop"),
])
def test_generator_advances_the_same_whatever_the_mode(layer_fn):
    """The second pass runs with true_gradient off, the first with it on: the draws after a
    pass must not depend on the mode, or everything drawn later would diverge."""
    torch.manual_seed(0)
    model = layer_fn().train()
    x = torch.randn(4, 3, 16, 16)
    draws = RandomDraws(CPU)
    draws.capture()
    set_true_gradient(model, True)
    out_true = model(x)
    after_true = torch.rand(3)
    draws.replay()
    set_true_gradient(model, False)
    out_normal = model(x)
    after_normal = torch.rand(3)
    assert torch.equal(out_true, out_normal)
    assert torch.equal(after_true, after_normal)


def _shake_inputs(n=6):
    torch.manual_seed(1)
    a = torch.randn(n, 3, 2, 2, requires_grad=True)
    b = torch.randn(n, 3, 2, 2, requires_grad=True)
    return a, b, torch.randn(n, 3, 2, 2)


def test_shakeshake_gradients_match_a_naive_implementation():
    a, b, g = _shake_inputs()
    layer = ShakeShake().train()
    draws = RandomDraws(CPU)
    grads = {}
    for true_gradient in (True, False):
        layer.true_gradient = true_gradient
        draws.capture()
        out = layer(a, b)
        (da, db) = torch.autograd.grad(out, (a, b), g)
        # Naive official semantics from the same draws: forward mixes with alpha, backward with
        # beta (true gradient: alpha), via the stop-gradient trick of sam_jax/models/utils.py.
        draws.replay()
        alpha, beta = torch.rand(2, a.shape[0], 1, 1, 1)
        if true_gradient:
            beta = alpha
        x_fwd = a * alpha + b * (1 - alpha)
        x_bwd = a * beta + b * (1 - beta)
        naive = x_bwd + (x_fwd - x_bwd).detach()
        (na, nb) = torch.autograd.grad(naive, (a, b), g)
        assert torch.allclose(out, naive, atol=1e-6)
        assert torch.allclose(da, na, atol=1e-6) and torch.allclose(db, nb, atol=1e-6)
        grads[true_gradient] = da
    assert not torch.allclose(grads[True], grads[False])


def test_shakedrop_true_gradient_is_the_gradient_of_the_function_computed():
    """true_gradient: d(out)/dx = the forward coefficient, recovered here from the output itself
    (out = x * c per sample), independently of how the layer draws."""
    torch.manual_seed(2)
    x = torch.rand(32, 3, 2, 2) + 0.5  # away from 0, so c = out / x is exact enough
    x.requires_grad_(True)
    g = torch.randn_like(x)
    layer = ShakeDrop(keep_prob=0.5).train()
    layer.true_gradient = True
    out = layer(x)
    (dx,) = torch.autograd.grad(out, x, g)
    coef = (out / x).detach()
    assert torch.allclose(coef, coef[:, :1, :1, :1].expand_as(coef), atol=1e-6)  # per sample
    assert torch.allclose(dx, g * coef, atol=1e-6)


def test_shakedrop_normal_gradient_matches_a_naive_implementation():
    torch.manual_seed(3)
    x = torch.randn(64, 3, 2, 2, requires_grad=True)
    g = torch.randn_like(x)
    layer = ShakeDrop(keep_prob=0.6, alpha_range=(-1.0, 1.0), beta_range=(0.0, 1.0)).train()
    draws = RandomDraws(CPU)
    draws.capture()
    out = layer(x)
    (dx,) = torch.autograd.grad(out, x, g)
    draws.replay()
    u = torch.rand(3, 64, 1, 1, 1)
    mask = (u[0] < 0.6).float()  # b ~ Bernoulli(keep_prob)
    alpha, beta = u[1] * 2 - 1, u[2]
    fwd, bwd = mask + alpha - mask * alpha, mask + beta - mask * beta
    naive = x * bwd + (x * fwd - x * bwd).detach()  # official shake_drop_train
    (ndx,) = torch.autograd.grad(naive, x, g)
    assert torch.allclose(out, naive, atol=1e-6)
    assert torch.allclose(dx, ndx, atol=1e-6)
    assert not torch.allclose(dx, g * fwd, atol=1e-3)  # beta really differs from alpha


def test_shakeshake_eval_is_the_mean_of_train():
    n = 200_000
    a, b = torch.full((n, 1), 2.0), torch.full((n, 1), -1.0)
    layer = ShakeShake()
    torch.manual_seed(4)
    train_mean = layer.train()(a, b).mean()
    assert layer.eval()(a[:1], b[:1]).item() == pytest.approx(0.5)
    assert train_mean.item() == pytest.approx(0.5, abs=0.015)  # ~7 standard errors


def test_shakedrop_eval_is_the_mean_of_train():
    n = 200_000
    x = torch.full((n, 1), 1.5)
    layer = ShakeDrop(keep_prob=0.7, alpha_range=(-0.5, 1.0))
    expected = (0.7 + 0.25 - 0.7 * 0.25) * 1.5  # E[b + alpha - b*alpha] * x, E[alpha] = 0.25
    torch.manual_seed(5)
    train_mean = layer.train()(x).mean()
    assert layer.eval()(x[:1]).item() == pytest.approx(expected)
    assert train_mean.item() == pytest.approx(expected, abs=0.015)


def test_set_true_gradient_toggles_every_layer():
    model = nn.Sequential(ShakeShakeResNet(blocks_per_group=2, base_width=4),
                          nn.Sequential(PyramidNet(depth=11, alpha=12)))
    layers = [m for m in model.modules() if isinstance(m, StochasticLayer)]
    assert len(layers) == 6 + 3
    assert not any(m.true_gradient for m in layers)
    set_true_gradient(model, True)
    assert all(m.true_gradient for m in layers)
    set_true_gradient(model, False)
    assert not any(m.true_gradient for m in layers)


def test_bf16_autocast_keeps_activations_bf16_and_trains():
    torch.manual_seed(5)
    layer = ShakeDrop(0.5).train()
    x = (torch.rand(64, 3, 2, 2) + 0.5).to(torch.bfloat16).requires_grad_(True)  # positive: ratios are safe
    out = layer(x)
    out.sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    # Per sample, forward multiplies by b + alpha - b*alpha and backward by b + beta - b*beta:
    # a kept sample (b = 1) passes unchanged both ways; a dropped one is scaled by alpha in [-1, 1]
    # forward and by beta in [0, 1] backward.
    coef = (out.float() / x.float()).flatten(1)
    grad = x.grad.float().flatten(1)
    assert torch.allclose(coef, coef[:, :1].expand_as(coef), rtol=2e-2, atol=1e-2)  # one coefficient per sample
    assert (grad == grad[:, :1]).all()
    kept = (coef == 1).all(1)
    assert 10 < int(kept.sum()) < 54  # both kinds occur (Binomial(64, 0.5))
    assert (grad[kept] == 1).all()
    assert (coef[~kept].abs() <= 1.0 + 1e-2).all() and ((grad[~kept] >= 0) & (grad[~kept] <= 1)).all()
    torch.manual_seed(6)
    model = ShakeShakeResNet(blocks_per_group=1, base_width=8, num_classes=5).train()
    images = torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        low = model(images)
    torch.manual_seed(1)  # the same draws in fp32: bf16 changes the precision, not the function
    full = model(images)
    torch.testing.assert_close(low.float(), full, rtol=0.1, atol=0.1)
    low.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("true_gradient", [True, False])
def test_compiled_layers_match_eager_under_replay(true_gradient):
    """fullgraph=True fails on any graph break (e.g. control flow on tensor values)."""
    torch.manual_seed(7)
    shake, drop = ShakeShake().train(), ShakeDrop(0.5).train()
    for layer in (shake, drop):
        layer.true_gradient = true_gradient

    def run(s, d, a, b):
        return d(s(a, b))

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (run, compiled):
        a, b, g = _shake_inputs()
        draws = RandomDraws(CPU)
        torch.manual_seed(8)
        draws.capture()
        out = fn(shake, drop, a, b)
        results.append((out, *torch.autograd.grad(out, (a, b), g)))
    for eager, comp in zip(*results):
        assert torch.allclose(eager, comp, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_replay_on_cuda():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = small_models()["pyramidnet_shakedrop"].to(device).train()
    x = torch.randn(8, 3, 16, 16, device=device)
    draws = RandomDraws(device)
    draws.capture()
    first = model(x)
    draws.replay()
    assert torch.equal(first, model(x))
    assert not torch.equal(first, model(x))

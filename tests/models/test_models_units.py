"""The model zoo's plumbing, cheaply: registration into a registry of the test's own, name
resolution and the unknown-name message, the constructors' defaults (on the meta device), the
ShakeDrop / Shake-Shake draws against the documented layout of their uniforms, and finetuning's
weights (timm's pretrained path fed a local file, every accepted file layout, the head rule)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import sam_repro.models.registry as R
from sam_repro.config import ModelConfig
from sam_repro.models import (CifarResNet, PyramidNet, ShakeDrop, ShakeShake, ShakeShakeResNet, WeightsError,
                              WideResNet, create_model, create_model_from_config, is_model, list_models,
                              pretrained_input, register_model, register_model_pattern)
from sam_repro.models.finetune import classifier_prefixes, load_backbone, read_state_dict, timm_pretrained
from sam_repro.models.resnet_cifar import _register
from sam_repro.models.stochastic import _per_sample_uniform, scale_grad
from sam_repro.models.wrn import _register_common

TINY = "timm/test_efficientnet"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch):
    """Empty registries for the test to fill (the real ones are filled at import)."""
    monkeypatch.setattr(R, "_MODELS", {})
    monkeypatch.setattr(R, "_PATTERNS", [])
    return R


# -- registry ----------------------------------------------------------------------------------------

def test_register_model_and_its_refusals(registry) -> None:
    fn = lambda num_classes, in_chans=3, **kw: nn.Linear(in_chans, num_classes, **kw)
    assert register_model("tiny")(fn) is fn and registry._MODELS == {"tiny": fn}
    with pytest.raises(ValueError, match="'tiny' is already registered"):
        register_model("tiny")(fn)
    with pytest.raises(ValueError, match="reserved for timm"):
        register_model("timm/x")(fn)
    model = create_model("tiny", num_classes=4, in_chans=2, bias=False)
    assert (model.in_features, model.out_features, model.bias) == (2, 4, None)


def test_register_model_pattern_parses_names_into_keywords(registry) -> None:
    def parse(m):
        if int(m[1]) > 9:
            raise ValueError(f"size must be below 10; got {m[1]}")
        return {"out": int(m[1])}

    build = lambda num_classes, in_chans=3, out=1, **kw: nn.Sequential(nn.Linear(in_chans, out), nn.Linear(out, num_classes))
    assert register_model_pattern(r"lin(\d+)", "lin<k> with k < 10", parse)(build) is build
    [p] = registry._PATTERNS
    assert (p.regex.pattern, p.description, p.parse, p.factory) == (r"lin(\d+)", "lin<k> with k < 10", parse, build)
    model = create_model("lin7", num_classes=3, in_chans=5)
    assert (model[0].in_features, model[0].out_features, model[1].out_features) == (5, 7, 3)
    with pytest.raises(ValueError, match=r"model.name='lin12': size must be below 10; got 12"):
        create_model("lin12", num_classes=3)
    msg = R._unknown_message("zzz")
    assert msg == "model.name='zzz' is not a registered model; choose one of:  (lin<k> with k < 10), or timm/<name>"
    register_model_pattern(r"mlp(\d+)", "mlp<k>", lambda m: {"out": int(m[1])})(build)
    assert R._unknown_message("zzz") == ("model.name='zzz' is not a registered model; choose one of:  "
                                         "(lin<k> with k < 10) (mlp<k>), or timm/<name>")


def test_common_members_register_under_their_names(registry) -> None:
    _register_common(10, 1)
    _register(8)
    assert list_models() == ["resnet8", "wrn10_1"] and registry._MODELS["wrn10_1"].__doc__ == "WRN-10-1."
    assert registry._MODELS["resnet8"].__doc__ == "CIFAR ResNet-8 (He et al. 2016, option A shortcuts)."
    wrn = create_model("wrn10_1", num_classes=5, in_chans=1, dropout=0.5)
    assert isinstance(wrn, WideResNet) and len(wrn.blocks) == 3 and wrn.fc.out_features == 5
    assert wrn.conv.in_channels == 1 and wrn.blocks[0].conv1.out_channels == 16
    assert any(isinstance(m, nn.Dropout) for m in wrn.modules())
    res = create_model("resnet8", num_classes=6, in_chans=2)
    assert isinstance(res, CifarResNet) and len(res.blocks) == 3 and (res.conv.in_channels, res.fc.out_features) == (2, 6)
    plain = registry._MODELS["wrn10_1"](num_classes=5)
    assert plain.conv.in_channels == 3  # in_chans defaults to 3
    assert registry._MODELS["resnet8"](num_classes=5).conv.in_channels == 3
    # the factory hands its keywords on: one CifarResNet does not take is refused, not dropped
    with pytest.raises(TypeError, match="dropout"):
        create_model("resnet8", num_classes=6, dropout=0.5)


def test_names_sort_naturally_and_the_unknown_name_message_lists_them() -> None:
    names = list_models()
    assert names.index("resnet20") < names.index("resnet32") < names.index("resnet110")
    assert names.index("wrn16_4") < names.index("wrn16_8") < names.index("wrn28_2") < names.index("wrn28_10")
    assert R._natural_key("wrn28_10") == ["wrn", 28, "_", 10, ""]
    msg = R._unknown_message("nope")
    assert msg == (f"model.name='nope' is not a registered model; choose one of: {', '.join(names)} "
                   "(any wrn<depth>_<k> with depth = 6n+4), or timm/<name>")


def test_timm_names_resolve_and_ours_do_not() -> None:
    assert R.timm_name("resnet32") is None and R.timm_name("wrn22_4") is None and R.timm_name("not_a_net") is None
    assert R.timm_name("timm/resnet18") == "resnet18" and R.timm_name("resnet18") == "resnet18"
    assert is_model("timm/hf-hub:someone/some-model")  # resolved by timm itself when created
    model = create_model("timm/resnet18", num_classes=5, in_chans=1, drop_rate=0.25)
    assert model.drop_rate == 0.25 and model.conv1.in_channels == 1
    wrn = create_model("wrn22_2", num_classes=5, in_chans=1, dropout=0.2)
    assert wrn.conv.in_channels == 1 and len(wrn.blocks) == 9 and isinstance(wrn.blocks[0].dropout, nn.Dropout)
    assert create_model("wrn10_1", num_classes=3).fc.in_features == 64  # width 1 is a width


# -- constructors' defaults (meta: shapes only) --------------------------------------------------

def test_constructor_defaults_are_the_papers_networks() -> None:
    with torch.device("meta"):
        assert n_params(WideResNet()) == n_params(create_model("wrn28_10", num_classes=10)) == 36_220_634
        assert n_params(CifarResNet()) == 464_154 and CifarResNet().fc.out_features == 10
        pyr = PyramidNet()
        assert n_params(pyr) == n_params(create_model("pyramidnet272_shakedrop", num_classes=10))
        assert sum(isinstance(m, ShakeDrop) for m in pyr.modules()) == 90 and pyr.fc.out_features == 10
        shake = ShakeShakeResNet()
        assert n_params(shake) == n_params(create_model("shakeshake26_2x96d", num_classes=10))
        assert shake.fc.in_features == 384 and len(shake.blocks) == 12 and shake.fc.out_features == 10
        assert WideResNet().fc.out_features == 10 and ShakeShakeResNet(1, 1).fc.in_features == 4


def test_imagenet_resnets_pass_keywords_to_torchvision_and_swap_any_other_stem() -> None:
    with torch.device("meta"):
        wide = create_model("resnet50", num_classes=10, width_per_group=128)  # torchvision's wide_resnet50_2
        assert n_params(wide) > 1.5 * n_params(create_model("resnet50", num_classes=10))
        four = create_model("resnet50", num_classes=10, in_chans=4)
        assert four.conv1.in_channels == 4 and four.conv1.bias is None


# -- the shake layers' draws -----------------------------------------------------------------------

def test_per_sample_uniforms_follow_the_input_device() -> None:
    u = _per_sample_uniform(3, torch.empty(5, 2, 4, 4, device="meta"))
    assert u.device.type == "meta" and u.shape == (3, 5, 1, 1, 1) and u.dtype == torch.float32


def test_scale_grad_keeps_the_inputs_dtype_both_ways() -> None:
    x = torch.tensor([1.0, 2.0, 4.0], dtype=torch.bfloat16, requires_grad=True)
    y = scale_grad(x, torch.tensor(0.5), torch.tensor(0.25))
    assert y.dtype == torch.bfloat16 and y.tolist() == [0.5, 1.0, 2.0]
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.dtype == torch.bfloat16 and g.tolist() == [0.25, 0.25, 0.25]
    # A coefficient bf16 cannot hold: backward multiplies by its bf16 rounding (one rounding of the
    # exact product), not by the fp32 value (5 * 1/3 rounds to 1.6641 instead of 1.6719).
    ones = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.tensor([1.5, 3.0, 5.0, 7.0], dtype=torch.bfloat16)
    third = torch.tensor(1 / 3)
    (g,) = torch.autograd.grad(scale_grad(ones, third, third), ones, upstream)
    expected = (upstream.double() * third.to(torch.bfloat16).double()).to(torch.bfloat16)
    assert g.dtype == torch.bfloat16 and torch.equal(g, expected) and g[2].item() == 1.671875


@pytest.mark.parametrize("perturbed, replay", [(False, False), (True, False), (True, True)])
def test_shakedrop_train_coefficients_come_from_four_uniforms_per_sample(perturbed: bool, replay: bool) -> None:
    """u = rand(4, N): u[0] the mask, u[1] alpha, u[2] beta, u[3] the perturbed pass's fresh mask;
    forward b + alpha - b alpha, backward b + beta - b beta, b = [mask_u < keep_prob]."""
    layer = ShakeDrop(0.6, alpha_range=(-0.5, 1.5), beta_range=(0.2, 0.7)).train()
    layer.perturbed_pass, layer.replay_mask = perturbed, replay
    x = torch.ones(64, 2, 1, 1, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    after = torch.rand(1).item()  # what the generator gives next: the layer drew exactly 4 per sample
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.manual_seed(5)
    u = torch.rand(4, 64, 1, 1, 1)
    assert torch.rand(1).item() == after
    mask_u = u[3] if perturbed and not replay else u[0]
    b = (mask_u < 0.6).float()
    alpha, beta = -0.5 + 2.0 * u[1], 0.2 + 0.5 * u[2]
    assert torch.allclose(y, ((b + alpha - b * alpha) * torch.ones(64, 1, 1, 1)).expand(64, 2, 1, 1), atol=1e-6)
    assert torch.allclose(g, ((b + beta - b * beta) * torch.ones(64, 1, 1, 1)).expand(64, 2, 1, 1), atol=1e-6)
    assert 0 < b.sum() < 64


def test_shakedrop_drops_a_sample_whose_mask_uniform_equals_keep_prob() -> None:
    """b = [u < keep_prob] with u ~ U[0, 1): P(b = 1) is keep_prob exactly. Here keep_prob is the
    first sample's own mask uniform, so that sample is dropped (coefficient alpha = 0.5)."""
    torch.manual_seed(9)
    u = torch.rand(4, 16, 1, 1, 1)
    p = u[0, 0].item()
    layer = ShakeDrop(p, alpha_range=(0.5, 0.5)).train()
    torch.manual_seed(9)
    y = layer(torch.ones(16, 1, 1, 1))
    assert y[0].item() == 0.5
    assert torch.equal(y.flatten(), torch.where(u[0] < p, 1.0, 0.5).flatten())


def test_shakedrop_keep_probability_is_a_probability() -> None:
    for bad in (-0.1, 1.5, 2.0):
        with pytest.raises(ValueError, match="keep_prob must be in"):
            ShakeDrop(bad)
    assert ShakeDrop(0.0).keep_prob == 0.0 and ShakeDrop(1.0).keep_prob == 1.0


def test_shakeshake_train_mixes_with_two_uniforms_per_sample() -> None:
    layer = ShakeShake().train()
    a, b = torch.ones(8, 1, 1, 1, requires_grad=True), torch.zeros(8, 1, 1, 1, requires_grad=True)
    torch.manual_seed(3)
    y = layer(a, b)
    ga, gb = torch.autograd.grad(y.sum(), (a, b))
    torch.manual_seed(3)
    alpha, beta = torch.rand(2, 8, 1, 1, 1)
    assert torch.allclose(y, alpha) and torch.allclose(ga, beta) and torch.allclose(gb, 1 - beta)


# -- finetuning weights ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(1)
    model = create_model(TINY, num_classes=3)
    path = tmp_path_factory.mktemp("w") / "weights.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_timm_pretrained_loads_the_weights_and_makes_a_new_head(saved) -> None:
    """timm's pretrained path, fed a local file (no network): the backbone is the file's, the head
    is a new one of num_classes, and in_chans and keywords reach timm."""
    path, state = saved
    torch.manual_seed(0)
    model = timm_pretrained(TINY, 5, pretrained_cfg_overlay={"file": str(path)})
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith("classifier."))
    assert model.classifier.out_features == 5 and model.conv_stem.in_channels == 3
    one = timm_pretrained("test_efficientnet", 2, in_chans=1, pretrained_cfg_overlay={"file": str(path)})
    assert one.conv_stem.in_channels == 1 and one.classifier.out_features == 2
    cfg = ModelConfig(name=TINY, pretrained=True, kwargs={"pretrained_cfg_overlay": {"file": str(path)}})
    via = create_model_from_config(OmegaConf.structured(cfg), num_classes=4, in_chans=1)
    assert via.classifier.out_features == 4 and via.conv_stem.in_channels == 1


def test_timm_pretrained_refuses_our_names_and_says_why_weights_are_missing(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(WeightsError, match="model.pretrained=true needs a timm model .* 'resnet32' is one of ours"):
        timm_pretrained("resnet32", 10)
    with pytest.raises(WeightsError) as err:
        timm_pretrained(TINY, 3, pretrained_cfg_overlay={"file": str(tmp_path / "missing.pth")})
    msg = str(err.value)
    assert msg.startswith("model.pretrained=true: no weights for 'test_efficientnet' (") and "\n" not in msg
    assert "(FileNotFoundError: " in msg and msg.endswith("or model.checkpoint=<path to a state_dict file>")


class Quiet(Exception):
    def __str__(self) -> str:
        return ""


@pytest.mark.parametrize("error, shown", [(Quiet(), "Quiet: "), (RuntimeError("no network\nretry later"),
                                                                 "RuntimeError: no network")])
def test_timms_error_shows_as_its_first_line(monkeypatch, error: Exception, shown: str) -> None:
    import timm

    def fail(*a, **kw):
        raise error

    monkeypatch.setattr(timm, "create_model", fail)
    with pytest.raises(WeightsError) as err:
        timm_pretrained(TINY, 3)
    assert f"no weights for 'test_efficientnet' ({shown}); supply" in str(err.value)


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "model_state_dict", "ddp", "compiled", "safetensors"])
def test_read_state_dict_accepts_every_documented_layout(saved, tmp_path: Path, layout: str) -> None:
    _, state = saved
    path = tmp_path / "w.pt"
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path := tmp_path / "w.safetensors"))
    elif layout in ("ddp", "compiled"):
        prefix = "module." if layout == "ddp" else "_orig_mod."
        torch.save({f"{prefix}{k}": v for k, v in state.items()}, path)
    elif layout == "plain":
        torch.save({**state, "note": "not a tensor"}, path)
    else:
        torch.save({layout: state, "epoch": 3}, path)
    got = read_state_dict(path)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    assert all(v.device.type == "cpu" for v in got.values())


def test_read_state_dict_reads_safetensors_itself(saved, tmp_path: Path, monkeypatch) -> None:
    """A .safetensors file goes to safetensors, not torch.load (torch >= 2.4 is supported; only
    recent torch.load reads safetensors files): here a torch.load that cannot read them."""
    from safetensors.torch import save_file

    _, state = saved
    save_file({k: v.contiguous() for k, v in state.items()}, str(path := tmp_path / "w.safetensors"))
    real_load = torch.load

    def old_torch_load(f, *args, **kwargs):
        if str(f).endswith(".safetensors"):
            raise RuntimeError("invalid load key, 'x'")  # what a pickle reader says about safetensors
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", old_torch_load)
    got = read_state_dict(path)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_read_state_dict_maps_gpu_checkpoints_to_the_cpu(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint saved from a GPU (its storages tagged cuda:0) loads onto the CPU, on any machine."""
    import torch.serialization as S

    with monkeypatch.context() as m:
        m.setattr(S, "location_tag", lambda storage: "cuda:0")
        torch.save({"w": torch.arange(3.0)}, path := tmp_path / "gpu.pt")
    got = read_state_dict(path)
    assert got["w"].device.type == "cpu" and got["w"].tolist() == [0.0, 1.0, 2.0]


def test_read_state_dict_never_unpickles_code_whatever_the_environment(tmp_path: Path, monkeypatch) -> None:
    """weights_only=True is explicit: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD (which flips torch.load's
    default) does not let a pickled module through."""
    torch.save({"x": torch.zeros(1), "fn": torch.nn.Linear(1, 1)}, path := tmp_path / "module.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(WeightsError, match="is not a readable weights file"):
        read_state_dict(path)


def test_read_state_dict_refuses_what_is_not_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such file"):
        read_state_dict(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="is not a readable weights file"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="holds a list, not a state_dict"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"x": torch.zeros(1), "fn": torch.nn.Linear(1, 1)}, tmp_path / "module.pt")
    with pytest.raises(WeightsError, match="is not a readable weights file"):  # weights_only: no pickled code
        read_state_dict(tmp_path / "module.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "W.SAFETENSORS.pt")
    assert list(read_state_dict(tmp_path / "W.SAFETENSORS.pt")) == ["w"]


def test_the_head_is_timms_classifier_or_the_last_linear_layer() -> None:
    assert classifier_prefixes(create_model(TINY, num_classes=3)) == ["classifier."]
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 4))
    assert classifier_prefixes(model) == ["3."]
    model.pretrained_cfg = {"classifier": ("head", "head_dist")}
    assert classifier_prefixes(model) == ["head.", "head_dist."]
    model.pretrained_cfg = {"classifier": "fc"}
    assert classifier_prefixes(model) == ["fc."]
    model.pretrained_cfg = {}
    assert classifier_prefixes(model) == ["3."]
    assert classifier_prefixes(nn.Sequential(nn.Conv2d(1, 1, 1))) == []


def test_load_backbone_names_what_does_not_fit(tmp_path: Path) -> None:
    src = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 4))
    torch.save(src.state_dict(), path := tmp_path / "w.pt")
    dst = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 9))  # another head: fine
    load_backbone(dst, path)
    assert torch.equal(dst[0].weight, src[0].weight) and dst[2].out_features == 9
    state = src.state_dict()
    del state["1.num_batches_tracked"]  # older checkpoints lack the counter: not a missing weight
    torch.save(state, path)
    load_backbone(dst, path)
    wrong = nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5), nn.Linear(5, 4))
    with pytest.raises(WeightsError) as err:
        load_backbone(wrong, path)
    # six backbone tensors of another shape (the head, 2.*, is new anyway); three named
    assert "6 of another shape (e.g. 0.weight (3, 2) vs (5, 2), 0.bias (3,) vs (5,), 1.weight (3,) vs (5,))" in str(err.value)
    torch.save({**src.state_dict(), "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"1 unexpected \(e.g. extra.weight\); is it the same"):
        load_backbone(dst, path)
    torch.save({**{k: v for k, v in src.state_dict().items() if k != "0.bias"}, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r": 1 missing \(e.g. 0.bias\); 1 unexpected \(e.g. extra.weight\); is it"):
        load_backbone(dst, path)
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("1.")}, path)
    with pytest.raises(WeightsError, match=r"does not fit model Sequential: 4 missing \(e.g. 1.weight, 1.bias, 1.running_mean\)"):
        load_backbone(dst, path)


def test_pretrained_input_defaults_when_the_config_is_silent() -> None:
    model = nn.Linear(1, 1)
    model.pretrained_cfg = {"input_size": (3, 96, 80), "mean": (0.5,) * 3, "std": (0.25,) * 3,
                            "interpolation": "lanczos"}
    cfg = ModelConfig(name="x", pretrained=True)
    assert pretrained_input(model, cfg) == {"image_size": 96, "mean": (0.5,) * 3, "std": (0.25,) * 3,
                                            "crop_pct": 0.875, "interpolation": "bilinear"}
    model.pretrained_cfg["interpolation"] = "nearest"
    assert pretrained_input(model, cfg)["interpolation"] == "nearest"
    del model.pretrained_cfg
    assert pretrained_input(model, cfg) == {}


def test_pretrained_input_fills_what_the_resolver_leaves_out(monkeypatch) -> None:
    """timm's resolver fills crop_pct and interpolation itself (0.875, bicubic), so the test above
    sees timm's defaults; a resolver that leaves them out gets ours: 0.875 and bilinear."""
    import timm.data

    model = nn.Linear(1, 1)
    model.pretrained_cfg = {"input_size": (3, 64, 64)}
    monkeypatch.setattr(timm.data, "resolve_model_data_config",
                        lambda m: {"input_size": (3, 64, 48), "mean": (0.5,) * 3, "std": (0.25,) * 3})
    assert pretrained_input(model, ModelConfig(name="x", pretrained=True)) == {
        "image_size": 64, "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 0.875, "interpolation": "bilinear"}


def test_model_keywords_reach_the_constructor_as_plain_containers(registry) -> None:
    """An OmegaConf kwargs node reaches the factory resolved and as plain lists and dicts (not
    ListConfig / DictConfig, which fail isinstance(x, list / dict) checks)."""
    got = {}

    def build(num_classes, in_chans=3, **kw):
        got.update(kw)
        return nn.Linear(in_chans, num_classes)

    register_model("recorder")(build)
    cfg = OmegaConf.create({"name": "recorder", "pretrained": False, "checkpoint": None, "n": 4,
                            "kwargs": {"sizes": [1, "${n}"], "inner": {"k": "${n}"}}})
    create_model_from_config(cfg, num_classes=2)
    assert got == {"sizes": [1, 4], "inner": {"k": 4}}
    assert type(got["sizes"]) is list and type(got["inner"]) is dict


@pytest.mark.parametrize("kwargs", [None, {"dropout": 0.5}, OmegaConf.create({"dropout": 0.5, "shortcut": "${s}"})])
def test_model_keywords_reach_the_constructor_resolved(kwargs) -> None:
    cfg = OmegaConf.create({"name": "wrn10_1", "pretrained": False, "checkpoint": None, "kwargs": kwargs, "s": "conv"})
    if isinstance(kwargs, dict):
        cfg.kwargs = kwargs
    model = create_model_from_config(cfg, num_classes=4, in_chans=2)
    assert model.conv.in_channels == 2 and model.fc.out_features == 4
    assert isinstance(model.blocks[0].dropout, nn.Dropout) == (kwargs is not None)
    if kwargs is not None and not isinstance(kwargs, dict):
        assert model.blocks[1].projection is not None  # the interpolation ${s} resolved to "conv"


def test_checkpoint_keeps_in_chans_and_keywords(tmp_path: Path) -> None:
    torch.manual_seed(2)
    one_channel = create_model(TINY, num_classes=3, in_chans=1)
    torch.save(one_channel.state_dict(), path := tmp_path / "gray.pt")
    cfg = OmegaConf.create({"name": TINY, "pretrained": False, "checkpoint": None, "kwargs": {"drop_rate": 0.3}})
    assert create_model_from_config(cfg, num_classes=3).drop_rate == 0.3
    cfg.checkpoint = str(path)
    loaded = create_model_from_config(cfg, num_classes=5, in_chans=1)
    assert loaded.drop_rate == 0.3 and loaded.conv_stem.in_channels == 1 and loaded.classifier.out_features == 5
    assert torch.equal(loaded.conv_stem.weight, one_channel.conv_stem.weight)
    dataclass_cfg = ModelConfig(name="wrn10_1", kwargs={"dropout": 0.5})  # kwargs a plain dict
    assert isinstance(create_model_from_config(dataclass_cfg, num_classes=3).blocks[0].dropout, nn.Dropout)

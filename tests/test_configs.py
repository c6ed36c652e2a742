"""The Hydra config tree: every preset composes and validates, with the paper's hyperparameters."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from sam_repro.config import config_dir
from sam_repro.models import list_models
from sam_repro.validate import ConfigError, validate
from tests.conftest import compose_config

PRESETS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))

# The paper's numbers (App. C, Tables 6-7; docs/paper.md#hyperparameters-per-setting), restated here
# independently of the YAML files.
PAPER_SETTINGS = {
    # preset: (dataset, model, lr, weight decay, rho, epochs)
    "t1_cifar10_wrn28_10_200ep": ("cifar10", "wrn28_10", 0.1, 5e-4, 0.05, 200),
    "t1_cifar100_wrn28_10_200ep": ("cifar100", "wrn28_10", 0.1, 5e-4, 0.1, 200),
    "t1_cifar10_wrn28_10_1800ep": ("cifar10", "wrn28_10", 0.05, 1e-3, 0.05, 1800),
    "t1_cifar100_wrn28_10_1800ep": ("cifar100", "wrn28_10", 0.05, 1e-3, 0.1, 1800),
    "t1_cifar10_shakeshake": ("cifar10", "shakeshake26_2x96d", 0.02, 1e-3, 0.02, 1800),
    "t1_cifar100_shakeshake": ("cifar100", "shakeshake26_2x96d", 0.02, 1e-3, 0.05, 1800),
    "t1_cifar10_pyramidnet": ("cifar10", "pyramidnet272", 0.05, 5e-4, 0.05, 1800),
    "t1_cifar100_pyramidnet": ("cifar100", "pyramidnet272", 0.05, 5e-4, 0.2, 1800),
    "t1_cifar10_pyramidnet_shakedrop": ("cifar10", "pyramidnet272_shakedrop", 0.02, 5e-4, 0.05, 1800),
    "t1_cifar100_pyramidnet_shakedrop": ("cifar100", "pyramidnet272_shakedrop", 0.05, 5e-4, 0.05, 1800),
    "t4_cifar10_resnet32_noise20": ("cifar10", "resnet32", 0.1, 5e-4, 0.1, 200),
    "t4_cifar10_resnet32_noise40": ("cifar10", "resnet32", 0.1, 5e-4, 0.1, 200),
    "t4_cifar10_resnet32_noise60": ("cifar10", "resnet32", 0.1, 5e-4, 0.1, 200),
    "t4_cifar10_resnet32_noise80": ("cifar10", "resnet32", 0.1, 5e-4, 0.05, 200),
    "t5_svhn_wrn28_10": ("svhn", "wrn28_10", 0.01, 5e-4, 0.01, 200),
    "t5_svhn_shakeshake": ("svhn", "shakeshake26_2x96d", 0.01, 5e-4, 0.01, 200),
    "t5_fashion_mnist_wrn28_10": ("fashion_mnist", "wrn28_10", 0.1, 5e-4, 0.05, 200),
    "t5_fashion_mnist_shakeshake": ("fashion_mnist", "shakeshake26_2x96d", 0.1, 5e-4, 0.02, 200),
}


def preset_values(preset: str) -> dict[str, object]:
    """Every leaf value a preset file sets in its body (its defaults list aside), as dotted keys."""
    body = OmegaConf.to_container(OmegaConf.load(config_dir() / "experiment" / f"{preset}.yaml"))
    body.pop("defaults", None)
    out: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(body, "")
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_validates_and_keeps_its_values_under_overrides(preset: str) -> None:
    own = preset_values(preset)
    for extra in ([], ["optim=sgd"], ["augment=cutout", "seed=3"]):
        cfg = compose_config([f"experiment={preset}", *extra])
        validate(cfg)
        assert cfg.name == preset
        OmegaConf.to_yaml(cfg, resolve=True)  # every interpolation resolves
        # The preset's own values survive a group override (its body merges last); a command-line
        # value (seed=3) wins over the preset's.
        for key, value in own.items():
            if key == "seed" and "seed=3" in extra:
                continue
            if isinstance(value, str) and "${" in value:  # an interpolation (linear_lr ...): resolves, checked above
                continue
            got = OmegaConf.select(cfg, key)
            assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value, (key, extra)
        if "optim=sgd" in extra:
            assert cfg.optim.name == "sgd"
        if "seed=3" in extra:
            assert cfg.seed == 3 and cfg.augment.name == "cutout" and cfg.augment.cutout == (own.get("augment.cutout", 16))


def test_paper_presets_carry_the_papers_hyperparameters() -> None:
    assert set(PAPER_SETTINGS) <= set(PRESETS)
    for preset, (dataset, model, lr, wd, rho, epochs) in PAPER_SETTINGS.items():
        cfg = compose_config([f"experiment={preset}"])
        got = (cfg.dataset.name, cfg.model.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.rho, cfg.epochs)
        assert got == (dataset, model, lr, wd, rho, epochs), preset
        assert cfg.batch_size == 256 and cfg.optim.momentum == 0.9 and cfg.optim.nesterov
        assert cfg.sched.name == "cosine" and cfg.sched.warmup_epochs == 0
    noise = {p: compose_config([f"experiment={p}"]).dataset.label_noise for p in PAPER_SETTINGS if p.startswith("t4")}
    assert noise == {f"t4_cifar10_resnet32_noise{n}": n / 100 for n in (20, 40, 60, 80)}


def test_official_semantics_are_the_defaults() -> None:
    cfg = compose_config([])
    assert cfg.optim.name == "sam" and cfg.optim.wd_mode == "loss" and cfg.optim.bn_stats == "first_pass"
    assert cfg.optim.grad_clip == 5.0 and cfg.optim.true_gradient and cfg.optim.wd_on_bn
    assert cfg.augment.pad_mode == "reflect" and cfg.resume == "auto"


def test_augment_presets() -> None:
    basic = compose_config(["augment=basic"]).augment
    assert (basic.crop, basic.flip, basic.padding, basic.cutout, basic.autoaugment) == (True, True, 4, 0, None)
    assert compose_config(["augment=cutout"]).augment.cutout == 16
    aa = compose_config(["augment=autoaugment"]).augment
    assert (aa.autoaugment, aa.cutout, aa.crop) == ("cifar10", 16, True)
    assert compose_config(["augment=autoaugment_svhn"]).augment.autoaugment == "svhn"


def test_every_registered_model_has_a_config_file_and_back() -> None:
    files = {p.stem for p in (config_dir() / "model").glob("*.yaml")}
    assert set(list_models()) <= files
    for name in files:
        assert compose_config([f"model={name}"]).model.name in list_models() or name == "timm"


# The authors' CIFAR hyperparameters of each SAM-family method (docs/methods.md, which names each source),
# restated here independently of configs/optim/<name>.yaml: (rho, eps, {its own keys})
METHOD_DEFAULTS = {
    "gsam": (2.0, 1e-12, {"gsam_rho_min": None, "gsam_alpha": 0.4, "gsam_lr_min": 0.0, "gsam_adaptive": "pytorch"}),
    "esam": (0.05, 1e-7, {"esam_beta": 0.6, "esam_gamma": 0.5, "esam_selection": "strict",
                          "esam_swp_draw": "end_of_step", "esam_sharpness_bn": "update"}),
    "fsam": (0.2, 1e-12, {"fsam_sigma": 1.0, "fsam_lambda": 0.6}),
    "vasso": (0.05, 1e-7, {"vasso_theta": 0.9}),
    "samon": (0.5, 1e-16, {"samon_select": "type"}),
    "asam_on": (10.0, 1e-16, {"eta": 0.0, "samon_select": "type", "samon_normalize_bias": True}),
    "interval_sam": (0.5, 1e-12, {"sam_interval": 10}),
    "looksam": (0.05, 1e-12, {"looksam_k": 5, "looksam_alpha": 0.7, "looksam_projection": "model"}),
    "rwp": (None, None, {"rwp_alpha": 0.5, "rwp_gamma": 0.01}),  # no radius: the noise scales with the weights
    "wsam": (0.05, 1e-12, {"wsam_gamma": 0.88, "wsam_max_norm": 1.0, "wsam_decouple": True}),
}


@pytest.mark.parametrize("method", sorted(METHOD_DEFAULTS))
def test_each_method_config_carries_its_authors_defaults_and_keeps_the_presets_semantics(method: str) -> None:
    rho, eps, own = METHOD_DEFAULTS[method]
    cfg = compose_config(["experiment=t1_cifar10_wrn28_10_200ep", f"optim={method}"])
    validate(cfg)
    o = cfg.optim
    assert o.name == method and o.p == 2
    assert (rho is None or o.rho == rho) and (eps is None or o.eps == eps)
    assert {k: o[k] for k in own} == own
    # the preset's own semantics stay: its lr and decay, L2 in the loss, BN statistics from the first pass
    assert (o.lr, o.weight_decay, o.wd_mode, o.bn_stats, o.grad_clip) == (0.1, 5e-4, "loss", "first_pass", 5.0)


def test_every_method_has_a_config_file_and_back() -> None:
    from sam_repro.optim.factory import METHODS

    files = {p.stem for p in (config_dir() / "optim").glob("*.yaml")}
    assert files == set(METHODS) and set(METHOD_DEFAULTS) | {"sgd", "sam", "asam"} == files


def test_unknown_key_and_wrong_type_fail_at_composition() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config(["optim.rhoo=0.1"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["optim.rho=abc"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["epochs=ten"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.rho=-0.1", "optim.rho=-0.1"),
        ("optim.p=3", "optim.p=3.0"),
        ("optim.m=100", "optim.m=100"),
        ("dataset.label_noise=1.0", "dataset.label_noise=1.0"),
        ("epochs=0", "epochs=0"),
        ("batch_size=0", "batch_size=0"),
        ("model.name=resnet33", "model.name='resnet33'"),
        ("dataset.noise_kind=pairs", "dataset.noise_kind='pairs'"),
        ("optim.wd_mode=both", "optim.wd_mode='both'"),
        ("engine.precision=fp8", "engine.precision='fp8'"),
    ],
)
def test_bad_values_get_one_line_naming_key_value_and_allowed(override: str, key: str) -> None:
    cfg = compose_config(["experiment=smoke", override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert len(err.value.problems) == 1
    line = err.value.problems[0]
    assert line.startswith(key) and ("must" in line or "choose one of" in line), line
    assert "\n" not in line


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["model.name=resnet33", "dataset.name=mnist2", "dataset.source=folder"]))
    model_line, dataset_line = sorted(err.value.problems, key=lambda s: not s.startswith("model"))
    assert "wrn28_10" in model_line and "pyramidnet272_shakedrop" in model_line and "timm/<name>" in model_line
    assert "cifar100" in dataset_line and "svhn" in dataset_line

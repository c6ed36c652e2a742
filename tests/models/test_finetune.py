"""Finetuning (Table 3) offline: a tiny timm model (test_efficientnet) whose weights the tests save and
reload through model.checkpoint=PATH, tiny image folders, frozen BatchNorm under the SAM step, the
pretrained config's input size, CIFAR upsampling, the presets, and `sam-train` end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sam_repro.config import AugmentConfig, DatasetConfig, ModelConfig, OptimConfig
from sam_repro.data import ImageFiles, fit_to_model, load_data, make_eval_loader, make_train_loader, normalize, normalize_coeffs
from sam_repro.data.augment import resize
from sam_repro.engine.loop import set_train_mode
from sam_repro.engine.step import StepConfig, TrainStep
from sam_repro.models import WeightsError, create_model, create_model_from_config, pretrained_input
from sam_repro.optim.factory import build_optimizer
from sam_repro.report.paper import normalize_model
from sam_repro.validate import ConfigError, validate
from tests.conftest import compose_config, sam_train
from tests.data.test_imagenet import write_jpeg_folder

CPU = torch.device("cpu")
TINY = "timm/test_efficientnet"  # 0.1M parameters, BatchNorm, pretrained config: 160 px, bicubic
HEAD = "classifier."


def backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(HEAD)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    """A 'pretrained' test_efficientnet with 3 classes (as many as the target, so a kept head would fit)."""
    torch.manual_seed(123)
    model = create_model(TINY, num_classes=3)
    with torch.no_grad():  # BatchNorm statistics a fresh model would not have
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "test_efficientnet.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict_ddp", "safetensors"])
def test_checkpoint_loads_the_backbone_and_keeps_a_new_head(saved, tmp_path: Path, layout: str) -> None:
    path, state = saved
    if layout == "model":  # a sam-train checkpoint.pt keeps it under "model"
        torch.save({"model": state, "epoch": 3}, path := tmp_path / "ckpt.pt")
    elif layout == "state_dict_ddp":  # a training checkpoint of a DistributedDataParallel model
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path := tmp_path / "ckpt.pth")
    elif layout == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path := tmp_path / "model.safetensors"))
    torch.manual_seed(0)
    model = create_model_from_config(ModelConfig(name=TINY, checkpoint=str(path)), num_classes=3)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in backbone(state).items()), "every backbone weight and BN statistic"
    assert got["classifier.weight"].shape == (3, 256)
    assert not torch.equal(got["classifier.weight"], state["classifier.weight"]), "the head is new, not the saved one"
    # another dataset: a head of its own size
    assert create_model_from_config(ModelConfig(name=TINY, checkpoint=str(path)), num_classes=11).classifier.out_features == 11


def test_weights_of_another_architecture_are_one_clear_error(saved) -> None:
    path, _ = saved
    with pytest.raises(WeightsError) as err:
        create_model_from_config(ModelConfig(name="timm/resnet10t", checkpoint=str(path)), num_classes=3)
    msg = str(err.value)
    assert "\n" not in msg and "missing" in msg and "unexpected" in msg and "conv_stem.weight" in msg


def test_missing_weights_name_both_ways_to_supply_them(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["experiment=t3_flowers102_efficientnet_b7", f"model.checkpoint={missing}"]))
    (line,) = err.value.problems
    assert line.startswith(f"model.checkpoint='{missing}' is invalid: no such file")
    assert "model.pretrained=true" in line and "model.checkpoint=<path" in line


@pytest.mark.slow
def test_pretrained_weights_offline_exit_2_with_one_line(tmp_path: Path) -> None:
    root = write_jpeg_folder(tmp_path / "flowers", classes=3, train=2, evaluate=1, eval_split="test")
    result = sam_train(["experiment=t3_flowers102_efficientnet_b7", "dataset.source=folder", f"dataset.root={root}",
                        f"model.name={TINY}.r160_in1k", "engine.device=cpu", f"runs_root={tmp_path / 'runs'}"],
                       cwd=tmp_path, timeout=120, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("sam-train: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "model.pretrained=true: no weights for 'test_efficientnet.r160_in1k'" in errors[0]
    assert "model.checkpoint=<path" in errors[0] and "HF_HUB_OFFLINE" in errors[0]


def test_input_follows_the_pretrained_config(saved) -> None:
    path, _ = saved
    cfg = ModelConfig(name=TINY, checkpoint=str(path))
    got = pretrained_input(create_model_from_config(cfg, num_classes=3), cfg)
    assert got == {"image_size": 160, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                   "crop_pct": 0.95, "interpolation": "bicubic"}
    assert pretrained_input(create_model(TINY, num_classes=3), ModelConfig(name=TINY)) == {}  # from scratch: the dataset's
    arrays = load_data(DatasetConfig(source="synthetic", train_size=32, test_size=8, image_size=16))
    fitted = fit_to_model(arrays, got)
    assert (fitted.image_size, fitted.mean, fitted.interpolation) == (160, got["mean"], "bicubic")
    assert fit_to_model(arrays, got, input_size=48).image_size == 48  # an explicit dataset.input_size wins
    # the paper's checkpoints (built on the meta device: no weights, no memory)
    with torch.device("meta"):
        for name, size in (("timm/tf_efficientnet_b7.ra_in1k", 600), ("timm/tf_efficientnet_l2.ns_jft_in1k_475", 475)):
            model = create_model(name, num_classes=10)
            assert pretrained_input(model, ModelConfig(name=name, pretrained=True))["image_size"] == size


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_batchnorm_statistics_survive_sam_steps(freeze: bool) -> None:
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=3)
    optimizer, sam = build_optimizer(model, OptimConfig(name="sam", rho=0.05, lr=0.1, weight_decay=1e-5))
    step = TrainStep(model, optimizer, sam, StepConfig(grad_clip=5.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3, 32, 32) * 2 + 1, torch.randint(0, 3, (8,))
    for _ in range(2):
        set_train_mode(model, freeze)
        step(x, y)
    after = model.state_dict()
    stats = [k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    unchanged = all(torch.equal(after[k], before[k]) for k in stats)
    assert unchanged == freeze
    assert not torch.equal(after["bn1.weight"], before["bn1.weight"]), "BatchNorm's affine weights still train"
    if freeze:  # in "train" mode the frozen network computes exactly what eval mode does
        set_train_mode(model, True)
        with torch.no_grad():
            train_out = model(x)
            assert torch.equal(train_out, model.eval()(x))


def test_arrays_are_upsampled_to_the_models_input_after_augmentation() -> None:
    b = fit_to_model(load_data(DatasetConfig(source="synthetic", train_size=64, test_size=16, image_size=16)),
                     {"image_size": 40, "interpolation": "bicubic"})
    none = AugmentConfig(crop=False, flip=False)
    for kind in ("device", "workers"):
        loader = make_train_loader(b.train, b, AugmentConfig(autoaugment="cifar10", cutout=8), 16, CPU, seed=0,
                                   kind=kind, num_workers=0)
        loader.set_epoch(1)
        assert next(iter(loader))[0].shape == (16, 3, 40, 40)
    loader = make_train_loader(b.train, b, none, 16, CPU, seed=0)
    loader.set_epoch(1)
    x, y = next(iter(loader))
    index = loader.batch_index(loader.permutation(CPU), 0)
    scale, shift = normalize_coeffs(b.mean, b.std)
    assert torch.allclose(x, resize(normalize(b.train.images[index], scale, shift), 40, "bicubic"))
    ex, _ = next(iter(make_eval_loader(b.test, b, 8, CPU)))
    assert ex.shape == (8, 3, 40, 40)


def test_oxford_pets_through_torchvisions_reader(tmp_path: Path) -> None:
    """torchvision parses the official annotation files; we keep its (file, label) lists."""
    base = tmp_path / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    write_jpeg_folder(tmp_path / "src", classes=2, train=2, evaluate=1)
    sources = sorted((tmp_path / "src").rglob("*.JPEG"))
    lines = {"trainval": [], "test": []}
    for i, src in enumerate(sources):
        breed, cls = ("Abyssinian", 1) if "n00000000" in str(src) else ("beagle", 2)
        image_id = f"{breed}_{i}"
        (base / "images" / f"{image_id}.jpg").write_bytes(src.read_bytes())
        lines["test" if src.parent.parent.name == "val" else "trainval"].append(f"{image_id} {cls} 1 1")
    for split, rows in lines.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    b = fit_to_model(load_data(DatasetConfig(name="oxford_pets", root=str(tmp_path))), {}, 24)
    assert isinstance(b.train, ImageFiles) and (len(b.train), len(b.test), b.num_classes) == (4, 2, 37)
    assert b.train.labels.tolist() == [0, 0, 1, 1] and b.test.labels.tolist() == [0, 1]
    assert b.train.path(0) == str(base / "images" / "Abyssinian_0.jpg") and b.auto_loader == "files"
    x, y = next(iter(make_eval_loader(b.test, b, 2, CPU)))
    assert x.shape == (2, 3, 24, 24) and y.tolist() == [0, 1]


def test_any_timm_name_is_a_backbone() -> None:
    cfg = compose_config(["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "experiment=smoke"])
    validate(cfg)
    assert type(create_model_from_config(cfg.model, num_classes=4)).__name__ == "EfficientNet"
    with pytest.raises(ConfigError, match="model.pretrained=True is invalid: pretrained weights come from timm"):
        validate(compose_config(["experiment=smoke", "model.pretrained=true"]))  # resnet20 is ours


PAPER_T3 = {"b7": ("timm/tf_efficientnet_b7.ra_in1k", "efficientnet_b7", 0.016, 1024, 5000),
            "l2": ("timm/tf_efficientnet_l2.ns_jft_in1k_475", "efficientnet_l2", 0.008, 512, 10000)}
T3_DATASETS = ["fgvc_aircraft", "flowers102", "oxford_pets", "stanford_cars", "cifar10", "cifar100", "birdsnap",
               "food101", "imagenet"]


def test_table3_presets_carry_the_recipe() -> None:
    for dataset in T3_DATASETS:
        for short, (name, logged, lr, batch, steps) in PAPER_T3.items():
            cfg = compose_config([f"experiment=t3_{dataset}_efficientnet_{short}"])
            validate(cfg)
            m, o = cfg.model, cfg.optim
            assert (m.name, m.pretrained, m.freeze_bn, normalize_model(m.name)) == (name, True, True, logged)
            assert (o.weight_decay, o.momentum, cfg.sched.name, cfg.sched.warmup_epochs) == (1e-5, 0.9, "cosine", 0)
            assert cfg.batch_size == batch and cfg.augment.name == ("autoaugment" if dataset.startswith("cifar") else "none")
            if dataset == "imagenet":
                assert (cfg.epochs, cfg.train_steps, o.lr, o.rho) == (10, None, 0.1, 0.05)
            else:
                assert (cfg.train_steps, o.lr) == (steps, lr)
    assert compose_config(["experiment=t3_cifar10_efficientnet_b7", "batch_size=256"]).optim.lr == pytest.approx(0.004)


@pytest.mark.slow
def test_sam_train_finetunes_from_a_local_checkpoint(saved, tmp_path: Path) -> None:
    path, state = saved
    root = write_jpeg_folder(tmp_path / "flowers", classes=3, train=4, evaluate=2, eval_split="test")
    result = sam_train(["experiment=t3_flowers102_efficientnet_b7", "dataset.source=folder", f"dataset.root={root}",
                        "model.name=test_efficientnet", f"model.checkpoint={path}", "dataset.input_size=32", "batch_size=6",
                        "train_steps=3", "engine.device=cpu", "engine.num_workers=0", "engine.eval_batch_size=8",
                        "engine.progress=false", f"runs_root={tmp_path / 'runs'}"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "runs").rglob("metrics.json")).parent
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["config"]["train_steps"] == 3
    assert summary["epochs_done"] == 2 and summary["data"]["train_size"] == 12  # 2 steps per epoch, then 1
    assert summary["config"]["model"] == "test_efficientnet" and summary["config"]["weight_decay"] == 1e-5
    assert run.parent == tmp_path / "runs" / "t3_flowers102_efficientnet_b7"  # a bare timm name: a flat run dir
    final = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    stats = [k for k in backbone(state) if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(final[k], state[k]) for k in stats), "BatchNorm statistics stayed frozen"
    assert not torch.equal(final["conv_stem.weight"], state["conv_stem.weight"]), "the backbone trained"
    assert final["classifier.weight"].shape == (3, 256)

"""ImageNet (Table 2) on tiny image folders written by the tests: file-backed splits, the file loader
(order a pure function of (seed, epoch), ranks' slices, transforms), engine.loader=auto, the presets
and their linear lr rule, the missing-data message, and `sam-train` end to end."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from sam_repro.config import AugmentConfig, DatasetConfig
from sam_repro.data import (DataError, ImageArrays, ImageFiles, eval_transform, fit_to_model, load_data,
                            make_eval_loader, make_train_loader, train_transform)
from sam_repro.validate import ConfigError, validate
from tests.conftest import compose_config, sam_train

CPU = torch.device("cpu")
INCEPTION = AugmentConfig(name="inception_crop", random_resized_crop=True, crop=False, flip=True)


def write_jpeg_folder(root: Path, classes: int = 12, train: int = 3, evaluate: int = 2, eval_split: str = "val",
                      seed: int = 0) -> Path:
    """root/train/<class>/*.JPEG and root/<eval_split>/<class>/*.JPEG: small images of varied sizes whose
    mean colour says the class (so a model can learn it)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), (eval_split, evaluate)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(24, 48, 2)
                base = np.array([c * 20 % 256, 255 - c * 20 % 256, (c * 57) % 256])
                img = np.clip(base + rng.integers(-25, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{split}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_jpeg_folder(tmp_path_factory.mktemp("imagenet") / "tiny")


def bundle_of(root: Path, size: int = 32, **kw):
    return fit_to_model(load_data(DatasetConfig(name="imagenet", source="folder", root=str(root), **kw)), {}, size)


def test_image_folder_gives_file_backed_splits_and_the_files_loader(tiny: Path) -> None:
    b = bundle_of(tiny)
    assert isinstance(b.train, ImageFiles) and isinstance(b.test, ImageFiles)
    assert (len(b.train), len(b.test), b.num_classes) == (36, 24, 12)
    assert b.classes[0] == "n00000000" and b.train.labels.tolist()[:4] == [0, 0, 0, 1]
    assert b.train.path(0) == str(tiny / "train" / "n00000000" / "train_0.JPEG")
    assert b.auto_loader == "files" and b.image_size == 32 and b.mean == (0.485, 0.456, 0.406)
    arrays = load_data(DatasetConfig(source="synthetic", train_size=64, test_size=16))
    assert isinstance(arrays.train, ImageArrays) and arrays.auto_loader == "device"
    # the device-resident loader refuses files, naming the way out
    with pytest.raises(DataError, match="engine.loader=auto"):
        make_train_loader(b.train, b, INCEPTION, 8, CPU, seed=0, kind="device")


def test_fingerprint_follows_the_file_list_not_the_location(tiny: Path, tmp_path: Path) -> None:
    fp = load_data(DatasetConfig(name="imagenet", source="folder", root=str(tiny))).info["fingerprint"]
    moved = tmp_path / "copy"
    shutil.copytree(tiny, moved)  # another disk or node: the same data, new mtimes
    assert load_data(DatasetConfig(name="imagenet", source="folder", root=str(moved))).info["fingerprint"] == fp
    next((moved / "train" / "n00000003").iterdir()).unlink()
    assert load_data(DatasetConfig(name="imagenet", source="folder", root=str(moved))).info["fingerprint"] != fp


def epoch(loader, e: int) -> list:
    loader.set_epoch(e)
    return list(loader)


def test_files_loader_is_a_pure_function_of_seed_epoch_and_rank(tiny: Path) -> None:
    b = bundle_of(tiny)
    make = lambda workers, seed=0, **kw: make_train_loader(b.train, b, INCEPTION, 12, CPU, seed=seed, kind="files",
                                                           num_workers=workers, **kw)
    a, w = epoch(make(0), 1), epoch(make(2), 1)
    assert len(a) == 3 and a[0][0].shape == (12, 3, 32, 32) and a[0][0].dtype == torch.float32
    assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, w)), "worker count changes nothing"
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(b.train.labels.tolist())  # each example once
    assert not torch.equal(a[0][0], epoch(make(0), 2)[0][0])  # a new epoch: new order and crops
    assert not torch.equal(a[0][0], epoch(make(0, seed=1), 1)[0][0])
    # two ranks share one permutation and take their halves of each global batch
    ranks = [epoch(make_train_loader(b.train, b, INCEPTION, 6, CPU, seed=0, kind="files", rank=r, world_size=2,
                                     num_workers=0), 1)
             for r in range(2)]
    for step, (_, y) in enumerate(a):
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), y)


def test_transforms_inception_crop_for_training_resize_center_crop_for_evaluation(tmp_path: Path) -> None:
    # a 256x320 image: a red frame around the green 224x224 centre, what a 224/256 center crop keeps
    img = np.zeros((256, 320, 3), dtype=np.uint8)
    img[...] = (255, 0, 0)
    img[16:240, 48:272] = (0, 255, 0)
    pil = Image.fromarray(img)
    x = eval_transform(224, crop_pct=0.875)(pil)  # resize the shorter side to 256 (already), center crop 224
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8
    assert (x[0] < 30).all() and (x[1] > 225).all(), "the evaluation crop is the centre"
    torch.manual_seed(0)
    crops = [train_transform(INCEPTION, 64)(pil) for _ in range(8)]
    assert all(c.shape == (3, 64, 64) for c in crops)
    assert len({c[0].float().mean().item() for c in crops}) > 1, "random resized crops differ"
    assert any((c[0] > 200).any() for c in crops), "some crops reach the red frame"


def test_eval_loader_shards_and_normalizes_with_imagenet_statistics(tiny: Path) -> None:
    b = bundle_of(tiny)
    whole = list(make_eval_loader(b.test, b, 10, CPU, num_workers=2))
    assert [x.shape[0] for x, _ in whole] == [10, 10, 4]
    labels = torch.cat([y for _, y in whole])
    assert torch.equal(labels, b.test.labels)
    shards = [torch.cat([y for _, y in make_eval_loader(b.test, b, 10, CPU, rank=r, world_size=2)]) for r in range(2)]
    assert torch.equal(torch.cat(shards), labels)
    x = torch.cat([x for x, _ in whole])
    # Each image against a reference written here: shorter side to floor(32 / 0.875) = 36, centre
    # 32 x 32 crop, then (x / 255 - mean) / std with the ImageNet statistics.
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = []
    for rel in b.test.paths:
        with Image.open(Path(b.test.root) / rel.decode()) as im:
            im = TF.center_crop(TF.resize(im.convert("RGB"), 36, interpolation=TF.InterpolationMode.BILINEAR), 32)
        ref.append(TF.normalize(TF.pil_to_tensor(im).double() / 255, mean, std))
    torch.testing.assert_close(x.double(), torch.stack(ref), rtol=0, atol=1e-5)


def test_torchvision_source_wants_the_whole_of_imagenet(tiny: Path) -> None:
    with pytest.raises(DataError) as err:
        load_data(DatasetConfig(name="imagenet", source="torchvision", root=str(tiny)))
    assert "12 class folders" in str(err.value) and "1000" in str(err.value) and "dataset.source=folder" in str(err.value)


def test_missing_imagenet_exits_2_naming_the_path_and_both_remedies(tmp_path: Path) -> None:
    result = sam_train(["experiment=t2_imagenet_resnet50_100ep", f"runs_root={tmp_path}"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("sam-train: error:")]
    assert len(errors) == 1, result.stderr
    assert str(tmp_path / "no-data" / "imagenet") in errors[0]
    assert "dataset.download=true (unpacks ILSVRC2012_img_train.tar" in errors[0] and "dataset.source=folder" in errors[0]


def test_loader_choices_are_validated_against_the_data() -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["experiment=t2_imagenet_resnet50_100ep", "engine.loader=device"]))
    assert err.value.problems == ["engine.loader='device' is invalid: dataset 'imagenet' is read from image files: "
                                  "choose auto or one of: files"]
    with pytest.raises(ConfigError, match="augment.random_resized_crop=True is invalid"):
        validate(compose_config(["experiment=smoke", "augment=inception_crop"]))


def test_table2_presets_carry_the_recipe_and_scale_lr_with_the_batch() -> None:
    for model in ("resnet50", "resnet101", "resnet152"):
        for epochs in (100, 200, 400):
            cfg = compose_config([f"experiment=t2_imagenet_{model}_{epochs}ep"])
            validate(cfg)
            got = (cfg.dataset.name, cfg.model.name, cfg.epochs, cfg.batch_size, cfg.optim.lr, cfg.optim.momentum,
                   cfg.optim.weight_decay, cfg.optim.rho, cfg.optim.label_smoothing, cfg.sched.name, cfg.augment.name)
            assert got == ("imagenet", model, epochs, 4096, 1.0, 0.9, 1e-4, 0.05, 0.1, "cosine", "inception_crop")
            assert cfg.augment.random_resized_crop and cfg.augment.flip and cfg.dataset.source == "torchvision"
    # the linear rule: lr = 1.0 x batch_size / 4096; an explicit lr replaces it
    assert compose_config(["experiment=t2_imagenet_resnet50_100ep", "batch_size=1024"]).optim.lr == 0.25
    assert compose_config(["experiment=t2_imagenet_resnet50_100ep", "batch_size=512", "optim.lr=0.3"]).optim.lr == 0.3


@pytest.mark.slow
def test_sam_train_on_an_imagenet_folder(tiny: Path, tmp_path: Path) -> None:
    result = sam_train(["experiment=t2_imagenet_resnet50_100ep", "dataset.source=folder", f"dataset.root={tiny}",
                        "dataset.input_size=32", "epochs=1", "batch_size=12", "engine.device=cpu",
                        "engine.num_workers=2", "engine.eval_batch_size=12", "engine.progress=false",
                        f"runs_root={tmp_path}"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next(tmp_path.rglob("metrics.json")).parent
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_done"] == 1  # one epoch: what each check needs
    assert summary["data"]["source"] == "folder" and (summary["data"]["train_size"], summary["data"]["test_size"]) == (36, 24)
    assert summary["config"]["lr"] == pytest.approx(12 / 4096) and summary["config"]["label_smoothing"] == 0.1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("test_top5_err" in r for r in rows) and "test_top5_err" in summary["final"]  # 12 classes > 10
    assert summary["final"]["test_top5_err"] <= summary["final"]["test_err"]
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["model"]["fc.weight"].shape == (12, 2048)  # the head has the folder's classes

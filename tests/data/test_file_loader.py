"""The file loader (sam_repro/data/file_loader.py) against references written here with PIL and
torchvision's functional ops: each batch is the documented transform of the documented images
under the documented seed (seed_for("files", seed, epoch, rank, step)), Cutout centres come from
their own generator, evaluation is resize + center crop; a worker's error is one line."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from sam_repro.config import AugmentConfig, DatasetConfig
from sam_repro.data import DataError, ImageFiles, fit_to_model, load_data, make_eval_loader, make_train_loader
from sam_repro.data.augment import cutout_, normalize, normalize_coeffs
from sam_repro.data.file_loader import FileLoader, _one_line, eval_transform, load_image, train_transform
from sam_repro.data.loaders import seed_for
from tests.data.test_imagenet import write_jpeg_folder

CPU = torch.device("cpu")
PLAIN = AugmentConfig(crop=False, flip=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = write_jpeg_folder(tmp_path_factory.mktemp("files") / "tiny", classes=4, train=4, evaluate=2)
    return fit_to_model(load_data(DatasetConfig(name="imagenet", source="folder", root=str(root))), {}, 24)


def geometry(img: Image.Image, size: int, crop_pct: float, mode=TF.InterpolationMode.BILINEAR) -> torch.Tensor:
    """Evaluation geometry: shorter side to floor(size / crop_pct), center crop, uint8 CHW."""
    return TF.pil_to_tensor(TF.center_crop(TF.resize(img, math.floor(size / crop_pct), interpolation=mode), size))


def test_eval_transform_is_resize_then_center_crop(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    assert torch.equal(eval_transform(24)(img), geometry(img, 24, 0.875))  # crop_pct defaults to 0.875
    assert torch.equal(eval_transform(24, 0.5)(img), geometry(img, 24, 0.5))
    for name, mode in (("bicubic", TF.InterpolationMode.BICUBIC), ("nearest", TF.InterpolationMode.NEAREST)):
        assert torch.equal(eval_transform(24, 0.875, name)(img), geometry(img, 24, 0.875, mode))
    plain = train_transform(PLAIN, 24, 0.5, "bicubic")  # no augmentation: the evaluation geometry
    assert torch.equal(plain(img), geometry(img, 24, 0.5, TF.InterpolationMode.BICUBIC))
    assert torch.equal(train_transform(PLAIN, 24)(img), geometry(img, 24, 0.875))
    no_pad = train_transform(AugmentConfig(crop=True, padding=0, flip=False), 24)  # a crop of padding 0: none
    assert torch.equal(no_pad(img), geometry(img, 24, 0.875))
    pad_only = train_transform(AugmentConfig(crop=False, padding=4, flip=False), 24)  # padding without crop: none
    assert torch.equal(pad_only(img), geometry(img, 24, 0.875))


def test_train_transform_steps_follow_the_augment_config(tmp_path: Path) -> None:
    """Flip, pad + random crop and AutoAugment in the array loaders' order, drawn from torch's generator."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
    aug = AugmentConfig(crop=True, padding=3, pad_mode="constant", flip=True, autoaugment="cifar10")
    torch.manual_seed(4)
    got = [train_transform(aug, 24, 0.875, "bilinear")(img) for _ in range(6)]
    import torchvision.transforms as T

    reference = T.Compose([T.Resize(27), T.CenterCrop(24), T.AutoAugment(T.AutoAugmentPolicy.CIFAR10),
                           T.RandomHorizontalFlip(), T.RandomCrop(24, padding=3, padding_mode="constant"),
                           T.PILToTensor()])
    torch.manual_seed(4)
    assert all(torch.equal(a, reference(img)) for a in got)
    rrc = AugmentConfig(random_resized_crop=True, crop=False, flip=False)
    torch.manual_seed(2)
    crops = [train_transform(rrc, 16, interpolation="bicubic")(img) for _ in range(3)]
    ref = T.Compose([T.RandomResizedCrop(16, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                     T.PILToTensor()])
    torch.manual_seed(2)
    assert all(torch.equal(c, ref(img)) for c in crops)
    reflect = AugmentConfig(crop=True, padding=3, pad_mode="reflect", flip=False)  # the pad mode reaches RandomCrop
    torch.manual_seed(5)
    got = [train_transform(reflect, 24)(img) for _ in range(6)]
    ref = T.Compose([T.Resize(27), T.CenterCrop(24), T.RandomCrop(24, padding=3, padding_mode="reflect"),
                     T.PILToTensor()])
    torch.manual_seed(5)
    assert all(torch.equal(a, ref(img)) for a in got)
    with pytest.raises(DataError, match="augment.padding=24 must be in"):
        train_transform(AugmentConfig(crop=True, padding=24), 24)


def test_load_image_decodes_to_rgb_and_names_a_bad_file(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((5, 6), 200, dtype=np.uint8), mode="L").save(gray)
    img = load_image(str(gray))
    assert img.mode == "RGB" and TF.pil_to_tensor(img).shape == (3, 5, 6)
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"cannot decode image {bad}: UnidentifiedImageError"):
        load_image(str(bad))


def test_a_workers_error_keeps_its_last_line() -> None:
    err = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                    "  File \"x.py\", line 1\nsam_repro.data.datasets.DataError: cannot decode image /d/DataError: a.JPEG\n")
    one = _one_line(err)
    assert isinstance(one, DataError) and str(one) == "cannot decode image /d/DataError: a.JPEG"
    assert str(_one_line(DataError("cannot decode image /x"))) == "cannot decode image /x"


def reference_epoch(bundle, aug: AugmentConfig, batch: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
    """The files loader's epoch, written out: the (seed, epoch) permutation, this rank's slice of
    each global batch, each batch's transforms under seed_for("files", seed, epoch, rank, step),
    normalization, then Cutout at centres drawn up front from seed_for("files-cutout", ...)."""
    n = len(bundle.train)
    g = torch.Generator()
    g.manual_seed(seed_for("perm", seed, epoch))
    perm = torch.randperm(n, generator=g)
    steps = n // (batch * world)
    transform = train_transform(aug, bundle.image_size, bundle.crop_pct, bundle.interpolation)
    scale, shift = normalize_coeffs(bundle.mean, bundle.std)
    if aug.cutout:
        cg = torch.Generator()
        cg.manual_seed(seed_for("files-cutout", seed, epoch, rank))
        shape = (steps,) if aug.cutout_per == "batch" else (steps, batch)
        cy, cx = torch.randint(bundle.image_size, shape, generator=cg), torch.randint(bundle.image_size, shape, generator=cg)
    out = []
    for step in range(steps):
        at = (step * world + rank) * batch
        index = perm[at:at + batch]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for("files", seed, epoch, rank, step))
            x = torch.stack([transform(load_image(bundle.train.path(i))) for i in index.tolist()])
        x = normalize(x, scale, shift)
        if aug.cutout:
            cutout_(x, cy[step], cx[step], aug.cutout)
        out.append((x, bundle.train.labels[index]))
    return out


@pytest.mark.parametrize("aug", [AugmentConfig(flip=True, crop=True, padding=2, pad_mode="constant"),
                                 AugmentConfig(flip=False, crop=True, padding=3, pad_mode="reflect"),
                                 AugmentConfig(flip=False, crop=False, cutout=8),
                                 AugmentConfig(flip=True, crop=False, cutout=6, cutout_per="sample")],
                         ids=["flip_crop", "reflect_crop", "cutout_batch", "cutout_sample"])
def test_files_loader_batches_are_the_documented_transforms(bundle, aug: AugmentConfig) -> None:
    for rank, world in ((0, 1), (1, 2)):
        loader = make_train_loader(bundle.train, bundle, aug, 4, CPU, seed=3, kind="files", num_workers=0,
                                   rank=rank, world_size=world)
        loader.set_epoch(2)
        got = list(loader)
        want = reference_epoch(bundle, aug, 4, 3, 2, rank, world)
        assert len(got) == len(want) == 16 // (4 * world)
        for (x, y), (u, v) in zip(got, want):
            assert x.dtype == torch.float32 and torch.equal(y, v) and torch.allclose(x, u, rtol=0, atol=1e-6)
    if aug.cutout:
        assert any((x == 0).all(dim=1).any() for x, _ in got)  # the squares are there to be found


def test_files_loader_resizes_with_the_bundles_interpolation(bundle) -> None:
    bicubic = fit_to_model(bundle, {"interpolation": "bicubic", "crop_pct": 0.6})
    loader = make_train_loader(bicubic.train, bicubic, PLAIN, 4, CPU, seed=0, kind="files", num_workers=0)
    loader.set_epoch(0)
    got, want = list(loader), reference_epoch(bicubic, PLAIN, 4, 0, 0)
    assert all(torch.allclose(x, u, atol=1e-6) for (x, _), (u, _) in zip(got, want))
    plain = reference_epoch(bundle, PLAIN, 4, 0, 0)
    assert not torch.allclose(got[0][0], plain[0][0])  # the interpolation and crop_pct made a difference


def test_files_loader_defaults_to_one_process_of_rank_0(bundle) -> None:
    direct = FileLoader(bundle.train, bundle, PLAIN, 4, CPU, seed=1, num_workers=0)
    direct.set_epoch(1)
    want = reference_epoch(bundle, PLAIN, 4, 1, 1)
    assert len(direct) == 4 and all(torch.allclose(x, u, atol=1e-6) and torch.equal(y, v)
                                    for (x, y), (u, v) in zip(direct, want))


def test_files_loader_error_is_one_line_from_a_worker_too(bundle, tmp_path: Path) -> None:
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"broken")
    files = ImageFiles.from_lists(tmp_path, [bad] * 4, [0, 1, 2, 3])
    for workers in (0, 1):
        loader = make_train_loader(files, bundle, PLAIN, 2, CPU, seed=0, kind="files", num_workers=workers)
        with pytest.raises(DataError) as err:
            list(loader)
        assert str(err.value).startswith(f"cannot decode image {bad}: UnidentifiedImageError") and "\n" not in str(err.value)
        with pytest.raises(DataError) as err:
            list(make_eval_loader(files, bundle, 2, CPU, num_workers=workers))
        assert str(err.value).startswith(f"cannot decode image {bad}:") and "\n" not in str(err.value)


def test_file_eval_loader_defaults_and_geometry(bundle) -> None:
    from sam_repro.data.file_loader import FileEvalLoader

    loader = FileEvalLoader(bundle.test, bundle, 3, CPU)
    assert len(loader) == 3 and [len(y) for _, y in loader] == [3, 3, 2]  # rank 0 of 1: every example
    scale, shift = normalize_coeffs(bundle.mean, bundle.std)
    x = torch.cat([x for x, _ in loader])
    ref = torch.stack([geometry(load_image(bundle.test.path(i)), 24, bundle.crop_pct) for i in range(8)])
    assert torch.allclose(x, normalize(ref, scale, shift), atol=1e-6)
    bicubic = fit_to_model(bundle, {"interpolation": "bicubic"})
    xb = torch.cat([x for x, _ in FileEvalLoader(bicubic.test, bicubic, 8, CPU)])
    refb = torch.stack([geometry(load_image(bundle.test.path(i)), 24, bundle.crop_pct, TF.InterpolationMode.BICUBIC)
                        for i in range(8)])
    assert torch.allclose(xb, normalize(refb, scale, shift), atol=1e-6) and not torch.allclose(xb, x)


def test_file_loaders_put_every_batch_on_the_requested_device(bundle) -> None:
    """Images, labels and the normalization coefficients all follow `device`. The meta device stands
    in for an accelerator on any CPU: a tensor left on the CPU shows, or fails to mix with the rest."""
    meta = torch.device("meta")
    train = make_train_loader(bundle.train, bundle, PLAIN, 4, meta, seed=0, kind="files", num_workers=0)
    evaluation = make_eval_loader(bundle.test, bundle, 3, meta)
    for loader, n in ((train, 4), (evaluation, 3)):
        got = list(loader)
        assert len(got) == n and all(x.device == meta and y.device == meta and x.shape[1:] == (3, 24, 24)
                                     for x, y in got)


def test_file_eval_loader_decodes_in_the_worker_count_asked_for(bundle, monkeypatch) -> None:
    """make_eval_loader's num_workers (default 0) reaches the DataLoader that decodes the files."""
    asked = []

    class Spy(torch.utils.data.DataLoader):
        def __init__(self, *args, **kw):
            asked.append(kw.get("num_workers", 0))
            super().__init__(*args, **kw)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Spy)
    for workers in (None, 0, 1):
        kw = {} if workers is None else {"num_workers": workers}
        loader = make_eval_loader(bundle.test, bundle, 4, CPU, **kw)
        assert loader.num_workers == (workers or 0)
        assert torch.equal(torch.cat([y for _, y in loader]), bundle.test.labels)
    assert asked == [0, 0, 1]

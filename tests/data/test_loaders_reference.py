"""The array loaders (sam_repro/data/loaders.py) against their contract written out here: the
permutation of (seed, epoch) shared by every rank, rank r's slice of each global batch, the
augmentation drawn from (seed, epoch, rank) for the device loader and from (seed, epoch, rank,
step) per batch for the workers loader (torchvision transforms composed here), Cutout per batch or
per sample, normalization, the upsampling to the model's input; the argument checks' edges."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T

import sam_repro.data.loaders as L
from sam_repro.config import AugmentConfig, DatasetConfig
from sam_repro.data import DataError, fit_to_model, load_data, make_eval_loader, make_train_loader
from sam_repro.data.augment import BatchAugment, cutout_, normalize_coeffs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle():
    return load_data(DatasetConfig(source="synthetic", train_size=96, test_size=20, image_size=12))


def test_seed_for_is_a_fixed_function_of_its_parts() -> None:
    """The first 8 bytes of sha256(repr(parts)), little-endian, shifted to 63 bits: the same number
    on every machine, process and version (a resumed run's order depends on it)."""
    for parts in (("perm", 0, 3), ("augment", 7, 1, 2), ("workers", 1, 0, 0, 5)):
        want = int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1
        assert L.seed_for(*parts) == want and 0 <= want < 2 ** 63


def permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(L.seed_for("perm", seed, epoch))
    return torch.randperm(n, generator=g)


def device_reference(bundle, data, aug, batch, seed, epoch, rank=0, world=1):
    perm = permutation(seed, epoch, len(data))
    batch_aug = BatchAugment(aug, data.images.shape[-1], bundle.mean, bundle.std, CPU)
    g = torch.Generator()
    g.manual_seed(L.seed_for("augment", seed, epoch, rank))
    steps = len(data) // (batch * world)
    draws = batch_aug.draw(g, steps, batch)
    out = []
    for step in range(steps):
        index = perm[(step * world + rank) * batch:][:batch]
        x = batch_aug(data.images, index, draws, step)
        if bundle.image_size != x.shape[-1]:
            x = F.interpolate(x, size=(bundle.image_size,) * 2, mode=bundle.interpolation, align_corners=False)
        out.append((x, data.labels[index]))
    return out


def workers_reference(bundle, data, aug, batch, seed, epoch, rank=0, world=1):
    perm = permutation(seed, epoch, len(data))
    stored = data.images.shape[-1]
    steps_t = []
    if aug.autoaugment:
        steps_t.append(T.AutoAugment(T.AutoAugmentPolicy(aug.autoaugment)))
    if aug.flip:
        steps_t.append(T.RandomHorizontalFlip())
    if aug.crop:
        steps_t.append(T.RandomCrop(stored, padding=aug.padding, padding_mode=aug.pad_mode))
    transform = T.Compose([*steps_t, T.ConvertImageDtype(torch.float32), T.Normalize(bundle.mean, bundle.std)])
    out = []
    for step in range(len(data) // (batch * world)):
        index = perm[(step * world + rank) * batch:][:batch]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(L.seed_for("workers", seed, epoch, rank, step))
            x = torch.stack([transform(data.images[i]) for i in index.tolist()])
            if aug.cutout:
                n = 1 if aug.cutout_per == "batch" else len(index)
                cutout_(x, torch.randint(stored, (n,)), torch.randint(stored, (n,)), aug.cutout)
        if bundle.image_size != stored:
            x = F.interpolate(x, size=(bundle.image_size,) * 2, mode=bundle.interpolation, align_corners=False)
        out.append((x, data.labels[index]))
    return out


def same(a, b, atol=1e-6) -> bool:
    return len(a) == len(b) and all(torch.equal(y, v) and torch.allclose(x, u, atol=atol) for (x, y), (u, v) in zip(a, b))


AUGS = {"basic": AugmentConfig(), "cutout_batch": AugmentConfig(cutout=4, pad_mode="constant"),
        "cutout_sample": AugmentConfig(cutout=4, cutout_per="sample", flip=False)}


@pytest.mark.parametrize("name", list(AUGS))
@pytest.mark.parametrize("kind, reference", [("device", device_reference), ("workers", workers_reference)])
def test_loader_batches_are_the_contracts(bundle, kind: str, reference, name: str) -> None:
    aug = AUGS[name]
    for rank, world in ((0, 1), (1, 2)):
        loader = make_train_loader(bundle.train, bundle, aug, 8, CPU, seed=5, kind=kind, num_workers=0,
                                   rank=rank, world_size=world)
        loader.set_epoch(3)
        assert same(list(loader), reference(bundle, bundle.train, aug, 8, 5, 3, rank, world)), (kind, rank)


@pytest.mark.parametrize("kind, reference", [("device", device_reference), ("workers", workers_reference)])
def test_arrays_stored_smaller_are_upsampled_with_the_bundles_interpolation(bundle, kind: str, reference) -> None:
    big = fit_to_model(bundle, {"image_size": 20, "interpolation": "bicubic"})
    loader = make_train_loader(big.train, big, AugmentConfig(), 8, CPU, seed=1, kind=kind, num_workers=0)
    loader.set_epoch(0)
    got = list(loader)
    assert got[0][0].shape == (8, 3, 20, 20) and same(got, reference(big, big.train, AugmentConfig(), 8, 1, 0))
    x, _ = next(iter(make_eval_loader(big.test, big, 4, CPU)))
    scale, shift = normalize_coeffs(big.mean, big.std)
    want = F.interpolate(big.test.images[:4].float() * scale + shift, size=(20, 20), mode="bicubic", align_corners=False)
    assert torch.allclose(x, want, atol=1e-5)


@pytest.mark.parametrize("cls", [L.DeviceLoader, L.WorkerLoader])
def test_a_loader_defaults_to_rank_0_of_one_and_epoch_0(bundle, cls) -> None:
    direct = cls(bundle.train, bundle, AugmentConfig(), 8, CPU, 2) if cls is L.DeviceLoader else \
        cls(bundle.train, bundle, AugmentConfig(), 8, CPU, 2, num_workers=0)
    reference = device_reference if cls is L.DeviceLoader else workers_reference
    assert (direct.rank, direct.world_size, direct.epoch) == (0, 1, 0)
    assert same(list(direct), reference(bundle, bundle.train, AugmentConfig(), 8, 2, 0))  # no set_epoch: epoch 0


def test_eval_loader_defaults_to_the_whole_split(bundle) -> None:
    loader = L.EvalLoader(bundle.test, bundle, 6, CPU)
    assert torch.equal(torch.cat([y for _, y in loader]), bundle.test.labels) and len(loader) == 4


def test_register_loader_files_a_class_under_its_name(monkeypatch) -> None:
    monkeypatch.setattr(L, "LOADERS", {})
    cls = type("Mine", (L.TrainLoader,), {})
    assert L.register_loader("mine")(cls) is cls and L.LOADERS == {"mine": cls}


def test_argument_checks_at_their_edges(bundle) -> None:
    ok = lambda **kw: make_train_loader(bundle.train, bundle, AugmentConfig(), **{"batch_size": 8, "device": CPU,
                                                                                "seed": 0, **kw})
    assert len(ok(batch_size=1)) == 96 and len(ok(batch_size=48, world_size=2, rank=1)) == 1  # exactly enough
    with pytest.raises(DataError, match="rank 2 is outside world size 2"):
        ok(rank=2, world_size=2)
    with pytest.raises(DataError, match="rank -1 is outside"):
        ok(rank=-1, world_size=2)
    with pytest.raises(DataError, match="batch_size=0"):
        ok(batch_size=0)
    with pytest.raises(DataError, match="batch_size=49 x 2 device"):
        ok(batch_size=49, world_size=2)
    from sam_repro.data import ImageFiles

    files = ImageFiles.from_lists("/data", ["/data/a.JPEG"], [0])
    with pytest.raises(DataError) as err:
        make_train_loader(files, bundle, AugmentConfig(), 1, CPU, seed=0, kind="workers")
    assert str(err.value).endswith("use engine.loader=auto or one of ['files']")
    assert len(list(make_eval_loader(bundle.test, bundle, 1, CPU))) == 20
    with pytest.raises(DataError, match="eval batch size 0 must be >= 1"):
        make_eval_loader(bundle.test, bundle, 0, CPU)


def test_array_loaders_put_every_batch_on_the_requested_device(bundle) -> None:
    """Images, labels and the normalization coefficients all follow `device`. The meta device stands
    in for an accelerator on any CPU: a tensor left on the CPU shows, or fails to mix with the rest."""
    meta = torch.device("meta")
    workers = make_train_loader(bundle.train, bundle, AugmentConfig(), 8, meta, seed=0, kind="workers", num_workers=0)
    evaluation = make_eval_loader(bundle.test, bundle, 8, meta)
    for loader, n in ((workers, 12), (evaluation, 3)):
        got = list(loader)
        assert len(got) == n and all(x.device == meta and y.device == meta and x.shape[1:] == (3, 12, 12)
                                     for x, y in got)


def test_make_train_loader_passes_the_worker_count_and_defaults_to_4(bundle) -> None:
    make = lambda **kw: make_train_loader(bundle.train, bundle, AugmentConfig(), 8, CPU, seed=0, kind="workers", **kw)
    assert make().num_workers == 4
    assert make(num_workers=0).num_workers == 0 and make(num_workers=2).num_workers == 2

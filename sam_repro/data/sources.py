"""Data sources (torchvision | folder | synthetic) and `load_data`, which turns a DatasetConfig into a
DataBundle: train/val/test splits plus what the model and the run directory need to know.

A split is either resident uint8 arrays (`ImageArrays`: CIFAR-sized data, augmented on the device) or
a list of image files decoded per batch (`ImageFiles`: ImageNet and the finetuning sets, read by
DataLoader workers); `DataBundle.auto_loader` names the training loader that fits it.

Every source returns a `Loaded`: the splits and the dataset's facts. `load_data` then, in this
order: fingerprints the data, holds out the validation split, corrupts training labels (label
noise never touches the validation or test labels). `fit_to_model` finally gives the bundle the
input a pretrained model expects (finetuning).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from .datasets import DATASETS, DataError, DatasetSpec, ImageArrays, ImageFiles, Split
from .file_datasets import read_image_folder
from .folder import load_folder
from .noise import NOISE_KINDS, apply_label_noise

if TYPE_CHECKING:
    from ..config import DatasetConfig


# engine.loader=auto: the training loader for each kind of split (sam_repro.data.LOADERS names)
AUTO_LOADER: Dict[type, str] = {ImageArrays: "device", ImageFiles: "files"}


@dataclass
class DataBundle:
    train: Split
    test: Split
    val: Optional[Split]
    num_classes: int
    in_chans: int
    image_size: int  # the side the model sees (arrays stored smaller are upsampled to it)
    mean: Tuple[float, ...]  # per channel, in [0, 1] units
    std: Tuple[float, ...]
    classes: List[str]
    info: dict  # the "data" block of metrics.json (docs/run_directory.md)
    crop_pct: float = 0.875  # file data, evaluation: resize to image_size / crop_pct, center crop (256 -> 224)
    interpolation: str = "bilinear"  # resizing: bilinear | bicubic | nearest

    @property
    def auto_loader(self) -> str:
        """The training loader engine.loader=auto picks: device-resident for arrays, workers over files."""
        return AUTO_LOADER[type(self.train)]


def fit_to_model(bundle: DataBundle, model_input: Dict[str, Any], input_size: Optional[int] = None) -> DataBundle:
    """The bundle with the input a model expects: `model_input` (a pretrained model's image_size,
    mean, std, crop_pct, interpolation; {} when not finetuning) replaces the dataset's values, and an
    explicit `dataset.input_size` wins over both."""
    changes = dict(model_input)
    if input_size:
        changes["image_size"] = int(input_size)
    return replace(bundle, **changes) if changes else bundle


@dataclass
class Loaded:
    """What a source returns: the splits and the dataset's facts."""

    train: Split
    test: Split
    spec: DatasetSpec
    classes: List[str]
    root: Optional[str]  # None for generated data


Source = Callable[["DatasetConfig"], Loaded]
SOURCES: Dict[str, Source] = {}


def register_source(name: str) -> Callable[[Source], Source]:
    def wrap(fn: Source) -> Source:
        SOURCES[name] = fn
        return fn

    return wrap


def _root(cfg: "DatasetConfig") -> Path:
    return Path(str(cfg.root)).expanduser().absolute()


def _spec(cfg: "DatasetConfig") -> DatasetSpec:
    if cfg.name not in DATASETS:
        raise DataError(f"dataset.name={cfg.name!r} is not a known dataset; choose one of {sorted(DATASETS)} "
                        f"(or dataset.source=synthetic)")
    return DATASETS[cfg.name]


def _check_shape(arrays: Split, spec: DatasetSpec, where: str) -> None:
    expect = (spec.in_chans, spec.image_size, spec.image_size)
    if isinstance(arrays, ImageArrays) and tuple(arrays.images.shape[1:]) != expect:
        raise DataError(f"{where}: images are {tuple(arrays.images.shape[1:])}, dataset '{spec.name}' expects {expect}")
    bad = (arrays.labels < 0) | (arrays.labels >= spec.num_classes)
    if bool(bad.any()):
        raise DataError(f"{where}: labels outside [0, {spec.num_classes}) for dataset '{spec.name}'")


@register_source("torchvision")
def torchvision_source(cfg: "DatasetConfig") -> Loaded:
    """The official files, as torchvision downloads them, under dataset.root."""
    spec, root = _spec(cfg), _root(cfg)
    if cfg.download:
        if spec.download is None:
            raise DataError(f"dataset '{spec.name}' has no download; use dataset.source=folder dataset.root=<dir>")
        try:
            spec.download(root, cfg.svhn_extra)
        except Exception as e:  # network errors and the like: one line, with the way out
            raise DataError(f"downloading '{spec.name}' into {root} failed ({type(e).__name__}: {e}); without "
                            f"network use dataset.source=folder dataset.root=<dir with train/<class>/* and "
                            f"test/<class>/*>") from None
    train, test = spec.read(root, cfg.svhn_extra)
    for split, arrays in (("train", train), ("test", test)):
        _check_shape(arrays, spec, f"{root} ({split})")
    return Loaded(train, test, spec, list(spec.classes) or [str(i) for i in range(spec.num_classes)], str(root))


@register_source("folder")
def folder_source(cfg: "DatasetConfig") -> Loaded:
    """ROOT/train/<class>/* and ROOT/test/<class>/*: decoded once and cached for array datasets; for
    file-backed ones (ImageNet, finetuning sets) listed only, with ROOT/val accepted for ROOT/test and
    any number of classes (a subset such as ImageNet-100 trains a head of that size)."""
    spec, root = _spec(cfg), _root(cfg)
    if spec.files:
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist "
                            f"(expected {root}/train/<class>/* and {root}/val|test/<class>/*)")
        train, test, classes = read_image_folder(root)
        if len(classes) < 2:
            raise DataError(f"image folder {root}: {len(classes)} class folder(s) under train/, at least 2 needed")
        return Loaded(train, test, replace(spec, num_classes=len(classes)), classes, str(root))
    train, test, classes = load_folder(root, spec.in_chans, spec.image_size, cfg.decode_workers, cfg.cache_dir)
    if len(classes) != spec.num_classes:
        raise DataError(f"image folder {root}: {len(classes)} class folders, "
                        f"dataset '{spec.name}' has {spec.num_classes} classes")
    return Loaded(train, test, spec, classes, str(root))


def synthetic_arrays(num_classes: int, image_size: int, channels: int, n: int, seed: int) -> ImageArrays:
    """A learnable generated problem: each class is a smooth random pattern; images add pixel noise.

    Class patterns depend on (num_classes, image_size, channels) only, so train and test share them.
    """
    g = torch.Generator().manual_seed(1000003 * num_classes + 1009 * image_size + channels)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g) * 255.0
    patterns = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    g.manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    noise = torch.randn(n, channels, image_size, image_size, generator=g) * 40.0
    images = (0.6 * patterns[labels] + 0.4 * 128.0 + noise).round().clamp(0, 255).to(torch.uint8)
    return ImageArrays(images.contiguous(), labels.to(torch.int64))


@register_source("synthetic")
def synthetic_source(cfg: "DatasetConfig") -> Loaded:
    """Generated data, deterministic from the synthetic fields of DatasetConfig; never a real result."""
    k, s, c = int(cfg.num_classes), int(cfg.image_size), int(cfg.channels)
    train = synthetic_arrays(k, s, c, int(cfg.train_size), seed=1)
    test = synthetic_arrays(k, s, c, int(cfg.test_size), seed=2)
    x = train.images[:4096].float() / 255.0  # normalize with the generated data's own statistics (a sample suffices)
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    spec = DatasetSpec("synthetic", k, c, s, mean, std, tuple(str(i) for i in range(k)), expected="(generated)")
    return Loaded(train, test, spec, list(spec.classes), None)


def fingerprint(train: Split, test: Split) -> str:
    """sha256 of the decoded images and labels (shapes included): equal bytes give equal values.

    File-backed data is not decoded up front (ImageNet is 150 GB): its fingerprint covers the file
    list (paths relative to the root) and the labels, so a copy on another disk or node still
    resumes, and an added, removed or relabelled file does not."""
    h = hashlib.sha256()
    for split in (train, test):
        if isinstance(split, ImageFiles):
            h.update(b"files:" + b"\n".join(split.paths.tolist()))
            tensors = (split.labels,)
        else:
            tensors = (split.images, split.labels)
        for t in tensors:
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.contiguous().numpy())  # the buffer itself, no copy
    return "sha256:" + h.hexdigest()


def split_validation(train: Split, fraction: float, seed: int) -> Tuple[Split, Optional[Split]]:
    """Hold out round(fraction * N) random training examples (seeded); both parts keep dataset order."""
    n_val = round(fraction * len(train))
    if n_val == 0:
        return train, None
    g = torch.Generator().manual_seed(int(seed))
    is_val = torch.zeros(len(train), dtype=torch.bool)
    is_val[torch.randperm(len(train), generator=g)[:n_val]] = True
    return train.subset(is_val.logical_not().nonzero().flatten()), train.subset(is_val.nonzero().flatten())


def _validate(cfg: "DatasetConfig") -> None:
    if cfg.source not in SOURCES:
        raise DataError(f"dataset.source={cfg.source!r} is not a source; choose one of {sorted(SOURCES)}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"dataset.val_fraction={cfg.val_fraction} must be in [0, 1)")
    if not 0.0 <= cfg.label_noise < 1.0:
        raise DataError(f"dataset.label_noise={cfg.label_noise} must be in [0, 1)")
    if cfg.noise_kind not in NOISE_KINDS:
        raise DataError(f"dataset.noise_kind={cfg.noise_kind!r} must be one of {sorted(NOISE_KINDS)}")
    if cfg.source == "synthetic":
        for key in ("num_classes", "image_size", "channels", "train_size", "test_size"):
            if int(getattr(cfg, key)) < (2 if key == "num_classes" else 1):
                raise DataError(f"dataset.{key}={getattr(cfg, key)} is too small for the synthetic source")
        if int(cfg.channels) not in (1, 3):
            raise DataError(f"dataset.channels={cfg.channels} must be 1 or 3")


NOISE_KEYS = ("label_noise", "noise_kind", "noise_seed")  # what may differ between runs that share a source


def load_data(cfg: "DatasetConfig", cache: Optional[dict] = None) -> DataBundle:
    """Load the dataset that `cfg` (a DatasetConfig) names: source, validation split, label noise.
    `cache` (a dict the caller keeps) lets runs trained together (a pack) read and decode the source
    once: their label noise is still drawn per run."""
    _validate(cfg)
    if cache is None:
        d = SOURCES[cfg.source](cfg)
    else:
        fields = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dataclasses.asdict(cfg)
        key = repr(sorted((k, v) for k, v in fields.items() if k not in NOISE_KEYS))
        if key not in cache:
            cache[key] = SOURCES[cfg.source](cfg)
        d = cache[key]
    fp = fingerprint(d.train, d.test)
    train, val = split_validation(d.train, cfg.val_fraction, cfg.split_seed)
    labels, noise_info = apply_label_noise(train.labels, d.spec.num_classes, cfg.label_noise, cfg.noise_kind,
                                           cfg.noise_seed, d.spec.name)
    train = replace(train, labels=labels)
    info = {"source": cfg.source, "root": d.root, "fingerprint": fp, "train_size": len(train),
            "test_size": len(d.test), "val_size": len(val) if val is not None else 0, "label_noise": noise_info}
    s = d.spec
    return DataBundle(train, d.test, val, s.num_classes, s.in_chans, s.image_size, s.mean, s.std, d.classes, info)

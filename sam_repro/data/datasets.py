"""The dataset registry: what each named dataset is, and how its official files are read.

A `DatasetSpec` holds the facts a run needs about a dataset (classes, channels, image size, the
normalization of the official SAM code) and two functions for the `torchvision` source: `read`,
which parses the files torchvision downloads (pickle batches, .mat, idx) straight from disk, and
`download`, which asks torchvision to fetch them. Reading the documented on-disk formats ourselves
skips torchvision's md5 checks, so tests can write tiny files in the same formats.

Register a dataset with `@register_dataset(name=..., ...)` on its reader; `DATASETS[name]` is the spec.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from sam_repro.errors import UserError


class DataError(UserError):
    """A problem with the data that the user must fix; the message is one actionable line."""


@dataclass(frozen=True)
class ImageArrays:
    """A labelled image set: uint8 [N, C, H, W] (CPU, contiguous) and int64 [N] labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 [{self.images.shape[0]}], "
                             f"got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> "ImageArrays":
        """The examples at `index` (a LongTensor), copied."""
        return ImageArrays(self.images[index].contiguous(), self.labels[index].contiguous())


@dataclass(frozen=True, eq=False)
class ImageFiles:
    """A labelled image set on disk: one image file per example (any size), decoded per batch.

    `paths` are relative to `root`, as one numpy byte-string array rather than a list of Python
    strings: DataLoader workers forked from the main process would otherwise touch (and so copy)
    the reference counts of millions of string objects.
    """

    root: str
    paths: np.ndarray  # bytes [N], relative to root
    labels: torch.Tensor  # int64 [N]

    def __post_init__(self) -> None:
        if self.paths.ndim != 1 or self.paths.dtype.kind != "S":
            raise ValueError(f"paths must be a 1-d byte-string array, got {self.paths.dtype} {self.paths.shape}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.paths),):
            raise ValueError(f"labels must be int64 [{len(self.paths)}], got {self.labels.dtype} {tuple(self.labels.shape)}")

    @classmethod
    def from_lists(cls, root: Path, files: Sequence[Path | str], labels: Sequence[int]) -> "ImageFiles":
        """From absolute (or root-relative) paths and integer labels."""
        rel = [os.path.relpath(f, root).encode() for f in files]
        return cls(str(root), np.array(rel, dtype=np.bytes_) if rel else np.zeros(0, dtype="S1"),
                   torch.as_tensor(list(labels), dtype=torch.int64).reshape(-1))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())

    def subset(self, index: torch.Tensor) -> "ImageFiles":
        """The examples at `index` (a LongTensor)."""
        return ImageFiles(self.root, self.paths[index.numpy()], self.labels[index].contiguous())


Split = Union[ImageArrays, ImageFiles]  # resident uint8 arrays, or files decoded per batch
Splits = Tuple[Split, Split]  # (train, test)
Reader = Callable[[Path, bool], Splits]  # (root, svhn_extra) -> (train, test)
Downloader = Callable[[Path, bool], None]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: Tuple[float, ...]  # per channel, in [0, 1] units (official SAM code)
    std: Tuple[float, ...]
    classes: Tuple[str, ...]
    expected: str  # the official files under root, for error messages
    read: Optional[Reader] = field(default=None, compare=False)
    download: Optional[Downloader] = field(default=None, compare=False)
    files: bool = False  # stored as image files decoded per batch (ImageFiles), not as resident arrays


DATASETS: Dict[str, DatasetSpec] = {}


def register_dataset(*, name: str, num_classes: int, in_chans: int, image_size: int, mean: Sequence[float],
                     std: Sequence[float], classes: Sequence[str], expected: str,
                     download: Optional[Downloader] = None, files: bool = False) -> Callable[[Reader], Reader]:
    """Decorator: register `reader` (the torchvision-source file reader) under `name`.

    files=True: the reader returns `ImageFiles` (decoded per batch by worker processes) and
    `image_size` is the side the model sees by default (a crop), not the stored size."""

    def wrap(reader: Reader) -> Reader:
        DATASETS[name] = DatasetSpec(name, num_classes, in_chans, image_size, tuple(mean), tuple(std),
                                     tuple(classes), expected, reader, download, files)
        return reader

    return wrap


def missing_data_error(name: str, path: Path, expected: str,
                       download: str = "dataset.download=true (needs network)") -> DataError:
    """The one-line error for a dataset that is not on disk, naming both ways to supply it."""
    return DataError(
        f"dataset '{name}' not found at {path} (expected {expected}); supply it with {download} "
        f"or dataset.source=folder dataset.root=<dir with train/<class>/*.png|jpg and test/<class>/*>")


def _find(root: Path, subdirs: Sequence[str], names: Sequence[str]) -> Optional[Path]:
    """The first of root/<subdir> that holds every file in `names` (each may also be gzipped)."""
    for sub in subdirs:
        d = root / sub if sub else root
        if all((d / n).is_file() or (d / (n + ".gz")).is_file() for n in names):
            return d
    return None


def _arrays(images: np.ndarray, labels: np.ndarray) -> ImageArrays:
    return ImageArrays(torch.from_numpy(np.require(images, np.uint8, ["C", "W"])),  # copies read-only buffers
                       torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1).copy()))


# ---------------------------------------------------------------- CIFAR (python pickle batches)
def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    # torchvision writes nothing; the official batches have bytes keys; accept str keys as well
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_batches(d: Path, names: Sequence[str], label_key: str) -> ImageArrays:
    images, labels = [], []
    for n in names:
        try:
            b = _unpickle(d / n)
            images.append(np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(b[label_key], dtype=np.int64))
        except Exception as e:  # a truncated or foreign file: name it
            raise DataError(f"cannot read CIFAR batch {d / n}: {type(e).__name__}: {e}") from None
    return _arrays(np.concatenate(images), np.concatenate(labels))


def _cifar_download(cls_name: str) -> Downloader:
    def download(root: Path, svhn_extra: bool) -> None:
        import torchvision.datasets as tvd

        for train in (True, False):
            getattr(tvd, cls_name)(str(root), train=train, download=True)

    return download


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_C10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@register_dataset(name="cifar10", num_classes=10, in_chans=3, image_size=32,
                  mean=(0.49139968, 0.48215841, 0.44653091), std=(0.24703223, 0.24348513, 0.26158784),
                  classes=CIFAR10_CLASSES, expected="cifar-10-batches-py/data_batch_1..5,test_batch",
                  download=_cifar_download("CIFAR10"))
def read_cifar10(root: Path, svhn_extra: bool = False) -> Splits:
    d = _find(root, ["cifar-10-batches-py", ""], _C10_FILES)
    if d is None:
        raise missing_data_error("cifar10", root / "cifar-10-batches-py", DATASETS["cifar10"].expected)
    return _cifar_batches(d, _C10_FILES[:5], "labels"), _cifar_batches(d, ["test_batch"], "labels")


# The fine labels, in label order (alphabetical, so a sorted image-folder copy keeps the labels).
CIFAR100_CLASSES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
    man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
    pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
    skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
    tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())


@register_dataset(name="cifar100", num_classes=100, in_chans=3, image_size=32,
                  mean=(0.50707516, 0.48654887, 0.44091784), std=(0.26733429, 0.25643846, 0.27615047),
                  classes=CIFAR100_CLASSES, expected="cifar-100-python/train,test",
                  download=_cifar_download("CIFAR100"))
def read_cifar100(root: Path, svhn_extra: bool = False) -> Splits:
    d = _find(root, ["cifar-100-python", ""], ["train", "test"])
    if d is None:
        raise missing_data_error("cifar100", root / "cifar-100-python", DATASETS["cifar100"].expected)
    return _cifar_batches(d, ["train"], "fine_labels"), _cifar_batches(d, ["test"], "fine_labels")


# ---------------------------------------------------------------- SVHN (MATLAB .mat, cropped digits)
def _read_svhn_mat(path: Path) -> ImageArrays:
    import scipy.io

    try:
        m = scipy.io.loadmat(str(path))
        x, y = m["X"], m["y"].astype(np.int64).reshape(-1)
    except Exception as e:
        raise DataError(f"cannot read SVHN file {path}: {type(e).__name__}: {e}") from None
    y[y == 10] = 0  # SVHN stores digit 0 as label 10 (torchvision's mapping)
    return _arrays(np.transpose(x, (3, 2, 0, 1)), y)  # [H, W, C, N] -> [N, C, H, W]


def _svhn_download(root: Path, svhn_extra: bool) -> None:
    import torchvision.datasets as tvd

    for split in ("train", "test") + (("extra",) if svhn_extra else ()):
        tvd.SVHN(str(root), split=split, download=True)


@register_dataset(name="svhn", num_classes=10, in_chans=3, image_size=32,
                  mean=(0.43090966, 0.4302428, 0.44634357), std=(0.19759192, 0.20029082, 0.19811132),
                  classes=tuple(str(i) for i in range(10)), expected="train_32x32.mat, test_32x32.mat, extra_32x32.mat",
                  download=_svhn_download)
def read_svhn(root: Path, svhn_extra: bool = True) -> Splits:
    if _find(root, [""], ["train_32x32.mat", "test_32x32.mat"]) is None:
        raise missing_data_error("svhn", root, DATASETS["svhn"].expected)
    train = _read_svhn_mat(root / "train_32x32.mat")
    if svhn_extra:
        extra = root / "extra_32x32.mat"
        if not extra.is_file():
            raise DataError(f"dataset 'svhn': {extra} not found; dataset.svhn_extra=true trains on train+extra "
                            f"as the paper (supply it with dataset.download=true, needs network) "
                            f"or set dataset.svhn_extra=false")
        e = _read_svhn_mat(extra)
        train = ImageArrays(torch.cat([train.images, e.images]), torch.cat([train.labels, e.labels]))
    return train, _read_svhn_mat(root / "test_32x32.mat")


# ---------------------------------------------------------------- Fashion-MNIST (idx ubyte, maybe gzipped)
def _read_idx(path: Path) -> np.ndarray:
    """An idx file (big-endian header: 0, 0, type 0x08 = uint8, ndim, then ndim int32 sizes)."""
    p = path if path.is_file() else path.with_name(path.name + ".gz")
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"not a uint8 idx file (magic {raw[:4].hex()})")
        shape = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except Exception as e:
        raise DataError(f"cannot read idx file {p}: {type(e).__name__}: {e}") from None


def _fmnist_download(root: Path, svhn_extra: bool) -> None:
    import torchvision.datasets as tvd

    for train in (True, False):
        tvd.FashionMNIST(str(root), train=train, download=True)


_FMNIST_FILES = [f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


@register_dataset(name="fashion_mnist", num_classes=10, in_chans=1, image_size=28, mean=(0.1307,), std=(0.3081,),
                  classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                           "Ankle boot"),
                  expected="FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
                  download=_fmnist_download)
def read_fashion_mnist(root: Path, svhn_extra: bool = False) -> Splits:
    d = _find(root, ["FashionMNIST/raw", "raw", ""], _FMNIST_FILES)
    if d is None:
        raise missing_data_error("fashion_mnist", root / "FashionMNIST" / "raw", DATASETS["fashion_mnist"].expected)
    split = lambda prefix: _arrays(_read_idx(d / f"{prefix}-images-idx3-ubyte")[:, None],
                                   _read_idx(d / f"{prefix}-labels-idx1-ubyte"))
    return split("train"), split("t10k")

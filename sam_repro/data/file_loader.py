"""The file loader: image files decoded per batch by DataLoader worker processes (ImageNet, finetuning).

Per image, in a worker, on the PIL image (torchvision transforms):
- training, `augment.random_resized_crop` (ImageNet): RandomResizedCrop to the input size, scale
  0.08-1 (the Inception crop); otherwise (finetuning, "no augmentation"): the evaluation geometry;
  then AutoAugment (`augment.autoaugment`), horizontal flip (`augment.flip`), pad + random crop
  (`augment.crop`), as the array loaders order them;
- evaluation: resize the shorter side to size / crop_pct, center crop (224 px: resize 256, crop 224).
Workers return uint8 batches (a quarter of float32's bytes through shared memory, pinned memory and
the bus); normalization and Cutout run on the device.

Reproducibility, as the `workers` loader: one dataset item is one whole batch; the permutation is a
function of (seed, epoch) shared by all ranks (rank r takes slice r of each global batch), and the
draws of batch `step` are seeded by (seed, epoch, rank, step), whichever worker makes it. Cutout
centres are drawn up front per (seed, epoch, rank).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from PIL import Image

from .augment import check_augment, cutout_, normalize, normalize_coeffs
from .datasets import DataError, ImageFiles
from .loaders import EVAL_LOADERS, Batch, TrainLoader, register_loader, seed_for, single_thread

if TYPE_CHECKING:
    from ..config import AugmentConfig
    from .sources import DataBundle

Transform = Callable[[Image.Image], torch.Tensor]  # PIL image -> uint8 [C, size, size]
RESIZED_CROP_SCALE = (0.08, 1.0)  # Inception crop: 8 % to 100 % of the image area (torchvision, timm)


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)  # "bilinear" | "bicubic" | "nearest"


def _eval_geometry(size: int, crop_pct: float, interpolation: str) -> list:
    import torchvision.transforms as T

    return [T.Resize(math.floor(size / crop_pct), interpolation=_interpolation(interpolation)), T.CenterCrop(size)]


def eval_transform(size: int, crop_pct: float = 0.875, interpolation: str = "bilinear") -> Transform:
    """Resize the shorter side to floor(size / crop_pct), center crop size x size, uint8 tensor."""
    import torchvision.transforms as T

    return T.Compose([*_eval_geometry(size, crop_pct, interpolation), T.PILToTensor()])


def train_transform(augment: "AugmentConfig", size: int, crop_pct: float = 0.875,
                    interpolation: str = "bilinear") -> Transform:
    """The per-image training transform of `augment` (see the module docstring), uint8 tensor."""
    import torchvision.transforms as T

    check_augment(augment, size)
    if augment.random_resized_crop:
        steps = [T.RandomResizedCrop(size, scale=RESIZED_CROP_SCALE, interpolation=_interpolation(interpolation))]
    else:
        steps = _eval_geometry(size, crop_pct, interpolation)
    if augment.autoaugment:
        steps.append(T.AutoAugment(T.AutoAugmentPolicy(augment.autoaugment)))
    if augment.flip:
        steps.append(T.RandomHorizontalFlip())
    if augment.crop and augment.padding:
        steps.append(T.RandomCrop(size, padding=augment.padding, padding_mode=augment.pad_mode))
    return T.Compose([*steps, T.PILToTensor()])


def load_image(path: str) -> Image.Image:
    """The RGB image at `path` (fully decoded: a truncated file fails here, naming itself)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None


def _decode(files: ImageFiles, index: torch.Tensor, transform: Transform) -> Batch:
    return torch.stack([transform(load_image(files.path(i))) for i in index.tolist()]), files.labels[index]


def _one_line(err: DataError) -> DataError:
    """A DataError re-raised from a worker carries the worker's traceback: keep its last line."""
    last = str(err).strip().splitlines()[-1]
    return DataError(last.split("DataError: ", 1)[-1])


class _TrainBatches(torch.utils.data.Dataset):
    """One item = one training batch of the epoch, so its random draws never depend on the worker."""

    def __init__(self, loader: "FileLoader", perm: torch.Tensor, epoch: int):
        self.loader, self.perm, self.epoch = loader, perm, epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __getitem__(self, step: int) -> Batch:
        ld = self.loader
        with torch.random.fork_rng(devices=[]), single_thread():
            torch.manual_seed(seed_for("files", ld.seed, self.epoch, ld.rank, step))
            return _decode(ld.files, ld.batch_index(self.perm, step), ld.transform)


@register_loader("files")
class FileLoader(TrainLoader):
    """Image files decoded and transformed by `num_workers` processes; pinned memory on a GPU."""

    storage = ImageFiles

    def __init__(self, data: ImageFiles, bundle: "DataBundle", augment: "AugmentConfig", batch_size: int, device,
                 seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 8):
        super().__init__(data, batch_size, seed, rank, world_size)
        self.files, self.device, self.num_workers = data, torch.device(device), num_workers
        self.transform = train_transform(augment, bundle.image_size, bundle.crop_pct, bundle.interpolation)
        self.scale, self.shift = normalize_coeffs(bundle.mean, bundle.std, self.device)
        self.size, self.cutout, self.cutout_per = bundle.image_size, int(augment.cutout), augment.cutout_per

    def _cutout_centres(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed_for("files-cutout", self.seed, self.epoch, self.rank))
        shape = (len(self),) if self.cutout_per == "batch" else (len(self), self.batch_size)
        return tuple(torch.randint(self.size, shape, generator=g, device=self.device) for _ in range(2))

    def __iter__(self) -> Iterator[Batch]:
        pin = self.device.type == "cuda"
        dl = torch.utils.data.DataLoader(_TrainBatches(self, self.permutation("cpu"), self.epoch), batch_size=None,
                                         shuffle=False, num_workers=self.num_workers, pin_memory=pin,
                                         prefetch_factor=2 if self.num_workers else None)
        cut_y, cut_x = self._cutout_centres() if self.cutout else (None, None)
        try:
            for step, (x, y) in enumerate(dl):
                x = normalize(x.to(self.device, non_blocking=pin), self.scale, self.shift)
                if self.cutout:
                    cutout_(x, cut_y[step], cut_x[step], self.cutout)
                yield x, y.to(self.device, non_blocking=pin)
        except DataError as err:
            raise _one_line(err) from None


class _EvalBatches(torch.utils.data.Dataset):
    def __init__(self, files: ImageFiles, batch_size: int, transform: Transform):
        self.files, self.batch_size, self.transform = files, batch_size, transform

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __getitem__(self, i: int) -> Batch:
        index = torch.arange(i * self.batch_size, min(len(self.files), (i + 1) * self.batch_size))
        with single_thread():
            return _decode(self.files, index, self.transform)


class FileEvalLoader:
    """Unaugmented, unshuffled batches of this rank's contiguous shard of a file-backed split."""

    def __init__(self, data: ImageFiles, bundle: "DataBundle", batch_size: int, device, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        lo, hi = len(data) * rank // world_size, len(data) * (rank + 1) // world_size
        self.device, self.num_workers = torch.device(device), num_workers
        self.batches = _EvalBatches(data.subset(torch.arange(lo, hi)), batch_size,
                                    eval_transform(bundle.image_size, bundle.crop_pct, bundle.interpolation))
        self.scale, self.shift = normalize_coeffs(bundle.mean, bundle.std, self.device)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        pin = self.device.type == "cuda"
        dl = torch.utils.data.DataLoader(self.batches, batch_size=None, num_workers=self.num_workers, pin_memory=pin)
        try:
            for x, y in dl:
                yield normalize(x.to(self.device, non_blocking=pin), self.scale, self.shift), y.to(self.device)
        except DataError as err:
            raise _one_line(err) from None


EVAL_LOADERS[ImageFiles] = FileEvalLoader

"""Training and evaluation loaders.

- `device` (default on GPU): the whole uint8 training set lives on the device; each epoch draws one
  permutation and every augmentation choice up front, and each batch is a few batched kernels
  (`augment.BatchAugment`). No worker processes, no host synchronization per batch.
- `workers`: a torch DataLoader whose worker processes apply torchvision transforms per sample
  (AutoAugment, RandomHorizontalFlip, RandomCrop, Normalize; Cutout per batch or per sample), the
  CPU path for machines without a GPU and the reference pipeline for benchmarks. Same semantics,
  different random streams.

- `files` (sam_repro.data.file_loader): image files decoded per batch by worker processes (ImageNet,
  finetuning sets). Each loader reads one kind of split (`storage`); `engine.loader=auto` picks the
  one that fits the data (DataBundle.auto_loader).

All are pure functions of (seed, epoch, rank): the permutation is seeded by (seed, epoch) and shared
by all ranks (rank r takes slice r of each global batch); the augmentation by (seed, epoch, rank).
Two loaders built with the same arguments yield identical batches, so a killed run resumes exactly.
Arrays stored smaller than `bundle.image_size` (CIFAR finetuned at a pretrained model's 600 px) are
augmented at their own size, then upsampled on the device.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, Tuple

import torch

from .augment import BatchAugment, check_augment, cutout_, normalize, normalize_coeffs, resize
from .datasets import DataError, ImageArrays, ImageFiles

if TYPE_CHECKING:
    from ..config import AugmentConfig
    from .sources import DataBundle

Batch = Tuple[torch.Tensor, torch.Tensor]  # x float32 [B, C, H, W] normalized, y int64 [B], on the device


def seed_for(*parts) -> int:
    """A 63-bit seed from a tuple of ints and tags, the same on every machine and process."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class TrainLoader:
    """Batches of one epoch: set_epoch(e), then iterate; len() = steps per epoch (drop_last)."""

    storage: type = ImageArrays  # the kind of split this loader reads

    def __init__(self, data: ImageArrays, batch_size: int, seed: int, rank: int, world_size: int):
        self.n, self.batch_size, self.seed = len(data), batch_size, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def permutation(self, device) -> torch.Tensor:
        g = torch.Generator(device=device)
        g.manual_seed(seed_for("perm", self.seed, self.epoch))
        return torch.randperm(self.n, generator=g, device=device)

    def batch_index(self, perm: torch.Tensor, step: int) -> torch.Tensor:
        at = (step * self.world_size + self.rank) * self.batch_size  # this rank's slice of global batch `step`
        return perm[at:at + self.batch_size]

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError


LOADERS: Dict[str, Callable[..., TrainLoader]] = {}


def register_loader(name: str):
    def wrap(cls):
        LOADERS[name] = cls
        return cls

    return wrap


@register_loader("device")
class DeviceLoader(TrainLoader):
    """The training set resident on `device` as uint8, augmented there in batched kernels."""

    def __init__(self, data, bundle, augment, batch_size, device, seed, rank=0, world_size=1, num_workers=0):
        super().__init__(data, batch_size, seed, rank, world_size)
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.augment = BatchAugment(augment, data.images.shape[-1], bundle.mean, bundle.std, self.device)
        self.size, self.interpolation = bundle.image_size, bundle.interpolation

    def __iter__(self) -> Iterator[Batch]:
        perm = self.permutation(self.device)
        g = torch.Generator(device=self.device)
        g.manual_seed(seed_for("augment", self.seed, self.epoch, self.rank))
        steps = len(self)
        draws = self.augment.draw(g, steps, self.batch_size)
        for step in range(steps):
            index = self.batch_index(perm, step)
            yield resize(self.augment(self.images, index, draws, step), self.size, self.interpolation), self.labels[index]


@contextlib.contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _EpochBatches(torch.utils.data.Dataset):
    """One item = one finished batch, so per-batch Cutout and the seeding stay inside the worker."""

    def __init__(self, loader: "WorkerLoader", transform, perm: torch.Tensor, epoch: int):
        self.loader, self.transform, self.perm, self.epoch = loader, transform, perm, epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __getitem__(self, step: int) -> Batch:
        ld = self.loader
        index = ld.batch_index(self.perm, step)
        # the draws depend on (seed, epoch, rank, step), never on the worker; per-image ops on 32 px images
        # are slower with several threads (workers already run one; num_workers=0 runs in this process)
        with torch.random.fork_rng(devices=[]), single_thread():
            torch.manual_seed(seed_for("workers", ld.seed, self.epoch, ld.rank, step))
            x = torch.stack([self.transform(ld.images[i]) for i in index.tolist()])
            if ld.cutout:
                n = 1 if ld.cutout_per == "batch" else len(index)
                h, w = x.shape[-2:]
                cutout_(x, torch.randint(h, (n,)), torch.randint(w, (n,)), ld.cutout)
        return x, ld.labels[index]


@register_loader("workers")
class WorkerLoader(TrainLoader):
    """A DataLoader over worker processes applying torchvision transforms per sample (CPU reference)."""

    def __init__(self, data, bundle, augment, batch_size, device, seed, rank=0, world_size=1, num_workers=4):
        import torchvision.transforms as T

        super().__init__(data, batch_size, seed, rank, world_size)
        stored = data.images.shape[-1]
        check_augment(augment, stored)
        self.device, self.num_workers = torch.device(device), num_workers
        self.size, self.interpolation = bundle.image_size, bundle.interpolation
        self.images, self.labels = data.images, data.labels
        self.cutout, self.cutout_per = int(augment.cutout), augment.cutout_per
        steps = []
        if augment.autoaugment:
            steps.append(T.AutoAugment(T.AutoAugmentPolicy(augment.autoaugment)))  # nearest, fill 0
        if augment.flip:
            steps.append(T.RandomHorizontalFlip())
        if augment.crop:
            steps.append(T.RandomCrop(stored, padding=augment.padding, padding_mode=augment.pad_mode))
        steps += [T.ConvertImageDtype(torch.float32), T.Normalize(bundle.mean, bundle.std)]
        self.transform = T.Compose(steps)

    def __iter__(self) -> Iterator[Batch]:
        batches = _EpochBatches(self, self.transform, self.permutation("cpu"), self.epoch)
        pin = self.device.type == "cuda"
        dl = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                         pin_memory=pin, prefetch_factor=4 if self.num_workers else None)
        for x, y in dl:
            x = resize(x.to(self.device, non_blocking=pin), self.size, self.interpolation)
            yield x, y.to(self.device, non_blocking=pin)


def make_train_loader(data: ImageArrays | ImageFiles, bundle: "DataBundle", augment: "AugmentConfig",
                      batch_size: int, device: torch.device, seed: int, kind: str = "device", num_workers: int = 4,
                      rank: int = 0, world_size: int = 1) -> TrainLoader:
    """The training loader of `kind` (device | workers | files); see the module docstring for the contract."""
    if kind not in LOADERS:
        raise DataError(f"engine.loader={kind!r} must be one of {sorted(LOADERS)}")
    if not isinstance(data, LOADERS[kind].storage):
        fits = sorted(k for k, cls in LOADERS.items() if isinstance(data, cls.storage))
        raise DataError(f"engine.loader={kind!r} reads {LOADERS[kind].storage.__name__}, but this dataset is "
                        f"{type(data).__name__}; use engine.loader=auto or one of {fits}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    if batch_size < 1 or len(data) < batch_size * world_size:
        raise DataError(f"batch_size={batch_size} x {world_size} device(s) needs at least that many training "
                        f"examples; the training set has {len(data)}")
    return LOADERS[kind](data, bundle, augment, batch_size, device, seed, rank=rank, world_size=world_size,
                         num_workers=num_workers)


class EvalLoader:
    """Unaugmented, unshuffled batches of this rank's contiguous shard; the last batch may be short."""

    def __init__(self, data: ImageArrays, bundle, batch_size: int, device, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0):
        lo, hi = len(data) * rank // world_size, len(data) * (rank + 1) // world_size
        self.device, self.batch_size = torch.device(device), batch_size
        self.images = data.images[lo:hi].to(self.device)
        self.labels = data.labels[lo:hi].to(self.device)
        self.scale, self.shift = normalize_coeffs(bundle.mean, bundle.std, self.device)
        self.size, self.interpolation = bundle.image_size, bundle.interpolation

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for at in range(0, len(self.labels), self.batch_size):
            x = normalize(self.images[at:at + self.batch_size], self.scale, self.shift)
            yield resize(x, self.size, self.interpolation), self.labels[at:at + self.batch_size]


EVAL_LOADERS: Dict[type, Callable[..., Iterable[Batch]]] = {ImageArrays: EvalLoader}  # split kind -> loader


def make_eval_loader(data: ImageArrays | ImageFiles, bundle: "DataBundle", batch_size: int, device: torch.device, rank: int = 0,
                     world_size: int = 1, num_workers: int = 0) -> Iterable[Batch]:
    """Evaluation batches: no augmentation, no shuffling, every example of the shard exactly once.
    `num_workers` decode processes for file-backed data (resident arrays need none)."""
    if batch_size < 1:
        raise DataError(f"eval batch size {batch_size} must be >= 1")
    return EVAL_LOADERS[type(data)](data, bundle, batch_size, device, rank, world_size, num_workers=num_workers)

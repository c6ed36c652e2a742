"""Data: sources (torchvision files, image folders, synthetic) -> uint8 tensors; label noise; the
device-resident loader with batched augmentation (crop, flip, Cutout, AutoAugment) and the
worker-process loader with torchvision transforms.

    bundle = load_data(cfg.dataset)                       # DataBundle: train/val/test uint8 arrays + facts
    train = make_train_loader(bundle.train, bundle, cfg.augment, batch_size, device, seed)
    train.set_epoch(epoch); for x, y in train: ...        # float32 normalized x, int64 y, on `device`
    for x, y in make_eval_loader(bundle.test, bundle, 1024, device): ...
"""
from .augment import CUTOUT_PER, PAD_MODES, BatchAugment, EpochDraws, check_augment, cutout_, normalize, normalize_coeffs
from .autoaugment import POLICIES, BatchedAutoAugment
from .datasets import DATASETS, DataError, DatasetSpec, ImageArrays, register_dataset
from .loaders import LOADERS, EvalLoader, TrainLoader, make_eval_loader, make_train_loader, seed_for
from .noise import NOISE_KINDS, apply_label_noise
from .sources import SOURCES, DataBundle, fingerprint, load_data, register_source, split_validation

__all__ = [
    "DataError", "ImageArrays", "DataBundle", "DatasetSpec", "DATASETS", "SOURCES", "LOADERS", "NOISE_KINDS",
    "POLICIES", "PAD_MODES", "CUTOUT_PER", "load_data", "make_train_loader", "make_eval_loader", "TrainLoader", "EvalLoader",
    "register_dataset", "register_source", "apply_label_noise", "fingerprint", "split_validation", "seed_for",
    "BatchAugment", "BatchedAutoAugment", "EpochDraws", "check_augment", "cutout_", "normalize", "normalize_coeffs",
]

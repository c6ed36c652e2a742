"""Data: sources (torchvision files, image folders, synthetic) -> uint8 tensors; label noise; the
device-resident loader with batched augmentation (crop, flip, Cutout, AutoAugment) and the
worker-process loader with torchvision transforms.

    bundle = load_data(cfg.dataset)                       # DataBundle: train/val/test uint8 arrays + facts
    train = make_train_loader(bundle.train, bundle, cfg.augment, batch_size, device, seed)
    train.set_epoch(epoch); for x, y in train: ...        # float32 normalized x, int64 y, on `device`
    for x, y in make_eval_loader(bundle.test, bundle, 1024, device): ...

File-backed datasets (ImageNet, the finetuning sets) give `ImageFiles` splits instead of arrays;
`bundle.auto_loader` is then "files" (DataLoader workers decoding JPEGs with torchvision transforms).
"""
from .augment import CUTOUT_PER, PAD_MODES, BatchAugment, EpochDraws, check_augment, cutout_, normalize, normalize_coeffs
from .autoaugment import POLICIES, BatchedAutoAugment
from .datasets import DATASETS, DataError, DatasetSpec, ImageArrays, ImageFiles, Split, register_dataset
from .loaders import LOADERS, EvalLoader, TrainLoader, make_eval_loader, make_train_loader, seed_for
from .file_loader import FileEvalLoader, FileLoader, eval_transform, train_transform
from .noise import NOISE_KINDS, apply_label_noise
from .sources import AUTO_LOADER, SOURCES, DataBundle, fingerprint, fit_to_model, load_data, register_source, split_validation

__all__ = [
    "DataError", "ImageArrays", "ImageFiles", "Split", "DataBundle", "AUTO_LOADER", "fit_to_model",
    "FileLoader", "FileEvalLoader", "train_transform", "eval_transform", "DatasetSpec", "DATASETS", "SOURCES", "LOADERS", "NOISE_KINDS",
    "POLICIES", "PAD_MODES", "CUTOUT_PER", "load_data", "make_train_loader", "make_eval_loader", "TrainLoader", "EvalLoader",
    "register_dataset", "register_source", "apply_label_noise", "fingerprint", "split_validation", "seed_for",
    "BatchAugment", "BatchedAutoAugment", "EpochDraws", "check_augment", "cutout_", "normalize", "normalize_coeffs",
]

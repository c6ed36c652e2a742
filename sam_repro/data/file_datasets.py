"""File-backed datasets: ImageNet (Table 2) and the finetuning sets of Table 3.

These stay on disk as image files (`ImageFiles`) and are decoded per batch by DataLoader worker
processes (`sam_repro.data.file_loader`); only the file list and the labels live in memory.

- imagenet: ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG, the layout that
  torchvision.datasets.ImageNet unpacks the ILSVRC2012 archives into. ImageNet cannot be downloaded
  by a program: `dataset.download=true` only unpacks the archives a user placed in ROOT.
- flowers102, stanford_cars, oxford_pets, fgvc_aircraft, food101: torchvision's own readers parse
  each dataset's split and annotation files; we keep their (file, label) lists. Training uses the
  official train+val split where there is one (Flowers102, Pets, Aircraft), the usual finetuning
  protocol; evaluation the official test split.
- birdsnap: no torchvision reader (its images are fetched from URLs by the authors' script):
  an image-folder copy, `dataset.source=folder`.

`image_size` of these specs is the crop the model sees by default (224); normalization is
ImageNet's. Finetuning replaces both with the pretrained model's (sam_repro.models.finetune).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence, Tuple

from .datasets import DATASETS, DataError, ImageFiles, Splits, missing_data_error, register_dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EVAL_SPLITS = ("val", "test")  # the evaluation folder of an image-folder copy: ImageNet says val
IMAGENET_UNPACK = ("dataset.download=true (unpacks ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
                   "ILSVRC2012_devkit_t12.tar.gz that you placed in the root; nothing is fetched)")


# ---------------------------------------------------------------- image folders (scandir: no stat per file)
def list_classes(split_dir: Path) -> List[str]:
    """Sorted class folder names of ROOT/<split> (sorted order = label order)."""
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def list_files(split_dir: Path, classes: Sequence[str]) -> Tuple[List[str], List[int]]:
    """Image files of split_dir/<class>/ in class-then-name order, with their labels."""
    files: List[str] = []
    labels: List[int] = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue  # a class with no evaluation images
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file())
        files += [str(folder / n) for n in names]
        labels += [label] * len(names)
    return files, labels


def read_image_folder(root: Path, eval_splits: Sequence[str] = EVAL_SPLITS) -> Tuple[ImageFiles, ImageFiles, List[str]]:
    """(train, eval, classes) of ROOT/train/<class>/* and the first of ROOT/{val,test}/<class>/*."""
    train_dir = root / "train"
    eval_dir = next((root / s for s in eval_splits if (root / s).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        raise DataError(f"image folder {root} needs train/<class>/* and {' or '.join(eval_splits)}/<class>/*")
    classes = list_classes(train_dir)
    unknown = sorted(set(list_classes(eval_dir)) - set(classes))
    if unknown:
        raise DataError(f"image folder {root}: {eval_dir.name} classes {unknown[:5]} have no train folder")
    splits = []
    for d in (train_dir, eval_dir):
        files, labels = list_files(d, classes)
        if not files:
            raise DataError(f"image folder {root}: no JPEG or PNG files under {d}/<class>/")
        splits.append(ImageFiles.from_lists(root, files, labels))
    return splits[0], splits[1], classes


# ---------------------------------------------------------------- ImageNet
def _imagenet_unpack(root: Path, svhn_extra: bool) -> None:
    """Unpack ILSVRC2012_img_{train,val}.tar and the devkit found in ROOT (torchvision does it)."""
    import torchvision.datasets as tvd

    for split in ("train", "val"):
        if not (root / split).is_dir():
            tvd.ImageNet(str(root), split=split)


@register_dataset(name="imagenet", num_classes=1000, in_chans=3, image_size=224, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD, classes=(), files=True, download=_imagenet_unpack,
                  expected="train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
def read_imagenet(root: Path, svhn_extra: bool = False) -> Splits:
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise missing_data_error("imagenet", root, DATASETS["imagenet"].expected, download=IMAGENET_UNPACK)
    train, val, classes = read_image_folder(root, eval_splits=("val",))
    if len(classes) != 1000:  # labels are folder positions: a missing class would shift every label after it
        raise DataError(f"imagenet at {root}: {len(classes)} class folders in train/, ImageNet has 1000; "
                        f"a subset runs with dataset.source=folder dataset.root={root}")
    return train, val


# ---------------------------------------------------------------- torchvision's finetuning datasets
def _files_and_labels(ds) -> Tuple[List[str], List[int]]:
    """The (file, label) lists a torchvision dataset object built. torchvision exposes no public
    file list; these private attributes have been stable since torchvision 0.12."""
    if hasattr(ds, "_samples"):  # StanfordCars: [(path, label)]
        return [str(f) for f, _ in ds._samples], [int(y) for _, y in ds._samples]
    files = ds._images if hasattr(ds, "_images") else ds._image_files  # Pets | Flowers, Aircraft, Food
    return [str(f) for f in files], [int(y) for y in ds._labels]


def register_torchvision_files(name: str, cls_name: str, num_classes: int, base: str, expected: str,
                               train_splits: Sequence[str], test_split: str, **kwargs) -> None:
    """Register a torchvision dataset class (files in ROOT/<base>) as a file-backed dataset."""

    def build(root: Path, split: str, download: bool):
        import torchvision.datasets as tvd

        return getattr(tvd, cls_name)(str(root), split=split, download=download, **kwargs)

    def read(root: Path, svhn_extra: bool = False) -> Splits:
        out = []
        for splits in (train_splits, (test_split,)):
            files: List[str] = []
            labels: List[int] = []
            for split in splits:
                try:
                    ds = build(root, split, download=False)
                except RuntimeError:  # torchvision: "Dataset not found or corrupted"
                    raise missing_data_error(name, root / base, expected) from None
                f, y = _files_and_labels(ds)
                files += f
                labels += y
            out.append(ImageFiles.from_lists(root, files, labels))
        return out[0], out[1]

    def download(root: Path, svhn_extra: bool) -> None:
        for split in (*train_splits, test_split):
            build(root, split, download=True)

    register_dataset(name=name, num_classes=num_classes, in_chans=3, image_size=224, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, classes=(), expected=expected, download=download, files=True)(read)


register_torchvision_files("flowers102", "Flowers102", 102, "flowers-102",
                           "flowers-102/jpg/*.jpg, imagelabels.mat, setid.mat", ("train", "val"), "test")
register_torchvision_files("stanford_cars", "StanfordCars", 196, "stanford_cars",
                           "stanford_cars/cars_{train,test}/*.jpg, devkit/cars_train_annos.mat, "
                           "cars_test_annos_withlabels.mat (torchvision's download URL is gone: fetch them by hand)",
                           ("train",), "test")
register_torchvision_files("oxford_pets", "OxfordIIITPet", 37, "oxford-iiit-pet",
                           "oxford-iiit-pet/images/*.jpg, annotations/{trainval,test}.txt", ("trainval",), "test")
register_torchvision_files("fgvc_aircraft", "FGVCAircraft", 100, "fgvc-aircraft-2013b",
                           "fgvc-aircraft-2013b/data/images/*.jpg, images_variant_{trainval,test}.txt",
                           ("trainval",), "test", annotation_level="variant")
register_torchvision_files("food101", "Food101", 101, "food-101", "food-101/images/<class>/*.jpg, meta/{train,test}.json",
                           ("train",), "test")


# ---------------------------------------------------------------- Birdsnap (an image-folder copy only)
@register_dataset(name="birdsnap", num_classes=500, in_chans=3, image_size=224, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD, classes=(), files=True,
                  expected="an image-folder copy: train/<species>/*.jpg and test/<species>/*.jpg")
def read_birdsnap(root: Path, svhn_extra: bool = False) -> Splits:
    raise DataError(f"dataset 'birdsnap' has no torchvision reader, so dataset.download=true cannot fetch it "
                    f"(looked in {root}); supply an image-folder copy with dataset.source=folder "
                    f"dataset.root=<dir with train/<species>/* and test/<species>/*>")

"""The image-folder source: ROOT/train/<class>/* and ROOT/test/<class>/* (PNG or JPEG).

Classes are the sorted folder names of ROOT/train (sorted order = label order). Images are decoded
once, in parallel (a process pool), into uint8 tensors and cached as one `*.cache.pt` file, keyed by
a fingerprint of the file list (relative paths, sizes, mtimes) and the decode settings: a second
load reads the cache; any added, removed or rewritten file changes the key and forces a new decode.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .datasets import DataError, ImageArrays

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
PARALLEL_MIN_FILES = 512  # below this, decoding in-process beats starting a pool
CACHE_FORMAT = 1  # bump when the cache layout changes


def list_split(root: Path, split: str) -> Tuple[List[str], List[Path]]:
    """(class names, image files in class-then-name order) of ROOT/<split>."""
    d = root / split
    if not d.is_dir():
        raise DataError(f"image folder {root}: no '{split}' directory (expected {d}/<class>/*.png|jpg)")
    classes = sorted(p.name for p in d.iterdir() if p.is_dir())
    files = [f for c in classes for f in sorted((d / c).iterdir())
             if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise DataError(f"image folder {root}: no PNG or JPEG files under {d}/<class>/")
    return classes, files


def file_list_key(root: Path, files: Sequence[Path], in_chans: int, image_size: int) -> str:
    """sha256 of the file list (relative path, size, mtime in ns) and the decode settings."""
    h = hashlib.sha256(f"format={CACHE_FORMAT} chans={in_chans} size={image_size}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode_chunk(args: Tuple[List[str], str, int]) -> np.ndarray:
    """Decode image files into uint8 [n, H, W, C]; runs in a pool worker (PIL and numpy only)."""
    from PIL import Image

    paths, mode, size = args
    out = np.empty((len(paths), size, size, 1 if mode == "L" else 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert(mode)  # forces the full decode: truncated or corrupt data fails here
        except Exception as e:
            raise DataError(f"cannot decode image {p}: {type(e).__name__}: {e}") from None
        if im.size != (size, size):
            raise DataError(f"image {p} is {im.size[0]}x{im.size[1]}, the dataset expects {size}x{size}")
        out[i] = np.asarray(im, dtype=np.uint8).reshape(size, size, -1)
    return out


def decode_images(files: Sequence[Path], in_chans: int, image_size: int, workers: int) -> torch.Tensor:
    """uint8 [N, C, H, W] from image files; `workers` processes (0 = one per core)."""
    mode = "L" if in_chans == 1 else "RGB"
    if workers <= 0:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    paths = [str(f) for f in files]
    if workers <= 1 or len(paths) < PARALLEL_MIN_FILES:
        arr = _decode_chunk((paths, mode, image_size))
    else:
        n_chunks = min(len(paths), workers * 4)
        chunks = [list(c) for c in np.array_split(np.array(paths, dtype=object), n_chunks)]
        # fork: the workers need only PIL and numpy, and start in milliseconds
        ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            arr = np.concatenate(list(pool.map(_decode_chunk, [(c, mode, image_size) for c in chunks])))
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def cache_path(root: Path, cache_dir: Optional[str]) -> Path:
    """Where ROOT's decode cache lives: in cache_dir, or beside ROOT (its parent folder)."""
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:8]  # two roots named alike never share a cache
    base = Path(cache_dir).expanduser() if cache_dir else root.parent
    return base / f"{root.name}-{tag}.cache.pt"


def _save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_folder(root: Path, in_chans: int, image_size: int, workers: int = 0,
                cache_dir: Optional[str] = None) -> Tuple[ImageArrays, ImageArrays, List[str]]:
    """(train, test, classes) of an image folder, decoded once and cached."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist "
                        f"(expected {root}/train/<class>/* and {root}/test/<class>/*)")
    classes, train_files = list_split(root, "train")
    test_classes, test_files = list_split(root, "test")
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise DataError(f"image folder {root}: test classes {unknown} have no train folder")
    key = file_list_key(root, train_files + test_files, in_chans, image_size)
    path = cache_path(root, cache_dir)
    if path.is_file():
        try:
            c = torch.load(path, weights_only=True)
            if c.get("key") == key:
                return (ImageArrays(c["train_images"], c["train_labels"]),
                        ImageArrays(c["test_images"], c["test_labels"]), list(c["classes"]))
        except Exception:
            pass  # unreadable cache: decode again and overwrite it
    label_of = {c: i for i, c in enumerate(classes)}
    labels = lambda files: torch.tensor([label_of[f.parent.name] for f in files], dtype=torch.int64)
    images = decode_images(train_files + test_files, in_chans, image_size, workers)
    n = len(train_files)
    train = ImageArrays(images[:n].contiguous(), labels(train_files))
    test = ImageArrays(images[n:].contiguous(), labels(test_files))
    try:
        _save_atomic({"key": key, "classes": classes, "train_images": train.images, "train_labels": train.labels,
                      "test_images": test.images, "test_labels": test.labels}, path)
    except OSError as e:  # a read-only data folder still loads, just without a cache
        warnings.warn(f"could not write the decode cache {path}: {e}; set dataset.cache_dir to a writable folder")
    return train, test, classes

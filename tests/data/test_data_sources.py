"""Data sources: tiny files in each official on-disk format, the image-folder cache, label noise,
validation splits and fingerprints. Every dataset here is written into tmp_path."""
import gzip
import os
import pickle
import socket
import struct

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from sam_repro.config import DatasetConfig
from sam_repro.data import DATASETS, DataError, apply_label_noise, load_data
from sam_repro.data import folder as folder_mod

INFO_KEYS = {"source", "root", "fingerprint", "train_size", "test_size", "val_size", "label_noise"}


def rand_images(n, chans=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, chans, size, size), dtype=torch.uint8, generator=g)


def cfg(**kw) -> DatasetConfig:
    return DatasetConfig(**{"decode_workers": 1, **kw})


# ---------------------------------------------------------------- official formats
def write_cifar(root, images, labels, n_train_batches, label_key, files):
    root.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(labels)), len(files))
    for name, idx in zip(files, chunks):
        d = {b"data": images[idx].reshape(len(idx), -1).numpy(), label_key: labels[idx].tolist()}
        with open(root / name, "wb") as f:
            pickle.dump(d, f)


def test_cifar10_pickle_batches(tmp_path):
    x, y = rand_images(12), torch.arange(12) % 10
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    write_cifar(tmp_path / "c10" / "cifar-10-batches-py", x, y, 5, b"labels", files)
    b = load_data(cfg(name="cifar10", root=str(tmp_path / "c10")))
    n_test = len(np.array_split(np.arange(12), 6)[-1])
    assert b.train.images.shape == (12 - n_test, 3, 32, 32) and b.test.images.shape == (n_test, 3, 32, 32)
    assert torch.equal(torch.cat([b.train.images, b.test.images]), x)  # row-major RGB planes survive
    assert torch.equal(torch.cat([b.train.labels, b.test.labels]), y)
    assert b.classes[0] == "airplane" and b.num_classes == 10 and b.in_chans == 3 and b.image_size == 32
    assert set(b.info) == INFO_KEYS and b.info["source"] == "torchvision" and b.mean == DATASETS["cifar10"].mean


def test_cifar100_fine_labels(tmp_path):
    x, y = rand_images(6), torch.tensor([0, 99, 5, 42, 17, 3])
    write_cifar(tmp_path / "cifar-100-python", x, y, 1, b"fine_labels", ["train", "test"])
    b = load_data(cfg(name="cifar100", root=str(tmp_path)))
    assert torch.equal(b.train.labels, y[:3]) and torch.equal(b.test.labels, y[3:])
    assert b.num_classes == 100 and b.classes[99] == "worm"


def svhn_mat(path, images, labels):
    scipy.io.savemat(str(path), {"X": images.permute(2, 3, 1, 0).numpy(), "y": labels.numpy()[:, None]})


@pytest.mark.parametrize("extra", [True, False])
def test_svhn_mat_files_label_10_is_zero(tmp_path, extra):
    x = rand_images(9, seed=1)
    svhn_mat(tmp_path / "train_32x32.mat", x[:4], torch.tensor([10, 1, 2, 3]))
    svhn_mat(tmp_path / "test_32x32.mat", x[4:6], torch.tensor([10, 9]))
    svhn_mat(tmp_path / "extra_32x32.mat", x[6:], torch.tensor([4, 10, 6]))
    b = load_data(cfg(name="svhn", root=str(tmp_path), svhn_extra=extra))
    assert torch.equal(b.train.labels, torch.tensor([0, 1, 2, 3] + ([4, 0, 6] if extra else [])))
    assert torch.equal(b.train.images, torch.cat([x[:4], x[6:]]) if extra else x[:4])
    assert torch.equal(b.test.labels, torch.tensor([0, 9])) and torch.equal(b.test.images, x[4:6])


def test_svhn_missing_extra_names_the_switch(tmp_path):
    x = rand_images(2)
    svhn_mat(tmp_path / "train_32x32.mat", x[:1], torch.tensor([1]))
    svhn_mat(tmp_path / "test_32x32.mat", x[1:], torch.tensor([2]))
    with pytest.raises(DataError, match="svhn_extra=false"):
        load_data(cfg(name="svhn", root=str(tmp_path)))


def write_idx(path, array, gz):
    raw = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files(tmp_path, gz):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    x = rand_images(7, chans=1, size=28)
    suffix = ".gz" if gz else ""
    write_idx(raw / f"train-images-idx3-ubyte{suffix}", x[:5, 0].numpy(), gz)
    write_idx(raw / f"train-labels-idx1-ubyte{suffix}", np.array([9, 0, 1, 2, 3], dtype=np.uint8), gz)
    write_idx(raw / f"t10k-images-idx3-ubyte{suffix}", x[5:, 0].numpy(), gz)
    write_idx(raw / f"t10k-labels-idx1-ubyte{suffix}", np.array([4, 5], dtype=np.uint8), gz)
    b = load_data(cfg(name="fashion_mnist", root=str(tmp_path)))
    assert b.train.images.shape == (5, 1, 28, 28) and torch.equal(b.train.images, x[:5])
    assert b.train.labels.tolist() == [9, 0, 1, 2, 3] and b.test.labels.tolist() == [4, 5]
    assert b.in_chans == 1 and b.image_size == 28 and b.mean == (0.1307,)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_missing_dataset_names_path_and_both_remedies_at_once(tmp_path, name, monkeypatch):
    root = tmp_path / "nowhere"
    attempts = []  # no download attempt: any connection is recorded and refused (not a timer)

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("the test refuses network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **kw: refuse(None, address))
    with pytest.raises(DataError) as e:
        load_data(cfg(name=name, root=str(root)))
    assert attempts == [] and not root.exists()  # nothing fetched, nothing written
    msg = str(e.value)
    assert str(root) in msg and "dataset.download=true" in msg and "dataset.source=folder" in msg and "\n" not in msg


def test_unknown_names_and_bad_values_raise_data_error():
    for bad, key in ((dict(name="imagenet9"), "dataset.name"), (dict(source="s3"), "dataset.source"),
                     (dict(source="synthetic", val_fraction=1.0), "val_fraction"),
                     (dict(source="synthetic", label_noise=1.0), "label_noise"),
                     (dict(source="synthetic", noise_kind="pairflip"), "noise_kind")):
        with pytest.raises(DataError, match=key):
            load_data(cfg(**bad))


# ---------------------------------------------------------------- image folders
def write_folder(root, images, labels, classes, split, ext=".png"):
    for i, (im, lab) in enumerate(zip(images, labels)):
        d = root / split / classes[lab]
        d.mkdir(parents=True, exist_ok=True)
        arr = im.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(d / f"{i:04d}{ext}")


def make_folder(root, n_train=20, n_test=10, chans=3, size=32, seed=0):
    classes = list(DATASETS["cifar10"].classes) if chans == 3 else [f"c{i}" for i in range(10)]
    x, y = rand_images(n_train + n_test, chans, size, seed), torch.arange(n_train + n_test) % 10
    write_folder(root, x[:n_train], y[:n_train], classes, "train")
    write_folder(root, x[n_train:], y[n_train:], classes, "test")
    return x, y


def by_label(a):
    # folder order is class-then-file, so compare after sorting by (label, first pixels)
    order = sorted(range(len(a.labels)), key=lambda i: (int(a.labels[i]), a.images[i].flatten()[:16].tolist()))
    return a.images[order], a.labels[order]


def test_folder_loads_sorted_classes_and_writes_cache(tmp_path):
    root = tmp_path / "c10"
    x, y = make_folder(root)
    b = load_data(cfg(name="cifar10", source="folder", root=str(root), cache_dir=str(tmp_path / "cache")))
    assert b.classes == list(DATASETS["cifar10"].classes) and b.info["source"] == "folder"
    assert b.info["root"] == str(root)
    want = type(b.train)(x[:20], y[:20])
    assert all(torch.equal(u, v) for u, v in zip(by_label(b.train), by_label(want)))  # PNG is lossless
    assert len(list((tmp_path / "cache").glob("*.cache.pt"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_folder_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path, monkeypatch):
    root = tmp_path / "c10"
    make_folder(root)
    c = cfg(name="cifar10", source="folder", root=str(root))  # cache beside the root
    first = load_data(c)
    assert len(list(tmp_path.glob("c10-*.cache.pt"))) == 1

    def no_decode(*a, **k):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(folder_mod, "decode_images", no_decode)
    assert load_data(c).info["fingerprint"] == first.info["fingerprint"]
    monkeypatch.undo()
    victim = sorted((root / "test").rglob("*.png"))[0]
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(victim)
    os.utime(victim, ns=(1, 1))  # a different mtime even on coarse clocks
    changed = load_data(c)
    assert changed.info["fingerprint"] != first.info["fingerprint"]
    assert (changed.test.images == 0).all(dim=(1, 2, 3)).sum() == 1


def test_folder_parallel_decode_equals_serial(tmp_path, monkeypatch):
    root = tmp_path / "c10"
    make_folder(root, n_train=30, n_test=10)
    files = folder_mod.list_split(root, "train")[1]
    serial = folder_mod.decode_images(files, 3, 32, workers=1)
    monkeypatch.setattr(folder_mod, "PARALLEL_MIN_FILES", 0)
    assert torch.equal(folder_mod.decode_images(files, 3, 32, workers=2), serial)


def test_folder_jpeg_and_grayscale(tmp_path):
    root = tmp_path / "fm"
    classes = [f"c{i}" for i in range(10)]
    x = rand_images(20, chans=1, size=28)
    write_folder(root, x[:10], torch.arange(10), classes, "train", ext=".jpg")
    write_folder(root, x[10:], torch.arange(10), classes, "test", ext=".jpg")
    b = load_data(cfg(name="fashion_mnist", source="folder", root=str(root), cache_dir=str(tmp_path)))
    assert b.train.images.shape == (10, 1, 28, 28) and b.in_chans == 1
    assert (b.train.images.float() - x[:10].float()).abs().mean() < 40  # lossy, but the same images


def test_corrupt_jpeg_is_reported_by_path(tmp_path):
    root = tmp_path / "c10"
    make_folder(root)
    bad = root / "train" / "cat" / "broken.jpg"
    good = sorted((root / "train" / "cat").glob("*.png"))[0]
    buf = tmp_path / "ok.jpg"
    Image.open(good).save(buf)
    bad.write_bytes(buf.read_bytes()[:200])  # a truncated JPEG
    with pytest.raises(DataError, match="broken.jpg"):
        load_data(cfg(name="cifar10", source="folder", root=str(root), cache_dir=str(tmp_path)))


def test_folder_wrong_image_size_names_the_file(tmp_path):
    root = tmp_path / "c10"
    make_folder(root)
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(root / "test" / "dog" / "small.png")
    with pytest.raises(DataError, match="small.png.*32x32"):
        load_data(cfg(name="cifar10", source="folder", root=str(root), cache_dir=str(tmp_path)))


def test_fingerprint_depends_on_bytes_not_on_source(tmp_path):
    x, y = make_folder(tmp_path / "as_folder", n_train=10, n_test=10)
    # the same images, class-then-file ordered as the folder source reads them, as CIFAR pickles
    order_tr = sorted(range(10), key=lambda i: (int(y[i]), i))
    order_te = sorted(range(10, 20), key=lambda i: (int(y[i]), i))
    d = tmp_path / "as_pickle" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    tr = np.array_split(np.array(order_tr), 5)
    for k in range(5):
        with open(d / f"data_batch_{k + 1}", "wb") as f:
            pickle.dump({b"data": x[tr[k]].reshape(len(tr[k]), -1).numpy(), b"labels": y[tr[k]].tolist()}, f)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": x[order_te].reshape(10, -1).numpy(), b"labels": y[order_te].tolist()}, f)
    a = load_data(cfg(name="cifar10", source="folder", root=str(tmp_path / "as_folder"), cache_dir=str(tmp_path)))
    b = load_data(cfg(name="cifar10", root=str(tmp_path / "as_pickle")))
    assert a.info["fingerprint"] == b.info["fingerprint"] and a.info["fingerprint"].startswith("sha256:")
    x2 = x[order_te].clone()
    x2[0, 0, 0, 0] ^= 1  # one bit of one pixel
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": x2.reshape(10, -1).numpy(), b"labels": y[order_te].tolist()}, f)
    assert load_data(cfg(name="cifar10", root=str(tmp_path / "as_pickle"))).info["fingerprint"] != a.info["fingerprint"]


# ---------------------------------------------------------------- synthetic, splits, noise
def test_synthetic_is_deterministic_and_learnable():
    a, b = load_data(cfg(source="synthetic")), load_data(cfg(source="synthetic"))
    assert torch.equal(a.train.images, b.train.images) and a.info["fingerprint"] == b.info["fingerprint"]
    assert a.info["source"] == "synthetic" and a.info["root"] is None
    assert (a.info["train_size"], a.info["test_size"]) == (2048, 512)
    # a nearest-class-mean classifier fit on train must beat chance (10 %) on test by far
    means = torch.stack([a.train.images[a.train.labels == k].float().mean(0) for k in range(10)])
    d = torch.cdist(a.test.images.float().flatten(1), means.flatten(1))
    assert (d.argmin(1) == a.test.labels).float().mean() > 0.8
    other = load_data(cfg(source="synthetic", num_classes=4, image_size=16, channels=1, train_size=100, test_size=20))
    assert other.train.images.shape == (100, 1, 16, 16) and other.num_classes == 4 and len(other.mean) == 1


def test_validation_split_sizes_disjoint_and_seeded():
    full = load_data(cfg(source="synthetic"))
    b = load_data(cfg(source="synthetic", val_fraction=0.1))
    assert (len(b.train), len(b.val)) == (1843, 205) and (b.info["train_size"], b.info["val_size"]) == (1843, 205)
    together = torch.cat([b.train.images, b.val.images]).flatten(1)
    key = lambda t: t.double() @ torch.randn(t.shape[1], generator=torch.Generator().manual_seed(0)).double()
    assert torch.equal(key(together).sort().values, key(full.train.images.flatten(1)).sort().values)
    other = load_data(cfg(source="synthetic", val_fraction=0.1, split_seed=1))
    assert not torch.equal(other.val.images, b.val.images)
    assert full.val is None and full.info["val_size"] == 0


def test_symmetric_noise_rate_seed_and_untouched_test_and_val():
    clean = load_data(cfg(source="synthetic", train_size=4000, val_fraction=0.1))
    noisy = load_data(cfg(source="synthetic", train_size=4000, val_fraction=0.1, label_noise=0.4, noise_seed=3))
    info = noisy.info["label_noise"]
    assert info["kind"] == "symmetric" and info["rate"] == 0.4 and info["seed"] == 3
    changed = (noisy.train.labels != clean.train.labels).float().mean().item()
    assert changed == pytest.approx(info["realized_fraction"])
    assert changed == pytest.approx(0.4 * 9 / 10, abs=0.015)  # some noisy labels keep their class by chance
    assert torch.equal(noisy.test.labels, clean.test.labels) and torch.equal(noisy.val.labels, clean.val.labels)
    assert torch.equal(noisy.train.images, clean.train.images)
    again = load_data(cfg(source="synthetic", train_size=4000, val_fraction=0.1, label_noise=0.4, noise_seed=3))
    other = load_data(cfg(source="synthetic", train_size=4000, val_fraction=0.1, label_noise=0.4, noise_seed=4))
    assert torch.equal(again.train.labels, noisy.train.labels)
    assert not torch.equal(other.train.labels, noisy.train.labels)
    assert clean.info["label_noise"]["realized_fraction"] == 0.0


def test_asymmetric_noise_cifar10_pairs_and_generic_shift():
    labels = torch.arange(10).repeat_interleave(1000)
    noisy, info = apply_label_noise(labels, 10, 0.3, "asymmetric", seed=0, dataset="cifar10")
    pairs = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    for c in range(10):
        got = noisy[labels == c]
        if c in pairs:
            assert ((got != c) == (got == pairs[c])).all() and (got == pairs[c]).float().mean() == pytest.approx(0.3)
        else:
            assert (got == c).all()
    assert info["realized_fraction"] == pytest.approx(0.3 * 5 / 10)
    shifted, _ = apply_label_noise(labels, 10, 0.2, "asymmetric", seed=0, dataset="svhn")
    moved = shifted != labels
    assert (shifted[moved] == (labels[moved] + 1) % 10).all() and moved.float().mean() == pytest.approx(0.2)

"""Training and evaluation loaders: epochs, ranks, reproducibility, and device vs workers statistics."""
import pytest
import torch

from sam_repro.config import AugmentConfig, DatasetConfig
from sam_repro.data import DataError, ImageArrays, load_data, make_eval_loader, make_train_loader, normalize_coeffs

CPU = torch.device("cpu")
NONE = AugmentConfig(crop=False, flip=False)
FULL = AugmentConfig(autoaugment="cifar10", cutout=16)


@pytest.fixture(scope="module")
def bundle():
    return load_data(DatasetConfig(source="synthetic", train_size=1000, test_size=250))


def with_ids(data: ImageArrays) -> ImageArrays:
    """The same images labelled 0..N-1, so a batch's labels say which examples it holds."""
    return ImageArrays(data.images, torch.arange(len(data)))


def epoch(loader, e):
    loader.set_epoch(e)
    return list(loader)


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_epoch_shapes_length_and_distinct_examples(bundle):
    loader = make_train_loader(with_ids(bundle.train), bundle, NONE, 64, CPU, seed=0)
    assert len(loader) == 1000 // 64
    batches = epoch(loader, 0)
    assert len(batches) == 15
    x, y = batches[0]
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    ids = torch.cat([y for _, y in batches])
    assert len(ids.unique()) == 960  # drop_last, no repeats within an epoch
    scale, shift = normalize_coeffs(bundle.mean, bundle.std)
    torch.testing.assert_close(x, bundle.train.images[y].float() * scale + shift)  # unaugmented = normalized
    assert not torch.equal(epoch(loader, 1)[0][1], y)  # a new order each epoch


@pytest.mark.parametrize("aug", [AugmentConfig(), FULL,
                                 AugmentConfig(pad_mode="constant", cutout=8, cutout_per="sample")])
def test_device_loader_is_a_pure_function_of_seed_epoch_rank(bundle, aug):
    make = lambda seed: make_train_loader(bundle.train, bundle, aug, 50, CPU, seed=seed)
    a, b = make(0), make(0)
    first = epoch(a, 3)
    assert same(first, epoch(b, 3))  # a fresh loader (a resumed run) gives the same batches
    assert same(first, epoch(a, 3))  # and so does the same loader iterated again
    assert not same(first, epoch(b, 4)) and not same(first, epoch(make(1), 3))


def test_ranks_share_one_permutation_and_take_their_slice(bundle):
    data = with_ids(bundle.train)
    whole = epoch(make_train_loader(data, bundle, AugmentConfig(), 64, CPU, seed=7), 2)
    ranks = [epoch(make_train_loader(data, bundle, AugmentConfig(), 32, CPU, seed=7, rank=r, world_size=2), 2)
             for r in range(2)]
    assert len(ranks[0]) == len(whole) == 1000 // 64
    for step, (_, y) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), y)
    assert not torch.equal(ranks[0][0][0], whole[0][0][:32])  # augmentation is drawn per rank


def test_workers_loader_reproducible_whatever_the_worker_count(bundle):
    make = lambda workers: make_train_loader(bundle.train, bundle, FULL, 100, CPU, seed=0, kind="workers",
                                             num_workers=workers)
    serial, parallel = make(0), make(2)
    first = epoch(serial, 1)
    assert len(first) == 10 and first[0][0].shape == (100, 3, 32, 32)
    assert same(first, epoch(parallel, 1))
    assert not same(first, epoch(serial, 2))


def stats(loader, epochs=2):
    xs = torch.cat([x for e in range(epochs) for x, _ in epoch(loader, e)])
    return xs.mean(dim=(0, 2, 3)), xs.std(dim=(0, 2, 3)), (xs == 0).float().mean(), xs.mean(0)


def test_device_and_workers_loaders_agree_in_distribution():
    """Same semantics, different random streams: compare moments, Cutout area and the mean image.

    One fixed asymmetric image repeated: the mean output image is then the crop/flip/pad-mode
    distribution made visible (reflect vs zero padding or a wrong flip would move it far).
    """
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    img = torch.stack([xx * 8, yy * 8, ((xx < 10) & (yy < 6)) * 255]).clamp(0, 255).to(torch.uint8)
    data = ImageArrays(img.expand(1024, 3, 32, 32).contiguous(), torch.zeros(1024, dtype=torch.int64))
    b = load_data(DatasetConfig(source="synthetic", train_size=16, test_size=16))
    gap = {}
    for name, aug in (("basic", AugmentConfig()), ("cutout", AugmentConfig(cutout=16, cutout_per="sample")),
                      ("autoaugment", AugmentConfig(autoaugment="cifar10")),
                      ("constant", AugmentConfig(pad_mode="constant"))):
        dev = stats(make_train_loader(data, b, aug, 128, CPU, seed=0))
        wrk = stats(make_train_loader(data, b, aug, 128, CPU, seed=0, kind="workers", num_workers=0))
        torch.testing.assert_close(dev[0], wrk[0], atol=0.05, rtol=0)
        torch.testing.assert_close(dev[1], wrk[1], atol=0.05, rtol=0)
        assert abs(dev[2] - wrk[2]) < 0.01, name  # Cutout's zeroed fraction
        gap[name] = (dev[3] - wrk[3]).abs().mean()
        assert gap[name] < 0.05, (name, gap[name])
        if name == "basic":
            reflect = dev[3]
        if name == "constant":  # the comparison has teeth: the padding mode alone moves the mean image
            assert (dev[3] - reflect).abs().mean() > 0.1


def test_eval_loader_every_example_once_in_order_and_sharded(bundle):
    test = with_ids(bundle.test)
    loader = make_eval_loader(test, bundle, 100, CPU)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and [len(y) for _, y in batches] == [100, 100, 50]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(250))
    scale, shift = normalize_coeffs(bundle.mean, bundle.std)
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), test.images.float() * scale + shift)
    shards = [torch.cat([y for _, y in make_eval_loader(test, bundle, 64, CPU, rank=r, world_size=3)])
              for r in range(3)]
    assert torch.equal(torch.cat(shards), torch.arange(250)) and max(map(len, shards)) - min(map(len, shards)) <= 1


def test_loader_arguments_are_checked(bundle):
    with pytest.raises(DataError, match="batch_size"):
        make_train_loader(bundle.train, bundle, NONE, 600, CPU, seed=0, world_size=2)
    with pytest.raises(DataError, match="engine.loader"):
        make_train_loader(bundle.train, bundle, NONE, 64, CPU, seed=0, kind="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_loader_never_synchronizes_inside_an_epoch(bundle):
    loader = make_train_loader(bundle.train, bundle, FULL, 64, torch.device("cuda"), seed=0)
    it = iter(loader)
    next(it)  # the epoch start copies the AutoAugment draws to the host once
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in it:
            assert x.is_cuda and y.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode("default")

"""Batched augmentation vs torchvision's per-sample transforms, for the same random choices."""
import math

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import AutoAugment, AutoAugmentPolicy, _apply_op

from sam_repro.config import AugmentConfig
from sam_repro.data import DATASETS, BatchAugment, BatchedAutoAugment, DataError, EpochDraws, cutout_, normalize_coeffs
from sam_repro.data.autoaugment import NUM_BINS, OP_NAMES, OPS, POLICIES, magnitude

MEAN, STD = DATASETS["cifar10"].mean, DATASETS["cifar10"].std


def images(n: int, chans: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random uint8 images plus the corner cases of histogram ops: a constant and a low-contrast image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, chans, size, size), dtype=torch.uint8, generator=g)
    x[0] = 7
    x[1] = torch.randint(100, 110, (chans, size, size), dtype=torch.uint8, generator=g)
    return x


def reference_normalize(x: torch.Tensor) -> torch.Tensor:
    scale, shift = normalize_coeffs(MEAN, STD)
    return torch.addcmul(shift, x.float(), scale)


def no_draws(**kw) -> EpochDraws:
    return EpochDraws(**{**dict(dy=None, dx=None, flip=None, cut_y=None, cut_x=None, autoaugment=None), **kw})


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_flip_pad_crop_match_torchvision(pad_mode):
    p = 4
    x = images(2 * (2 * p + 1) ** 2)
    # every (dy, dx) offset once with each flip value
    dy, dx = torch.meshgrid(torch.arange(2 * p + 1), torch.arange(2 * p + 1), indexing="ij")
    dy, dx = dy.flatten().repeat(2), dx.flatten().repeat(2)
    flip = torch.arange(2).repeat_interleave((2 * p + 1) ** 2)
    aug = BatchAugment(AugmentConfig(padding=p, pad_mode=pad_mode), 32, MEAN, STD, "cpu")
    index = torch.randperm(len(x))
    out = aug(x, index, no_draws(dy=dy[None], dx=dx[None], flip=flip[None]), 0)
    ref = []
    for i, k in enumerate(index.tolist()):
        img = TF.hflip(x[k]) if flip[i] else x[k]  # the official order: flip, then pad + crop
        img = TF.pad(img, p, padding_mode=pad_mode)
        ref.append(TF.crop(img, int(dy[i]), int(dx[i]), 32, 32))
    torch.testing.assert_close(out, reference_normalize(torch.stack(ref)), rtol=0, atol=0)


def test_flip_only_and_no_augmentation():
    x = images(8)
    flip = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    aug = BatchAugment(AugmentConfig(crop=False), 32, MEAN, STD, "cpu")
    out = aug(x, torch.arange(8), no_draws(flip=flip[None]), 0)
    ref = torch.stack([TF.hflip(im) if f else im for im, f in zip(x, flip)])
    torch.testing.assert_close(out, reference_normalize(ref), rtol=0, atol=0)
    plain = BatchAugment(AugmentConfig(crop=False, flip=False), 32, MEAN, STD, "cpu")
    torch.testing.assert_close(plain(x, torch.arange(8), no_draws(), 0), reference_normalize(x), rtol=0, atol=0)


def test_normalization_matches_torchvision_normalize():
    x = images(4)
    aug = BatchAugment(AugmentConfig(crop=False, flip=False), 32, MEAN, STD, "cpu")
    ref = TF.normalize(x.float() / 255.0, MEAN, STD)
    torch.testing.assert_close(aug(x, torch.arange(4), no_draws(), 0), ref, rtol=1e-5, atol=1e-5)


def naive_cutout(x: torch.Tensor, cy: int, cx: int, size: int) -> torch.Tensor:
    out, h = x.clone(), size // 2
    out[:, max(0, cy - h):min(x.shape[-2], cy + h), max(0, cx - h):min(x.shape[-1], cx + h)] = 0.0
    return out


@pytest.mark.parametrize("size", [16, 15])
def test_cutout_matches_naive_mask(size):
    x = torch.randn(6, 3, 32, 32) + 5.0  # no zeros before cutout
    centres = [(0, 0), (31, 31), (15, 16), (0, 31), (7, 24), (31, 3)]
    cy, cx = torch.tensor([c[0] for c in centres]), torch.tensor([c[1] for c in centres])
    per_sample = cutout_(x.clone(), cy, cx, size)
    ref = torch.stack([naive_cutout(im, a, b, size) for im, (a, b) in zip(x, centres)])
    assert torch.equal(per_sample, ref)
    per_batch = cutout_(x.clone(), cy[2], cx[2], size)
    assert torch.equal(per_batch, torch.stack([naive_cutout(im, 15, 16, size) for im in x]))


@pytest.mark.parametrize("per", ["batch", "sample"])
def test_cutout_after_normalization_one_square_per_batch_or_sample(per):
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)  # normalizes to values far from 0
    aug = BatchAugment(AugmentConfig(crop=False, flip=False, cutout=16, cutout_per=per), 32, MEAN, STD, "cpu")
    d = aug.draw(torch.Generator().manual_seed(0), 1, 64)
    out = aug(x, torch.arange(64), d, 0)
    zero = out == 0.0
    assert torch.equal(zero.all(1), zero.any(1))  # all channels cut together, to exactly 0 (normalized space)
    masks = zero[:, 0].flatten(1)
    distinct = torch.unique(masks, dim=0)
    assert (len(distinct) == 1) == (per == "batch")
    if per == "sample":  # some of the 64 squares lie wholly inside, others are clipped at the borders
        assert masks.sum(1).max() == 256 and masks.sum(1).min() < 256


def op_bins(op: str):
    return [(b, neg) for b in range(NUM_BINS) for neg in ((False, True) if OPS[op][1] else (False,))]


@pytest.mark.parametrize("chans", [3, 1])
@pytest.mark.parametrize("op", OP_NAMES)
def test_each_autoaugment_op_matches_torchvision(op, chans):
    """Every op at every magnitude bin and sign equals torchvision's _apply_op pixel for pixel.

    Exact for geometric ops too: the per-(op, bin, sign) grids are built with torchvision's own
    float32 arithmetic, and nearest sampling of each sample does not depend on the batch.
    """
    aa = BatchedAutoAugment("cifar10", 32, "cpu")
    x = images(6, chans, seed=OP_NAMES.index(op))
    for b, neg in op_bins(op):
        out = aa.apply_op(x, op, torch.full((6,), b), torch.full((6,), neg))
        m = magnitude(op, b, neg, 32, 32)
        ref = torch.stack([_apply_op(im, op, m, InterpolationMode.NEAREST, None) for im in x])
        assert torch.equal(out, ref), f"{op} bin {b} negative={neg}: {(out != ref).sum()} pixels differ"


def test_magnitudes_and_policies_are_torchvisions():
    space = AutoAugment()._augmentation_space(NUM_BINS, (32, 32))
    for op in OP_NAMES:
        mags, signed = space[op]
        assert OPS[op][1] == signed
        for b in range(NUM_BINS):
            want = float(mags[b]) if mags.ndim else 0.0
            assert magnitude(op, b, False, 32, 32) == want
            assert magnitude(op, b, True, 32, 32) == (-want if signed else want)
    for name in POLICIES:
        tv = AutoAugment(AutoAugmentPolicy(name)).policies
        assert [tuple((o, p, b or 0) for o, p, b in sub) for sub in tv] == [tuple(s) for s in POLICIES[name]]


def test_plan_equals_per_sample_torchvision_with_the_same_choices():
    """The grouped, batched application = applying each sample's two ops in order with torchvision."""
    aa = BatchedAutoAugment("cifar10", 32, "cpu")
    g = torch.Generator().manual_seed(3)
    steps, batch = 2, 48
    pid = torch.randint(25, (steps, batch), generator=g)
    u = torch.rand(steps, batch, 2, generator=g) * 0.6  # fire most ops
    sign = torch.randint(2, (steps, batch, 2), generator=g)
    plan = aa.group(pid, u, sign)
    for step in range(steps):
        x = images(batch, seed=step)
        out = aa.apply_(x.clone(), plan, step)
        for i in range(batch):
            img = x[i]
            for slot, (op, p, b) in enumerate(POLICIES["cifar10"][pid[step, i]]):
                if u[step, i, slot] <= p:
                    img = _apply_op(img, op, magnitude(op, b, bool(sign[step, i, slot] == 0), 32, 32),
                                    InterpolationMode.NEAREST, None)
            assert torch.equal(out[i], img), (step, i)


def test_full_pipeline_order_autoaugment_flip_crop_normalize_cutout():
    """AutoAugment -> flip -> pad + crop -> normalize -> Cutout, against torchvision step by step."""
    aug = BatchAugment(AugmentConfig(autoaugment="cifar10", cutout=16, cutout_per="sample"), 32, MEAN, STD, "cpu")
    g = torch.Generator().manual_seed(5)
    b = 40
    pid, u = torch.randint(25, (1, b), generator=g), torch.rand(1, b, 2, generator=g)
    sign = torch.randint(2, (1, b, 2), generator=g)
    dy, dx, flip = (torch.randint(hi, (1, b), generator=g) for hi in (9, 9, 2))
    cy, cx = torch.randint(32, (1, b), generator=g), torch.randint(32, (1, b), generator=g)
    d = EpochDraws(dy, dx, flip, cy, cx, aug.aa.group(pid, u, sign))
    x = images(60)
    index = torch.randperm(60)[:b]
    out = aug(x, index, d, 0)
    for i, k in enumerate(index.tolist()):
        img = x[k]
        for slot, (op, p, m) in enumerate(POLICIES["cifar10"][pid[0, i]]):
            if u[0, i, slot] <= p:
                mag = magnitude(op, m, bool(sign[0, i, slot] == 0), 32, 32)
                img = _apply_op(img, op, mag, InterpolationMode.NEAREST, None)
        img = TF.hflip(img) if flip[0, i] else img
        img = TF.crop(TF.pad(img, 4, padding_mode="reflect"), int(dy[0, i]), int(dx[0, i]), 32, 32)
        want = naive_cutout(reference_normalize(img[None])[0], int(cy[0, i]), int(cx[0, i]), 16)
        assert torch.equal(out[i], want), i


def expand_plan(plan, aa):
    """(slot, op index, negative) of every applied op, read back from the plan's groups."""
    rows, at = [], 0
    for per_step in plan.counts:
        for slot in range(2):
            for n in per_step[slot]:
                for t in plan.table[at:at + n].tolist():
                    rows.append((slot, t // 2 // NUM_BINS, t % 2))
                at += n
    return torch.tensor(rows)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_sampled_policy_frequencies_match_probabilities(policy):
    aa = BatchedAutoAugment(policy, 32, "cpu")
    steps, batch = 20, 1000
    n = steps * batch
    applied = expand_plan(aa.plan(torch.Generator().manual_seed(1), steps, batch), aa)
    for slot in range(2):
        for code, op in enumerate(OP_NAMES):
            # expected count: each sub-policy is drawn with probability 1/25, then fires with its p
            p = sum(pr for sub in POLICIES[policy] for k, (o, pr, _) in enumerate(sub) if k == slot and o == op) / 25
            got = int(((applied[:, 0] == slot) & (applied[:, 1] == code)).sum())
            assert abs(got - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1, (slot, op, got, n * p)
    signed = torch.tensor([OPS[OP_NAMES[c]][1] for c in applied[:, 1].tolist()])
    neg = applied[signed, 2].double()
    assert abs(neg.mean() - 0.5) < 5 * 0.5 / math.sqrt(len(neg))
    assert not applied[~signed, 2].any()  # unsigned ops never take a sign


def test_bad_augment_values_raise_data_error():
    for bad in (dict(pad_mode="wrap"), dict(cutout_per="pixel"), dict(autoaugment="imagenet2"), dict(padding=32)):
        with pytest.raises(DataError, match="augment\\."):
            BatchAugment(AugmentConfig(**bad), 32, MEAN, STD, "cpu")


# -- resize (finetuning upsamples augmented 32 px batches to the model's input) -----------------
def reference_resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """The documented settings, written out: half-pixel centres (align_corners=False) for the smooth
    modes, antialiasing only when shrinking, plain nearest otherwise."""
    if mode == "nearest":
        return torch.nn.functional.interpolate(x, size=(size, size), mode="nearest")
    return torch.nn.functional.interpolate(x, size=(size, size), mode=mode, align_corners=False,
                                           antialias=size < x.shape[-1])


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [64, 45, 33, 24, 16])  # up and down, integer and fractional factors
def test_resize_matches_interpolate_with_the_documented_settings(mode, size):
    from sam_repro.data.augment import resize
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(size))
    out = resize(x, size, mode)
    assert out.shape == (3, 3, size, size)
    torch.testing.assert_close(out, reference_resize(x, size, mode), rtol=0, atol=1e-6)
    if mode != "nearest":  # the settings are not moot here: the other choices give other numbers
        corners = torch.nn.functional.interpolate(x, size=(size, size), mode=mode, align_corners=True)
        assert (out - corners).abs().max() > 1e-3
        if size < 32:
            plain = torch.nn.functional.interpolate(x, size=(size, size), mode=mode, align_corners=False)
            assert (out - plain).abs().max() > 1e-3


def test_resize_defaults_to_bilinear_and_returns_a_batch_of_the_right_size_itself():
    from sam_repro.data.augment import resize
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(resize(x, 48), reference_resize(x, 48, "bilinear"), rtol=0, atol=1e-6)
    torch.testing.assert_close(resize(x, 20), reference_resize(x, 20, "bilinear"), rtol=0, atol=1e-6)
    for mode in ("bilinear", "bicubic", "nearest"):
        assert resize(x, 32, mode) is x  # no copy, no resampling


# -- padding 0, the normalization's coefficients and dtype -------------------------------------
def test_padding_zero_is_accepted_and_means_crop_without_padding():
    x = images(4)
    aug = BatchAugment(AugmentConfig(padding=0, crop=True, flip=False), 32, MEAN, STD, "cpu")
    out = aug(x, torch.arange(4), aug.draw(torch.Generator().manual_seed(0), 1, 4), 0)
    torch.testing.assert_close(out, reference_normalize(x), rtol=0, atol=0)
    with pytest.raises(DataError, match="augment\\.padding"):
        BatchAugment(AugmentConfig(padding=-1), 32, MEAN, STD, "cpu")


def test_normalize_coeffs_are_the_float32_roundings_of_the_exact_values():
    """The coefficients are computed in float64 and rounded once: each is the float32 nearest to the
    exact 1 / (255 std) and -mean / std (Python floats are float64), [1, C, 1, 1], on the device asked."""
    for mean, std in ((MEAN, STD), (DATASETS["cifar100"].mean, DATASETS["cifar100"].std),
                      ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        scale, shift = normalize_coeffs(mean, std)
        assert scale.shape == shift.shape == (1, len(mean), 1, 1)
        assert scale.dtype == shift.dtype == torch.float32
        want_scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float64).float()
        want_shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float64).float()
        assert torch.equal(scale.flatten(), want_scale) and torch.equal(shift.flatten(), want_shift)
    scale, shift = normalize_coeffs(MEAN, STD, device="meta")
    assert scale.device.type == shift.device.type == "meta"


def test_normalize_returns_float32_whatever_the_input_dtype():
    from sam_repro.data.augment import normalize
    scale, shift = normalize_coeffs(MEAN, STD)
    x = images(2)
    for inp in (x, x.double()):
        out = normalize(inp, scale, shift)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, TF.normalize(x.double() / 255.0, MEAN, STD).float(), rtol=1e-6, atol=1e-6)

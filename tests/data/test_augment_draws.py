"""sam_repro.data.augment: the random draws of an epoch take every allowed value, uniformly.

Pad p then crop back to the image size allows 2p + 1 offsets per axis, [0, 2p] inclusive (the
official code: pad 4, random 32 x 32 crop of the 40 x 40 image). A sampler over [0, 2p) never
shifts the image right or down by the full p: the support is checked exactly, the frequencies
by a chi-square test (fixed seeds: deterministic).
"""
from __future__ import annotations

import pytest
import torch
from scipy import stats

from sam_repro.config import AugmentConfig
from sam_repro.data import DATASETS, BatchAugment

MEAN, STD = DATASETS["cifar10"].mean, DATASETS["cifar10"].std
STEPS, BATCH = 40, 256  # 10,240 draws per quantity


def draws(**augment):
    aug = BatchAugment(AugmentConfig(**augment), 32, MEAN, STD, "cpu")
    return aug, aug.draw(torch.Generator().manual_seed(0), STEPS, BATCH)


def assert_uniform_over(values: torch.Tensor, n: int) -> None:
    counts = torch.bincount(values.flatten(), minlength=n)
    assert len(counts) == n, f"values outside [0, {n}): max {int(values.max())}"
    assert (counts > 0).all(), counts  # the whole support, both ends included
    assert stats.chisquare(counts.numpy()).pvalue > 1e-4, counts


@pytest.mark.parametrize("padding", [1, 4])
def test_crop_offsets_cover_0_to_2p_inclusive_uniformly(padding: int) -> None:
    _, d = draws(padding=padding)
    assert d.dy.shape == d.dx.shape == (STEPS, BATCH)
    assert_uniform_over(d.dy, 2 * padding + 1)
    assert_uniform_over(d.dx, 2 * padding + 1)
    assert not torch.equal(d.dy, d.dx)  # independent axes


def test_flip_is_a_fair_coin_and_cutout_centres_cover_the_image() -> None:
    _, d = draws(cutout=16, cutout_per="sample")
    assert_uniform_over(d.flip, 2)
    assert d.cut_y.shape == (STEPS, BATCH)
    assert_uniform_over(d.cut_y, 32)
    assert_uniform_over(d.cut_x, 32)
    _, per_batch = draws(cutout=16, cutout_per="batch")
    assert per_batch.cut_y.shape == (STEPS,)


def test_the_largest_offset_shifts_the_image_by_the_full_padding() -> None:
    # Offset 2p crops the bottom-right of the padded image: output pixel (0, 0) is source (p, p).
    aug, d = draws(padding=4, flip=False, pad_mode="constant")
    d.dy[0, 0], d.dx[0, 0] = 8, 8
    src = (torch.arange(32 * 32) % 251 + 1).to(torch.uint8).view(1, 1, 32, 32).expand(1, 3, 32, 32)
    out = aug(src.contiguous(), torch.zeros(BATCH, dtype=torch.int64), d, 0)  # batch 0 of the epoch
    raw = ((out - aug.shift) / aug.scale).round()  # undo the normalization: back to uint8 values
    assert torch.equal(raw[0, :, :28, :28], src[0, :, 4:, 4:].float())
    assert (raw[0, :, 28:, :] == 0).all() and (raw[0, :, :, 28:] == 0).all()  # constant padding: zeros


def test_without_crop_flip_or_cutout_nothing_is_drawn() -> None:
    _, d = draws(crop=False, flip=False)
    assert (d.dy, d.dx, d.flip, d.cut_y, d.cut_x, d.autoaugment) == (None, None, None, None, None, None)

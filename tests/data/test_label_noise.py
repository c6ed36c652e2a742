"""sam_repro.data.noise: exactly how many labels symmetric noise draws anew, and from which classes.

A realized fraction of changed labels only bounds the count statistically (about 1/K of the new
labels equal the old ones). To count the redrawn labels EXACTLY, the tests give every example a
sentinel label (-1) that no redraw can produce: every redrawn example then shows, and only those.
"""
from __future__ import annotations

import pytest
import torch
from scipy import stats

from sam_repro.data.noise import apply_label_noise

SENTINEL = -1


def redrawn(n: int, num_classes: int, rate: float, seed: int = 0) -> torch.Tensor:
    """The new labels of the examples symmetric noise chose (sentinel input: all of them show)."""
    labels = torch.full((n,), SENTINEL, dtype=torch.int64)
    noisy, info = apply_label_noise(labels, num_classes, rate, "symmetric", seed=seed, dataset="cifar10")
    chosen = noisy != SENTINEL
    assert info["realized_fraction"] == chosen.double().mean().item()
    return noisy[chosen]


@pytest.mark.parametrize("n, rate", [(3600, 0.2), (3600, 0.8), (1001, 0.5), (50000, 0.6), (7, 0.3)])
def test_symmetric_noise_redraws_exactly_round_rate_times_n_labels(n: int, rate: float) -> None:
    assert len(redrawn(n, 10, rate)) == round(rate * n)


def test_the_redrawn_labels_are_uniform_over_all_classes_chi_square() -> None:
    # 40,000 draws over K = 10 classes: 4,000 expected per class. A sampler that never draws the
    # last class (or favours one) gives a chi-square in the thousands; a fair one ~ chi2(9).
    k = 10
    new = redrawn(50000, k, 0.8, seed=1)
    counts = torch.bincount(new, minlength=k).numpy()
    assert len(counts) == k and counts.min() > 0  # every class, the last one included, is drawn
    chi2, p = stats.chisquare(counts)
    assert p > 1e-4, (counts, chi2)  # a fixed seed: deterministic, and far from the 1e-4 edge


@pytest.mark.parametrize("k", [2, 3, 100])
def test_every_class_can_be_drawn_whatever_the_number_of_classes(k: int) -> None:
    new = redrawn(20000, k, 1.0, seed=2)
    assert set(new.tolist()) == set(range(k))


def test_which_examples_are_chosen_is_uniform_over_positions() -> None:
    # The chosen examples must not cluster (e.g. always the first ones): chi-square over 20 bins.
    n, rate = 40000, 0.3
    labels = torch.full((n,), SENTINEL, dtype=torch.int64)
    noisy, _ = apply_label_noise(labels, 10, rate, "symmetric", seed=3, dataset="cifar10")
    where = (noisy != SENTINEL).nonzero().flatten()
    counts = torch.bincount(where // (n // 20), minlength=20).numpy()
    assert stats.chisquare(counts).pvalue > 1e-4


def test_real_labels_change_in_about_rate_times_k_minus_1_over_k_and_only_the_chosen_ones() -> None:
    k, n, rate, seed = 10, 30000, 0.4, 5
    labels = torch.arange(k).repeat(n // k)
    noisy, info = apply_label_noise(labels, k, rate, "symmetric", seed=seed, dataset="cifar10")
    # The same seed chooses the same examples whatever the labels: the sentinel run names them.
    marked, _ = apply_label_noise(torch.full((n,), SENTINEL), k, rate, "symmetric", seed=seed, dataset="cifar10")
    chosen = marked != SENTINEL
    assert torch.equal(noisy[~chosen], labels[~chosen])  # untouched outside the chosen set
    assert torch.equal(noisy[chosen], marked[chosen])  # and the same draws inside it
    changed = int((noisy != labels).sum())
    # Binomial(round(rate n), (k-1)/k) changes; 5 sigma is about +-0.0045 of n here.
    m = round(rate * n)
    sigma = (m * (1 / k) * (1 - 1 / k)) ** 0.5
    assert abs(changed - m * (k - 1) / k) < 5 * sigma
    assert info["realized_fraction"] == changed / n


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_noise_depends_on_its_seed_only_not_on_the_global_torch_rng(kind: str) -> None:
    labels = torch.arange(10).repeat(100)
    torch.manual_seed(0)
    a, _ = apply_label_noise(labels, 10, 0.5, kind, seed=7, dataset="cifar10")
    torch.manual_seed(123)
    torch.rand(1000)
    b, _ = apply_label_noise(labels, 10, 0.5, kind, seed=7, dataset="cifar10")
    assert torch.equal(a, b)
    c, _ = apply_label_noise(labels, 10, 0.5, kind, seed=8, dataset="cifar10")
    assert not torch.equal(a, c)  # and the seed does choose


def test_a_registered_noise_kind_is_what_apply_label_noise_uses() -> None:
    from sam_repro.data.noise import NOISE_KINDS, register_noise

    @register_noise("test_all_zero")
    def zero(labels, num_classes, rate, g, dataset):
        return torch.zeros_like(labels)

    try:
        noisy, info = apply_label_noise(torch.arange(1, 5), 5, 0.5, "test_all_zero", seed=0, dataset="x")
        assert noisy.tolist() == [0, 0, 0, 0] and info["realized_fraction"] == 1.0
    finally:
        NOISE_KINDS.pop("test_all_zero")


def test_rate_zero_returns_the_labels_untouched() -> None:
    labels = torch.arange(10)
    noisy, info = apply_label_noise(labels, 10, 0.0, "symmetric", seed=0, dataset="cifar10")
    assert torch.equal(noisy, labels) and info == {"kind": "symmetric", "rate": 0.0, "seed": 0, "realized_fraction": 0.0}


def test_an_empty_label_set_reports_a_realized_fraction_of_zero_not_nan() -> None:
    noisy, info = apply_label_noise(torch.zeros(0, dtype=torch.int64), 10, 0.5, "symmetric", seed=0, dataset="x")
    assert len(noisy) == 0 and info["realized_fraction"] == 0.0  # metrics.json refuses NaN

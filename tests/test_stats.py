"""The SI analysis statistics against brute force and textbook cases."""
import itertools

import numpy as np
import pytest

from common.reporting.stats import auroc, bootstrap_mean_ci, mann_whitney_p


def brute_force_auroc(pos, neg):
    pairs = list(itertools.product(pos, neg))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_pair_counting_with_ties(seed):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 6, size=17).astype(float)  # small integers: many ties
    neg = rng.integers(0, 5, size=11).astype(float)
    assert auroc(pos, neg) == pytest.approx(brute_force_auroc(pos, neg))


def test_auroc_extremes():
    assert auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auroc([0, 1], [2, 3]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.normal(5.0, 1.0, size=50)
    large = rng.normal(5.0, 1.0, size=5000)
    lo_s, hi_s = bootstrap_mean_ci(small, seed=1)
    lo_l, hi_l = bootstrap_mean_ci(large, seed=1)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5
    # the normal-theory 95% half-width is 1.96 sigma / sqrt(n)
    assert (hi_l - lo_l) / 2 == pytest.approx(1.96 / np.sqrt(5000), rel=0.15)


def test_mann_whitney_small_exact_case():
    # fully separated samples of sizes 3 and 3: exact two-sided p = 2 / C(6, 3) = 0.1
    assert mann_whitney_p([4, 5, 6], [1, 2, 3]) == pytest.approx(0.1)
    assert mann_whitney_p([], [1.0]) != mann_whitney_p([], [1.0])  # NaN when a side is empty

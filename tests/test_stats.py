"""The statistics against brute force, closed forms and textbook cases."""
import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from common.reporting.stats import (auroc, bootstrap_mean_ci, holm_adjust, mann_whitney_p, paired_difference,
                                    verdict)


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


def test_paired_difference_matches_the_closed_forms_of_student_t_with_two_degrees_of_freedom():
    # d = a - b = 1, 2, 3: mean 2, sample std 1, se 1/sqrt(3), t = 2 sqrt(3). With df = 2 the t CDF is
    # 1/2 + t / (2 sqrt(t^2 + 2)), so the two-sided p is 1 - t / sqrt(t^2 + 2), and the q-quantile is
    # (2q - 1) / sqrt(2 q (1 - q)).
    out = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    t = 2 * math.sqrt(3)
    quantile = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert out["n"] == 3 and out["mean"] == pytest.approx(2.0) and out["std"] == pytest.approx(1.0)
    assert out["se"] == pytest.approx(1 / math.sqrt(3))
    assert out["t_p"] == pytest.approx(1 - t / math.sqrt(t ** 2 + 2))
    assert out["ci_low"] == pytest.approx(2 - quantile / math.sqrt(3))
    assert out["ci_high"] == pytest.approx(2 + quantile / math.sqrt(3))


@pytest.mark.parametrize("seed", range(4))
def test_paired_difference_agrees_with_scipy_and_brute_force_rank_tests(seed):
    rng = np.random.default_rng(seed)
    n = 5 + seed
    a = rng.normal(0.3, 1.0, size=n)
    b = rng.normal(0.0, 1.0, size=n)
    out = paired_difference(a, b, level=0.9)
    assert out["t_p"] == pytest.approx(sps.ttest_rel(a, b).pvalue)
    low, high = sps.ttest_rel(a, b).confidence_interval(0.9)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((low, high))
    d = a - b
    # every sign pattern is equally likely under the null: count those at least as extreme as the observed
    patterns = np.array(list(itertools.product([1, -1], repeat=n)))
    positives = (patterns > 0).sum(axis=1)
    k = (d > 0).sum()
    assert out["sign_p"] == pytest.approx(np.mean(np.abs(positives - n / 2) >= abs(k - n / 2)))
    ranks = sps.rankdata(np.abs(d))  # continuous data: no ties, so the exact null distribution applies
    w_plus = (patterns > 0) @ ranks
    w = ranks[d > 0].sum()
    assert out["wilcoxon_p"] == pytest.approx(min(1.0, 2 * min(np.mean(w_plus <= w), np.mean(w_plus >= w))))


def test_with_three_seeds_the_rank_tests_cannot_go_below_one_quarter():
    out = paired_difference([5.0, 6.0, 7.0], [1.0, 1.5, 2.2])  # every difference large and of one sign
    assert out["sign_p"] == pytest.approx(0.25)
    assert out["wilcoxon_p"] == pytest.approx(0.25)
    assert out["t_p"] < 0.05  # the t-test can, which is why it is the primary test


def test_sign_test_drops_ties():
    # differences +1, +2, 0, +3: the zero is dropped, leaving 3 of 3 positive: p = 2 / 2^3
    assert paired_difference([2.0, 3.0, 1.0, 4.0], [1.0, 1.0, 1.0, 1.0])["sign_p"] == pytest.approx(0.25)
    none = paired_difference([1.0, 2.0], [1.0, 2.0])
    assert math.isnan(none["sign_p"]) and math.isnan(none["wilcoxon_p"]) and math.isnan(none["t_p"])


def test_interval_and_t_test_agree_on_whether_zero_is_plausible():
    rng = np.random.default_rng(7)
    for _ in range(50):
        a, b = rng.normal(0.5, 1.0, size=4), rng.normal(0.0, 1.0, size=4)
        out = paired_difference(a, b, level=0.95)
        assert (out["t_p"] < 0.05) == (out["ci_low"] > 0 or out["ci_high"] < 0)


def test_one_seed_has_a_difference_but_no_interval_and_no_t_test():
    out = paired_difference([3.0], [1.0])
    assert out["n"] == 1 and out["mean"] == 2.0
    assert all(math.isnan(out[k]) for k in ("std", "se", "ci_low", "ci_high", "t_p"))
    assert out["sign_p"] == pytest.approx(1.0)  # one positive of one: as likely as not


def test_paired_difference_refuses_nans_and_unpaired_inputs():
    with pytest.raises(ValueError, match="NaN"):
        paired_difference([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="equal length"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="level"):
        paired_difference([1.0, 2.0], [0.0, 0.0], level=95)


def test_holm_on_a_hand_computed_family():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> raised to 0.06 (monotone)
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_holm_passes_nans_through_and_leaves_them_out_of_the_family():
    out = holm_adjust([0.01, float("nan"), 0.02])
    assert math.isnan(out[1])
    assert out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02)  # m = 2, not 3
    assert all(math.isnan(p) for p in holm_adjust([float("nan")]))
    assert holm_adjust([]) == []


def holm_rejects(pvalues, alpha):
    """Holm's procedure as stated: walk the p-values up from the smallest, rejecting while p_(j) <= alpha /
    (m - j + 1), and stop at the first that fails (compared as (m - j + 1) p_(j) <= alpha, so that an alpha
    computed as that product is met exactly, not lost to rounding in the division)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected = set()
    for j, i in enumerate(order):
        if (len(pvalues) - j) * pvalues[i] > alpha:
            break
        rejected.add(i)
    return rejected


@pytest.mark.parametrize("seed", range(5))
def test_holm_adjusted_p_is_the_smallest_alpha_at_which_the_procedure_rejects(seed):
    rng = np.random.default_rng(seed)
    pvalues = list(rng.uniform(0, 0.3, size=6) ** 2)
    adjusted = holm_adjust(pvalues)
    # the procedure changes its decisions only at the thresholds (m - j + 1) p_(j); try each, and 1
    candidates = sorted({min(1.0, k * p) for p in pvalues for k in range(1, 7)} | {1.0})
    for i, p_adj in enumerate(adjusted):
        smallest = min((alpha for alpha in candidates if i in holm_rejects(pvalues, alpha)), default=1.0)
        assert p_adj == pytest.approx(smallest)


def test_verdict_wording():
    difference = {"n": 3, "mean": 0.012, "ci_low": 0.004, "ci_high": 0.020, "level": 0.95, "t_p": 0.004}
    assert verdict(0.012, difference) == ("a − b = +0.012 (95% CI +0.004 to +0.020), paired t p = 0.004, "
                                          "Holm p = 0.012: distinguishable")
    assert verdict(0.12, difference, a="presence", b="baseline") == (
        "presence − baseline = +0.012 (95% CI +0.004 to +0.020), paired t p = 0.004, Holm p = 0.120: "
        "not distinguishable at 3 seeds")
    assert verdict(0.05, difference).endswith("not distinguishable at 3 seeds")  # alpha itself is not below alpha
    single = {"n": 1, "mean": -0.5, "ci_low": float("nan"), "ci_high": float("nan"), "level": 0.95,
              "t_p": float("nan")}
    assert verdict(float("nan"), single) == ("a − b = -0.500 (no interval with 1 seed), paired t p = –, "
                                             "Holm p = –: not distinguishable at 1 seed")

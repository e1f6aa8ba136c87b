"""Statistics for the self-influence analysis: bootstrap confidence intervals, the Mann-Whitney U
test and the AUROC of a score as a detector (the probability that a random positive outranks a
random negative, ties counting one half). For method comparisons over seeds: the paired difference
with its interval and tests, Holm's adjustment for a family of comparisons, and their wording."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps


def bootstrap_mean_ci(values, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_resamples, values.size))
    means = values[idx].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def auroc(positive_scores, negative_scores) -> float:
    """Area under the ROC curve of `score` separating positives from negatives, from ranks
    (AUROC = U / (n_pos * n_neg) with midranks for ties)."""
    pos = np.asarray(positive_scores, dtype=float)
    neg = np.asarray(negative_scores, dtype=float)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    ranks = sps.rankdata(np.concatenate([pos, neg]))
    u_pos = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u_pos / (pos.size * neg.size))


def mann_whitney_p(x, y) -> float:
    """Two-sided Mann-Whitney U test p-value (normal approximation with tie correction for large samples)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size == 0 or y.size == 0:
        return float("nan")
    return float(sps.mannwhitneyu(x, y, alternative="two-sided").pvalue)


def paired_difference(a, b, level: float = 0.95) -> dict:
    """a − b for two methods' per-seed values paired by seed (a[i] and b[i] share a seed).

    Returns n, mean (of the differences), std (their sample std), se (std / sqrt(n)), ci_low and ci_high
    (the two-sided Student-t interval at `level`, df = n − 1; NaN for n < 2), level, t_p (paired t-test,
    two-sided), sign_p (exact two-sided binomial sign test, ties dropped) and wilcoxon_p (scipy's signed-rank
    test, zeros dropped; NaN with no non-zero difference).

    The paired t-test is the primary test. With the few seeds we can afford, the rank tests cannot reach
    small p-values whatever the data: with n = 3 the smallest two-sided p of the sign test and of the
    Wilcoxon test is 0.25 (all three differences of one sign: 2 / 2³). They are reported as
    distribution-free checks of the t-test's normality assumption, not as the decision.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be paired values of equal length (got shapes {a.shape} and {b.shape})")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("a or b contains NaN: a seed without a value cannot be paired. Fix: leave that seed "
                         "out of both")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    d = a - b
    n = int(d.size)
    nan = float("nan")
    out = {"n": n, "mean": float(d.mean()) if n else nan, "std": nan, "se": nan, "ci_low": nan, "ci_high": nan,
           "level": level, "t_p": nan, "sign_p": nan, "wilcoxon_p": nan}
    if n >= 2:
        std = float(d.std(ddof=1))
        se = std / math.sqrt(n)
        half = float(sps.t.ppf((1 + level) / 2, n - 1)) * se
        out.update(std=std, se=se, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
        if se > 0:
            out["t_p"] = float(2 * sps.t.sf(abs(out["mean"]) / se, n - 1))
        elif out["mean"] != 0:  # every seed moved by exactly the same amount: no spread to test against
            out["t_p"] = 0.0
    nonzero = d[d != 0]
    if nonzero.size:
        out["sign_p"] = float(sps.binomtest(int((nonzero > 0).sum()), int(nonzero.size), 0.5).pvalue)
        out["wilcoxon_p"] = float(sps.wilcoxon(nonzero).pvalue)
    return out


def holm_adjust(pvalues) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values, in the input order: with the m p-values sorted,
    p_(1) ≤ … ≤ p_(m), the adjusted p_(i) is max over j ≤ i of min(1, (m − j + 1) p_(j)). Rejecting where
    the adjusted p < alpha controls the family-wise error rate at alpha. NaNs (comparisons without a p)
    stay NaN and do not count in m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    if present.size == 0:
        return out.tolist()
    if ((p[present] < 0) | (p[present] > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p[present].tolist()}")
    order = present[np.argsort(p[present], kind="stable")]
    m = order.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out.tolist()


def format_p(p: float) -> str:
    """A p-value as tables print it: three decimals, '< 0.001' below that, '–' when there is none."""
    return "–" if math.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def outcome(adjusted_p: float, n: int, alpha: float = 0.05) -> str:
    """'distinguishable' where the adjusted p is below alpha, else 'not distinguishable at n seeds'."""
    if not math.isnan(adjusted_p) and adjusted_p < alpha:
        return "distinguishable"
    return f"not distinguishable at {n} seed{'' if n == 1 else 's'}"


def verdict(adjusted_p: float, difference: dict, alpha: float = 0.05, a: str = "a", b: str = "b") -> str:
    """One line: the difference with its interval, the paired t p, the Holm p and whether the two methods are
    distinguishable (Holm p < alpha). `difference` is paired_difference's result."""
    n = difference["n"]
    if n >= 2:
        interval = f"{difference['level']:.0%} CI {difference['ci_low']:+.3f} to {difference['ci_high']:+.3f}"
    else:
        interval = f"no interval with {n} seed{'' if n == 1 else 's'}"
    mean = "–" if math.isnan(difference["mean"]) else f"{difference['mean']:+.3f}"
    return (f"{a} − {b} = {mean} ({interval}), paired t p = {format_p(difference['t_p'])}, "
            f"Holm p = {format_p(adjusted_p)}: {outcome(adjusted_p, n, alpha)}")

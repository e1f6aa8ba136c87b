"""Statistics for the self-influence analysis: bootstrap confidence intervals, the Mann-Whitney U
test and the AUROC of a score as a detector (the probability that a random positive outranks a
random negative, ties counting one half)."""
from __future__ import annotations

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

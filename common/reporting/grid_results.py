"""What a grid of runs (common/grids.py; 03_pretrain/run_grid.py writes its runs.csv) shows: per cell and
comparison the paired difference over seeds, Holm-adjusted over the whole grid; and, for an axis such as
the microbatch size, a trend in log2 of the axis fitted to the cells' differences and extrapolated to a
value the grid could not afford (the paper's microbatch of 128 sequences).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.stats as sps

from common.reporting.markdown import markdown_table
from common.reporting.stats import format_p, holm_adjust, outcome, paired_difference

DIFFERENCE_COLUMNS = ["a", "b", "n_pairs", "seeds", "delta", "se", "ci_low", "ci_high", "t_p", "holm_p",
                      "distinguishable", "kish_a_stage2", "kish_b_stage2", "heldout_se"]
TREND_COLUMNS = ["a", "b", "cells", "slope_per_doubling", "slope_se", "at", "predicted", "predicted_se", "ci_low",
                 "ci_high", "chi2", "df", "lack_of_fit_p", "inflation"]


def grid_differences(runs: pd.DataFrame, axes: list[str], comparisons: list[tuple[str, str]],
                     alpha: float = 0.05) -> pd.DataFrame:
    """One row per (cell, comparison a − b): the cell's axis values, the seeds both recipes ran there, the
    mean paired difference of the final held-out loss with its standard error and 95% Student-t interval, the
    paired t p and the Holm p over every row of the grid; the mean Kish count of each recipe in the second
    stage, and the mean evaluation standard error of the runs (the held-out set's own noise)."""
    rows = []
    for cell, group in runs.groupby(axes, sort=True):
        cell = cell if isinstance(cell, tuple) else (cell,)
        by_recipe = {r: g.set_index("seed") for r, g in group.groupby("recipe")}
        for a, b in comparisons:
            if a not in by_recipe or b not in by_recipe:
                continue
            seeds = sorted(set(by_recipe[a].index) & set(by_recipe[b].index))
            if not seeds:
                continue
            ra, rb = by_recipe[a].loc[seeds], by_recipe[b].loc[seeds]
            d = paired_difference(ra["final_heldout_loss"].to_numpy(), rb["final_heldout_loss"].to_numpy())
            rows.append({**dict(zip(axes, cell)), "a": a, "b": b, "n_pairs": len(seeds),
                         "seeds": ",".join(map(str, seeds)), "delta": d["mean"], "se": d["se"],
                         "ci_low": d["ci_low"], "ci_high": d["ci_high"], "t_p": d["t_p"],
                         "kish_a_stage2": ra["kish_n_stage2"].mean(), "kish_b_stage2": rb["kish_n_stage2"].mean(),
                         "heldout_se": pd.concat([ra["final_heldout_se"], rb["final_heldout_se"]]).mean()})
    table = pd.DataFrame(rows, columns=axes + [c for c in DIFFERENCE_COLUMNS if c not in ("holm_p", "distinguishable")])
    table["holm_p"] = holm_adjust(table["t_p"].tolist())
    table["distinguishable"] = table["holm_p"] < alpha
    return table[axes + DIFFERENCE_COLUMNS]


def log_trend(x, delta, se, at: float, level: float = 0.95) -> dict:
    """delta = c + s * log2(x) fitted by weighted least squares (weights 1 / se^2, the cells' own seed noise),
    and its value at x = `at`. The parameters' covariance is (X'WX)^-1, inflated by chi2 / df when the cells
    scatter about the line more than their errors allow (chi2 > df; the lack-of-fit test's p is returned);
    the interval is normal at `level`. It rests on the trend being linear in log2 x up to `at`: with few
    cells that is an assumption, not a finding."""
    x, y, se = (np.asarray(v, dtype=float) for v in (x, delta, se))
    keep = np.isfinite(y) & np.isfinite(se) & (se > 0) & (x > 0)
    x, y, se = x[keep], y[keep], se[keep]
    if len(x) < 2 or len(set(x)) < 2:
        raise ValueError(f"a trend needs cells at two or more values with a standard error; got {len(x)}")
    design = np.column_stack([np.ones_like(x), np.log2(x)])
    weights = 1 / se ** 2
    # least squares on the rows scaled by 1 / se (through the SVD: errors that differ by orders of
    # magnitude leave the normal equations ill-conditioned); cov = (X'WX)^-1 = pinv(A) pinv(A)'
    scaled = design / se[:, None]
    beta = np.linalg.lstsq(scaled, y / se, rcond=None)[0]
    inverse = np.linalg.pinv(scaled)
    cov = inverse @ inverse.T
    residual = y - design @ beta
    chi2, df = float(np.sum(weights * residual ** 2)), len(x) - 2
    inflation = max(1.0, chi2 / df) if df > 0 else 1.0
    cov = cov * inflation
    point = np.array([1.0, math.log2(at)])
    predicted, predicted_se = float(point @ beta), float(math.sqrt(point @ cov @ point))
    half = float(sps.norm.ppf((1 + level) / 2)) * predicted_se
    return {"cells": len(x), "slope_per_doubling": float(beta[1]), "slope_se": float(math.sqrt(cov[1, 1])),
            "at": at, "predicted": predicted, "predicted_se": predicted_se, "ci_low": predicted - half,
            "ci_high": predicted + half, "chi2": chi2, "df": df,
            "lack_of_fit_p": float(sps.chi2.sf(chi2, df)) if df > 0 else float("nan"), "inflation": inflation}


def extrapolate(differences: pd.DataFrame, axis: str, at: float) -> pd.DataFrame:
    """log_trend of every comparison of a one-axis grid, extrapolated to `at`; comparisons with fewer than
    two cells that have an interval are left out."""
    rows = []
    for (a, b), group in differences.groupby(["a", "b"], sort=False):
        usable = group[group["se"].notna() & (group["se"] > 0)]
        if usable[axis].nunique() < 2:
            continue
        rows.append({"a": a, "b": b, **log_trend(usable[axis], usable["delta"], usable["se"], at)})
    return pd.DataFrame(rows, columns=TREND_COLUMNS)


def _signed(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:+.3f}"


def differences_markdown(differences: pd.DataFrame, axes: list[str]) -> str:
    """The grid's differences as a pipe table, a row per cell and comparison."""
    header = axes + ["a − b", "seeds", "Δ (95% CI)", "paired t p", "Holm p", "Kish a / b (stage 2)", "eval. se",
                     "verdict"]
    rows = []
    for row in differences.itertuples():
        interval = f" ({_signed(row.ci_low)} to {_signed(row.ci_high)})" if row.n_pairs >= 2 else ""
        rows.append([f"{getattr(row, a):g}" for a in axes] + [
            f"{row.a} − {row.b}", str(row.n_pairs), _signed(row.delta) + interval, format_p(row.t_p),
            format_p(row.holm_p), f"{row.kish_a_stage2:.1f} / {row.kish_b_stage2:.1f}",
            "–" if pd.isna(row.heldout_se) else f"{row.heldout_se:.3f}", outcome(row.holm_p, row.n_pairs)])
    return markdown_table(header, rows) + "\n"


def trend_sentences(trends: pd.DataFrame, axis: str, claim: tuple[str, str]) -> list[str]:
    """One sentence per extrapolated comparison, and what the trend of `claim` (a − b, the paper's: a below b)
    predicts at the extrapolated value."""
    lines = []
    for row in trends.itertuples():
        p = format_p(row.lack_of_fit_p)
        lack = (f"lack of fit p {p if p.startswith('<') else '= ' + p}" + (f", errors inflated {row.inflation:.1f}x"
                if row.inflation > 1 else "")) if row.df > 0 else "two cells: no check of the line"
        lines.append(f"- {row.a} − {row.b}: {row.slope_per_doubling:+.4f} per doubling of {axis} "
                     f"(± {row.slope_se:.4f}); at {row.at:g}: {row.predicted:+.3f} (95% CI {row.ci_low:+.3f} to "
                     f"{row.ci_high:+.3f}), from {row.cells} cells ({lack}).")
    match = trends[(trends["a"] == claim[0]) & (trends["b"] == claim[1])]
    if not match.empty:
        row = match.iloc[0]
        if row["ci_high"] < 0:
            verdict = f"predicts {claim[0]} below {claim[1]} there: the paper's direction"
        elif row["ci_low"] > 0:
            verdict = f"predicts {claim[0]} above {claim[1]} there: against the paper's claim"
        else:
            verdict = "cannot tell the sign there: its interval spans 0"
        lines.append(f"- The trend of {claim[0]} − {claim[1]} {verdict} (if the trend holds; a run at the "
                     f"`small` or `paper` preset checks it).")
    return lines

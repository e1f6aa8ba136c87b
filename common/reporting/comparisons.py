"""Method comparisons over seeds, as every claim of this repository that one recipe beats another must be
made: each comparison pairs the two recipes seed by seed, gives the mean difference with its Student-t
interval and the paired t-test (the sign test beside it), and the comparisons of one family are adjusted
together (Holm–Bonferroni), so that a difference is called distinguishable only when it survives that.

`compare_recipes` takes tidy per-run results (recipe, seed, value; lower is better) and a family of
(a, b) pairs; `comparisons_markdown` renders its rows; `heldout_family` forms the recipes and the family
of a preset's pre-training runs (every method against the baseline, each method against its controls,
PRESENCE against the other score sources); `answer_markdown` picks, across presets, the rows that answer
whether self-influence carries information beyond the loss and whether any score beats the baseline.
"""
from __future__ import annotations

import math

import pandas as pd

from common.presence.methods import (BASELINE, BEYOND, BEYOND_CONTROL, BY_NAME, CONTROL, LOSS_CONTROL, LOSS_SCORE,
                                     MATCHED, NAMES, PEER, PRESENCE, SELF_INFLUENCE, controls_of)
from common.reporting.markdown import markdown_table
from common.reporting.run_results import method_and_tau, recipe_name
from common.reporting.stats import format_p, holm_adjust, outcome, paired_difference

COLUMNS = ["a", "b", "n_pairs", "seeds", "mean_a", "mean_b", "delta", "ci_low", "ci_high", "t_p", "sign_p",
           "holm_p", "distinguishable"]


def compare_recipes(results: pd.DataFrame, comparisons: list[tuple[str, str]], level: float = 0.95,
                    alpha: float = 0.05) -> pd.DataFrame:
    """One row per comparison (a, b) of the family, in its order: the seeds both recipes have (n_pairs,
    seeds), their means over those seeds, delta = mean of a − b with its interval at `level`, the paired
    t p, the sign-test p, the Holm p over the family and whether it is below `alpha`. `results` has one
    row per run: recipe, seed, value."""
    missing = [c for c in ("recipe", "seed", "value") if c not in results.columns]
    if missing:
        raise ValueError(f"results lack the columns {missing}")
    if results["value"].isna().any():
        bad = results[results["value"].isna()][["recipe", "seed"]].to_dict("records")
        raise ValueError(f"runs without a value cannot be compared: {bad}. Fix: leave them out")
    duplicated = results[results.duplicated(["recipe", "seed"], keep=False)]
    if not duplicated.empty:
        raise ValueError(f"more than one run per recipe and seed: {duplicated[['recipe', 'seed']].to_dict('records')}")
    absent = sorted({r for pair in comparisons for r in pair} - set(results["recipe"]))
    if absent:
        raise ValueError(f"no runs of the recipes {absent}")
    by_recipe = {recipe: group.set_index("seed")["value"] for recipe, group in results.groupby("recipe")}
    rows = []
    for a, b in comparisons:
        seeds = sorted(set(by_recipe[a].index) & set(by_recipe[b].index))
        values_a, values_b = by_recipe[a].loc[seeds].to_numpy(), by_recipe[b].loc[seeds].to_numpy()
        difference = paired_difference(values_a, values_b, level)
        nan = float("nan")
        rows.append({"a": a, "b": b, "n_pairs": len(seeds), "seeds": ",".join(str(s) for s in seeds),
                     "mean_a": values_a.mean() if seeds else nan, "mean_b": values_b.mean() if seeds else nan,
                     "delta": difference["mean"], "ci_low": difference["ci_low"], "ci_high": difference["ci_high"],
                     "t_p": difference["t_p"], "sign_p": difference["sign_p"]})
    table = pd.DataFrame(rows, columns=COLUMNS[:-2])
    table["holm_p"] = holm_adjust(table["t_p"].tolist())
    table["distinguishable"] = table["holm_p"] < alpha  # NaN (no t-test) compares False
    return table


def _number(value: float, digits: int, sign: bool = False) -> str:
    return "–" if pd.isna(value) else f"{value:{'+' if sign else ''}.{digits}f}"


def comparisons_markdown(table: pd.DataFrame, level: float = 0.95, alpha: float = 0.05, digits: int = 3) -> str:
    """compare_recipes' rows as a pipe table, then what its columns mean and what cannot be concluded."""
    rows = []
    for row in table.itertuples():
        n = row.n_pairs
        interval = (f" ({_number(row.ci_low, digits, True)} to {_number(row.ci_high, digits, True)})" if n >= 2
                    else "")
        rows.append([f"{row.a} − {row.b}", f"{n} ({row.seeds})" if n else "0", _number(row.mean_a, digits),
                     _number(row.mean_b, digits), _number(row.delta, digits, True) + interval, format_p(row.t_p),
                     format_p(row.sign_p), format_p(row.holm_p), outcome(row.holm_p, n, alpha)])
    header = ["a − b", "seeds paired", "mean a", "mean b", f"Δ ({level:.0%} CI)", "paired t p", "sign p", "Holm p",
              "verdict"]
    most = int(table["n_pairs"].max()) if len(table) else 0
    family = int(table["t_p"].notna().sum())
    text = [markdown_table(header, rows), "",
            f"Δ: the mean over the seeds both recipes ran of a − b (below 0: a is lower); the interval is Student-t "
            f"at {level:.0%} (df = seeds − 1). The paired t-test decides; Holm p adjusts it over the {family} "
            f"comparisons of this table (Holm–Bonferroni), and a difference is distinguishable where Holm p < "
            f"{alpha:g}. The interval is not adjusted. The exact sign test is a check that assumes no normality, "
            f"but with {most} seeds its p cannot fall below {2.0 ** (1 - most):.3g} (every seed of one sign)."
            if most >= 1 else "No comparison had a seed in common."]
    return "\n".join(text) + "\n"


def heldout_family(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(results, comparisons) of a preset's finished pre-training runs (run_results.load_pretrain_runs) for
    compare_recipes: value the final held-out loss; recipe the method (with its --tau), per-sample when so,
    and the noise rate of its training data; runs that changed any other default knob are left out. The
    family, at each noise rate: every recipe against the baseline, then each recipe with information
    controls against each of them at the same granularity, then PRESENCE against each recipe that scores
    by something else than self-influence (the loss, SI beyond the loss, the loss-reweighting peer)."""
    runs = runs[runs["default_knobs"].astype(bool) & runs["final_heldout_loss"].notna()]
    runs = runs.assign(noise_rate=runs["noise_rate"].fillna(0.0).astype(float))

    def recipe(method: str, per: str, tau, rate: float) -> str:
        name = recipe_name(method_and_tau(method, tau), per)
        return name if rate == 0 else f"{name} at noise {rate:g}"

    order = lambda m: NAMES.index(m) if m in NAMES else len(NAMES)  # noqa: E731  (the table of methods' order)
    kinds = runs[["method", "per", "tau", "noise_rate"]].drop_duplicates()
    kinds = kinds.assign(order=kinds["method"].map(order), per_order=kinds["per"] != "microbatch")
    kinds = kinds.sort_values(["noise_rate", "order", "per_order", "tau"])
    results = pd.DataFrame({"recipe": [recipe(m, p, t, r) for m, p, t, r in
                                       zip(runs["method"], runs["per"], runs["tau"], runs["noise_rate"])],
                            "seed": runs["seed"].astype(int), "value": runs["final_heldout_loss"].astype(float)})
    present = set(results["recipe"])
    comparisons = []
    for rate, group in kinds.groupby("noise_rate", sort=True):
        baseline = recipe(BASELINE.name, "microbatch", None, rate)
        names = [(k.method, k.per, recipe(k.method, k.per, k.tau, rate)) for k in group.itertuples()]
        comparisons += [(name, baseline) for method, _, name in names
                        if method != BASELINE.name and baseline in present]
        for method, per, name in names:
            controls = [recipe(control.name, per, None, rate) for control in controls_of(method)]
            comparisons += [(name, control) for control in controls if control in present]
        for method, per, name in names:
            record = BY_NAME.get(method)
            presence = recipe(PRESENCE.name, per, None, rate)
            if record and record.scores not in (None, SELF_INFLUENCE) and record.control is None and presence in present:
                comparisons.append((presence, name))
    return results, comparisons


# The questions the front page answers, each a comparison of the comparisons tables (a, b), per granularity.
ANSWER_ROWS = [(question, a.name, b.name) for question, a, b in (
    ("does PRESENCE beat the baseline?", PRESENCE, BASELINE),
    ("does SI carry information? (the shuffled control)", PRESENCE, CONTROL),
    ("... (the weight-matched control)", PRESENCE, MATCHED),
    ("does the loss carry information?", LOSS_SCORE, LOSS_CONTROL),
    ("does SI carry information beyond the loss?", BEYOND, BEYOND_CONTROL),
    ("SI against the loss as the score", PRESENCE, LOSS_SCORE),
    ("does the loss score beat the baseline?", LOSS_SCORE, BASELINE),
    ("does the published loss peer beat the baseline?", PEER, BASELINE),
    ("PRESENCE against the loss peer", PRESENCE, PEER))]


def answer_markdown(tables: dict[str, pd.DataFrame], alpha: float = 0.05) -> str:
    """One table across presets ({label: its comparisons table}): for each question of ANSWER_ROWS and
    granularity, the comparison's Δ with its interval, seeds and Holm p (adjusted within its preset's
    family), and whether it is distinguishable; a comparison no run made is left out."""
    header = ["preset", "question", "a − b", "seeds", "Δ held-out loss (95% CI)", "Holm p", "verdict"]
    rows = []
    for label, table in tables.items():
        keyed = {(r.a, r.b): r for r in table.itertuples()}
        rates = sorted({a.partition(" at noise ")[2] for a in table["a"]})
        for question, a, b in ANSWER_ROWS:
            for rate in rates:
                for per in ("microbatch", "sample"):
                    suffix = f" at noise {rate}" if rate else ""
                    key = (recipe_name(a, per) + suffix,
                           (b if b == BASELINE.name else recipe_name(b, per)) + suffix)
                    if key in keyed:
                        rows.append(_answer_row(label, question, key, keyed[key], alpha))
    if not rows:
        return "No comparison has been run yet.\n"
    return markdown_table(header, rows) + "\n"


def _answer_row(label: str, question: str, key: tuple[str, str], r, alpha: float) -> list[str]:
    verdict = "distinguishable" if r.holm_p < alpha else f"not distinguishable at {r.n_pairs} seeds"
    return [label, question, f"{key[0]} − {key[1]}", str(r.n_pairs),
            f"{_number(r.delta, 3, sign=True)} ({_number(r.ci_low, 3, sign=True)} to "
            f"{_number(r.ci_high, 3, sign=True)})", format_p(r.holm_p), verdict]

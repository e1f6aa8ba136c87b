"""02_si_analysis, the known-noise experiment: what self-influence and PRESENCE do with training rows known to
be noisy (01_data corrupts a share of them: word order jumbled, random tokens, Python source; the held-out
split stays clean). The paper argues that SI is high on noisy data and that tau = -1 moves weight off it;
here that is measured.

    python 02_si_analysis/analyze_noise.py --preset presets/variants/tiny_x10.yaml   # after its noise grid

Inputs: the runs of 03_pretrain (results/<preset>/pretrain/runs/*: config.json, train_log.csv, heldout.csv;
artefacts/<preset>/pretrain/<run>/{final, snapshots}) and the noisy data of 01_data (packed/noise-<rate>/).
Outputs in results/<preset>/noise/:
  noise_runs.csv     one row per run: clean held-out loss (+ standard error over rows), the noisy rows' share
                     of the batch and of the update's weight (mean over steps, and per tau stage), the
                     within-step AUROC of per-sample SI for noisy vs clean rows (mean over training) and the
                     AUROC of the final model on a fixed labelled set of training rows
  noise_si_by_kind.csv  that fixed set's AUROC per noise kind, per checkpoint (snapshots and final)
  granularity.csv    microbatches of 1, 4, 16, 64 rows (8 per draw) drawn from the noisy data and scored with
                     the noisy baseline's checkpoints: how the noisy rows' weight and the rank correlation of
                     microbatch SI with a microbatch's noisy share change as microbatches grow
  noise_comparisons.csv  per seed, the clean held-out loss of one recipe minus another's (same seed), paired
                     row by row, with its evaluation standard error: PRESENCE against the baseline and the
                     shuffled control at each noise rate, the oracle against the baseline, noisy against clean
  noise_summary.md   the above over seeds (mean, seed std, mean evaluation SE), and the weight shares and
                     AUROCs per recipe: the numbers the README quotes
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from tqdm import tqdm

from common.cli import exit_on_known_errors
from common.config import ConfigError, load_preset
from common.data.packed_data import SpanCorruptionBatches, load_data_manifest
from common.io import atomic_open, read_json, write_csv
from common.modeling import load_pretrained
from common.paths import artefacts_dir, results_dir
from common.presence.influence import batch_self_influence
from common.presence.methods import BASELINE, CONTROL, ORACLE, PRESENCE
from common.presence.reweighting import presence_weights
from common.reporting.markdown import markdown_table
from common.reporting.run_results import finished_runs, paired_heldout_delta, read_table, recipe_name, repeated_runs
from common.reporting.stats import auroc
from common.threads import set_cpu_threads

COMPARISON_COLUMNS = ["comparison", "noise_rate", "seed", "delta", "eval_se"]
DIGITS = 6  # significant digits of the tables: float noise of a rerun (7th digit) rewrites nothing
RUN_COLUMNS = ["run", "method", "per", "noise_kind", "noise_rate", "seed", "clean_heldout_loss", "se",
               "noisy_weight_share", "noisy_batch_share", "noisy_weight_share_direct", "noisy_weight_share_inverse",
               "si_auroc_final", "si_auroc_mean"]
KIND_COLUMNS = ["run", "method", "per", "noise_rate", "seed", "checkpoint_step", "kind", "n_noisy", "n_clean", "auroc"]
GRANULARITY_COLUMNS = ["run", "seed", "checkpoint_step", "microbatch_size", "n_microbatches", "draws",
                       "noisy_batch_share", "noisy_weight_share_tau_minus1", "noisy_weight_share_tau_plus1",
                       "spearman_mean", "spearman_se", "spearman_draws", "auroc_z"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny_x10", help="a preset with data.noise_rates (name or YAML path)")
    p.add_argument("--scoring-rows", type=int, default=600, help="fixed labelled training rows scored per checkpoint")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64], help="microbatch sizes (granularity)")
    p.add_argument("--draws", type=int, default=20, help="batches of 8 microbatches drawn per size and checkpoint")
    p.add_argument("--runs-dir", help="the pre-training runs (default results/<preset>/pretrain/runs)")
    p.add_argument("--out", help="output folder (default results/<preset>/noise)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    return p.parse_args(argv)


def noise_runs(runs_dir: Path) -> list[dict]:
    """Finished runs (metrics.json written) with their config."""
    return [{"dir": folder, **read_json(folder / "config.json")} for folder in finished_runs(runs_dir)
            if (folder / "config.json").is_file()]


def stage_means(log: pd.DataFrame, column: str, switch_step: int) -> tuple[float, float, float]:
    """Mean of a per-step column over the whole run, the direct stage (steps <= I) and the inverse stage."""
    values = pd.to_numeric(log[column], errors="coerce")
    direct = log["step"] <= switch_step
    return values.mean(), values[direct].mean(), values[~direct].mean()


def scoring_set(train: SpanCorruptionBatches, count: int, seed: int) -> np.ndarray:
    """A fixed set of training rows, half clean and half noisy (the kinds in equal shares), seeded."""
    rng = np.random.default_rng([seed, 5])
    labels = train.noise_labels
    kinds = sorted(set(labels[labels > 0].tolist()))
    per_kind = count // 2 // len(kinds)
    chosen = [rng.choice(np.flatnonzero(labels == 0), size=count // 2, replace=False)]
    chosen += [rng.choice(np.flatnonzero(labels == k), size=per_kind, replace=False) for k in kinds]
    return np.sort(np.concatenate(chosen))


def per_sample_si(model, train: SpanCorruptionBatches, rows: np.ndarray, batch_size: int, device) -> np.ndarray:
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in train.fixed_rows(rows[start:start + batch_size]).items()}
        scores.append(batch_self_influence(model, batch, layers="first", per="sample").double().cpu())
    return torch.cat(scores).numpy()


def kind_rows(run: dict, step: int, si: np.ndarray, labels: np.ndarray, kinds: list[str]) -> list[dict]:
    rows = []
    for k, kind in [(0, "all")] + list(enumerate(kinds, start=1)):
        noisy = labels > 0 if k == 0 else labels == k
        rows.append({"run": run["run_name"], "method": run["method"], "per": run["per"],
                     "noise_rate": run.get("noise_rate", 0.0), "seed": run["seed"], "checkpoint_step": step,
                     "kind": kind, "n_noisy": int(noisy.sum()), "n_clean": int((labels == 0).sum()),
                     "auroc": auroc(si[noisy], si[labels == 0])})
    return rows


def checkpoints_of(preset_name: str, run_name: str) -> list[tuple[int, Path]]:
    """(step, folder) of a run's snapshots and final model, oldest first."""
    store = artefacts_dir(preset_name, "pretrain", run_name)
    final = store / "final"
    if not (final / "presence_run.json").is_file():
        raise FileNotFoundError(f"{final} holds no finished model. Fix: finish the run with 03_pretrain/pretrain_all.py")
    snapshots = sorted(((int(p.name.split("-")[1]), p) for p in store.glob("snapshots/step-*")))
    return snapshots + [(read_json(final / "presence_run.json")["steps"], final)]


def granularity_rows(model, run: dict, step: int, train: SpanCorruptionBatches, sizes: list[int], draws: int,
                     device) -> list[dict]:
    """For each microbatch size m: `draws` batches of 8 microbatches of m random training rows; per draw the
    microbatch SI, the noisy share of each microbatch, PRESENCE's weights at tau = -1 and +1 and their
    noisy weight share, and the Spearman correlation of SI with the noisy share."""
    labels, rows_out = train.noise_labels, []
    rate = float(np.mean(labels > 0))  # a microbatch "above" it is noisier than the data
    rng = np.random.default_rng([run["seed"], 6, step])
    for m in sizes:
        shares, minus, plus, rhos, zs, above = [], [], [], [], [], []
        for _ in range(draws):
            ids = rng.choice(train.num_rows, size=8 * m, replace=False)
            batch = {k: v.to(device) for k, v in train.fixed_rows(ids).items()}
            si = batch_self_influence(model, batch, layers="first", per="microbatch", microbatch_size=m).double().cpu()
            share = (labels[ids] > 0).reshape(8, m).mean(1)
            shares.append(share.mean())
            minus.append(float(presence_weights(si, -1.0)[0].numpy() @ share))
            plus.append(float(presence_weights(si, 1.0)[0].numpy() @ share))
            if np.ptp(share) > 0:
                rhos.append(sps.spearmanr(si.numpy(), share).statistic)
            zs.append(((si - si.mean()) / si.std(unbiased=False).clamp_min(1e-300)).numpy())
            above.append(share > rate)
        z, above = np.concatenate(zs), np.concatenate(above)
        rows_out.append({"run": run["run_name"], "seed": run["seed"], "checkpoint_step": step, "microbatch_size": m,
                         "n_microbatches": 8, "draws": draws, "noisy_batch_share": float(np.mean(shares)),
                         "noisy_weight_share_tau_minus1": float(np.mean(minus)),
                         "noisy_weight_share_tau_plus1": float(np.mean(plus)),
                         "spearman_mean": float(np.mean(rhos)) if rhos else float("nan"),
                         "spearman_se": float(np.std(rhos, ddof=1) / np.sqrt(len(rhos))) if len(rhos) > 1 else float("nan"),
                         "spearman_draws": len(rhos), "auroc_z": auroc(z[above], z[~above])})
    return rows_out


def comparison_rows(runs: list[dict], rate: float, weights: dict[str, float]) -> list[dict]:
    """Per seed: recipe a minus recipe b, clean held-out loss, both at one noise rate (or a's rate against
    clean data), paired row by row (run_results.paired_heldout_delta)."""
    by_key = {(recipe_name(r["method"], r["per"]), r.get("noise_rate", 0.0), r["seed"]): r["dir"] for r in runs}
    baseline, wanted = BASELINE.name, []
    for noise in (0.0, rate):
        for per in ("microbatch", "sample"):
            presence, control = recipe_name(PRESENCE.name, per), recipe_name(CONTROL.name, per)
            wanted += [(presence, noise, baseline, noise), (presence, noise, control, noise),
                       (control, noise, baseline, noise)]
    wanted += [(ORACLE.name, rate, baseline, rate), (baseline, rate, baseline, 0.0)]
    rows = []
    for a, rate_a, b, rate_b in wanted:
        for seed in sorted({key[2] for key in by_key}):
            if (a, rate_a, seed) in by_key and (b, rate_b, seed) in by_key:
                tables = [pd.read_csv(by_key[key] / "heldout_rows.csv") for key in ((a, rate_a, seed), (b, rate_b, seed))]
                delta, se = paired_heldout_delta(tables[0], tables[1], weights)
                name = f"{a} − {b}" + ("" if rate_a == rate_b else f" (clean data, noise {rate_b:g})")
                rows.append({"comparison": name, "noise_rate": rate_a, "seed": seed, "delta": delta, "eval_se": se})
    return rows


def summary_markdown(runs: pd.DataFrame, kinds: pd.DataFrame, comparisons: pd.DataFrame, preset_name: str,
                     scoring_rows: int) -> str:
    """The experiment over seeds, in three tables."""
    lines = [f"# The known-noise experiment at preset `{preset_name}` (made by 02_si_analysis/analyze_noise.py)", "",
             "Mean ± sample std over seeds (n). Weight shares: the noisy rows' share of the update's weight, over "
             "the run, the τ = +1 stage (steps ≤ I) and the τ = −1 stage; the noisy rows are the same share of "
             "every recipe's batches. AUROC of per-sample SI for noisy vs clean rows: within each step during "
             f"training (mean), and on {scoring_rows} fixed training rows with the final model.", ""]
    runs = runs.assign(recipe=[recipe_name(m, p) for m, p in zip(runs["method"], runs["per"])])
    columns = ["clean_heldout_loss", "noisy_batch_share", "noisy_weight_share", "noisy_weight_share_direct",
               "noisy_weight_share_inverse", "si_auroc_mean", "si_auroc_final"]
    rows = []
    for (rate, name), group in runs.groupby(["noise_rate", "recipe"], sort=True):
        rows.append([f"{rate:g}", name, str(len(group))] + [_mean_std(group[c]) for c in columns])
    lines += [markdown_table(["noise rate", "recipe", "n"] + columns, rows), ""]
    if not comparisons.empty:
        rows = []
        for (name, rate), group in comparisons.groupby(["comparison", "noise_rate"], sort=False):
            rows.append([name, f"{rate:g}", str(len(group)), f"{group['delta'].mean():+.4f}",
                         f"{group['delta'].std():.4f}" if len(group) > 1 else "–", f"{group['eval_se'].mean():.4f}"])
        lines += ["Clean held-out loss differences, each seed paired with the same seed and the rows paired row by "
                  "row (below 0: the first recipe is better):", "",
                  markdown_table(["difference", "noise rate", "n seeds", "Δ mean", "seed std", "eval SE"], rows), ""]
    final = kinds[kinds["checkpoint_step"] == kinds.groupby("run")["checkpoint_step"].transform("max")]
    if not final.empty:
        final = final.assign(recipe=[recipe_name(m, p) for m, p in zip(final["method"], final["per"])])
        rows = [[f"{rate:g}", name] + [_mean_std(group[group["kind"] == k]["auroc"]) for k in
                                      ("all", "jumbled", "random", "python")]
                for (rate, name), group in final.groupby(["noise_rate", "recipe"], sort=True)]
        lines += ["AUROC of the final model's per-sample SI on the fixed rows, per noise kind (0.5: no separation):",
                  "", markdown_table(["trained at noise rate", "recipe", "all", "jumbled", "random", "python"], rows), ""]
    return "\n".join(lines)


def _mean_std(values: pd.Series) -> str:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return "–"
    return f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else "") + f" ({len(values)})"


def main(args: argparse.Namespace) -> dict:
    preset = load_preset(args.preset, args.set)
    if not preset.data.noise_rates:
        raise ConfigError(f"data.noise_rates: preset {preset.name} has none, so there is no noise experiment to "
                          "analyse. Fix: use a preset that sets them, e.g. presets/variants/tiny_x10.yaml")
    rate = preset.data.noise_rates[0]
    runs_dir = Path(args.runs_dir) if args.runs_dir else results_dir(preset.name, "pretrain") / "runs"
    runs = [r for r in noise_runs(runs_dir) if r.get("noise_rate", 0.0) in (0.0, rate)
            and r["method"] in (BASELINE.name, PRESENCE.name, CONTROL.name, ORACLE.name)]
    if not runs:
        raise FileNotFoundError(f"no finished runs in {runs_dir}. Fix: run the noise grid (see 02_si_analysis/README.md)")
    notes: list[str] = []
    repeats = repeated_runs(runs, preset.pretrain, notes)  # one run per recipe and seed, as 05_figures takes
    for note in notes:
        print(f"note: {note}")
    runs = [run for run in runs if run["run_name"] not in repeats]
    train = SpanCorruptionBatches(artefacts_dir(preset.name, "data"), "train", 1, seed=0, noise_rate=rate)
    kinds, scored = train.noise_kinds, scoring_set(train, args.scoring_rows, preset.data.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_cpu_threads(device)  # common/threads.py: one core left to whatever shares the machine
    run_rows, kind_table, granularity = [], [], []
    for run in tqdm(runs, desc="noise runs"):
        log = read_table(run["dir"] / "train_log.csv", ["step", "loss"], [])
        heldout = read_table(run["dir"] / "heldout.csv", ["step", "lang", "loss", "se"], [])
        final = heldout[(heldout["lang"] == "all") & (heldout["step"] == heldout["step"].max())].iloc[0]
        switch_step = run["preset"]["pretrain"]["switch_step"]  # the run's own I
        weight, weight_direct, weight_inverse = stage_means(log, "noisy_weight_share", switch_step)
        final_auroc = float("nan")
        for step, folder in checkpoints_of(preset.name, run["run_name"]):
            model = load_pretrained(folder).to(device).eval()
            rows = kind_rows(run, step, per_sample_si(model, train, scored, preset.pretrain.eval_batch_size, device),
                             train.noise_labels[scored], kinds)
            kind_table += rows
            final_auroc = rows[0]["auroc"]
            if run["method"] == BASELINE.name and run.get("noise_rate", 0.0) == rate:
                granularity += granularity_rows(model, run, step, train, args.sizes, args.draws, device)
        run_rows.append({"run": run["run_name"], "method": run["method"], "per": run["per"],
                         "noise_kind": "mixed" if run.get("noise_rate") else "none",
                         "noise_rate": run.get("noise_rate", 0.0), "seed": run["seed"],
                         "clean_heldout_loss": final["loss"], "se": final["se"],
                         "noisy_weight_share": weight, "noisy_batch_share": stage_means(
                             log, "noisy_batch_share", switch_step)[0],
                         "noisy_weight_share_direct": weight_direct, "noisy_weight_share_inverse": weight_inverse,
                         "si_auroc_final": final_auroc,
                         "si_auroc_mean": pd.to_numeric(log["si_noise_auroc"], errors="coerce").mean()})
    out = Path(args.out) if args.out else results_dir(preset.name, "noise")
    write_csv(out / "noise_runs.csv", run_rows, RUN_COLUMNS, digits=DIGITS)
    write_csv(out / "noise_si_by_kind.csv", kind_table, KIND_COLUMNS, digits=DIGITS)
    write_csv(out / "granularity.csv", granularity, GRANULARITY_COLUMNS, digits=DIGITS)
    weights = load_data_manifest(artefacts_dir(preset.name, "data"))["sampling_probabilities"]
    comparisons = comparison_rows(runs, rate, weights)
    write_csv(out / "noise_comparisons.csv", comparisons, COMPARISON_COLUMNS, digits=DIGITS)
    with atomic_open(out / "noise_summary.md") as f:
        f.write(summary_markdown(pd.DataFrame(run_rows), pd.DataFrame(kind_table), pd.DataFrame(comparisons),
                                 preset.name, args.scoring_rows))
    print(f"wrote {out}/noise_runs.csv ({len(run_rows)} runs), noise_si_by_kind.csv, granularity.csv, "
          "noise_comparisons.csv, noise_summary.md")
    return {"runs": len(run_rows), "out": str(out)}


if __name__ == "__main__":
    with exit_on_known_errors():
        main(parse_args())

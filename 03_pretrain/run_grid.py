"""Train a grid of pre-training runs (03_pretrain/grids/<name>.yaml: axes, recipes, seeds, comparisons) and
collect it, one row per run, into results/<preset>/<grid>/runs.csv; 05_figures/make_figures.py turns that
file into the grid's differences, figures and (for the microbatch size) the extrapolation to the paper's.

    python 03_pretrain/run_grid.py --grid scaling --preset tiny --plan       # the runs it lacks and their cost
    python 03_pretrain/run_grid.py --grid scaling --preset tiny              # train what is missing, then collect
    python 03_pretrain/run_grid.py --grid schedule --preset tiny --seeds 0 1 # a part (e.g. one process per part)
    python 03_pretrain/run_grid.py --grid schedule --preset tiny --collect   # collect only

A grid needs each run's held-out loss, not its model: a run whose metrics.json is in
results/<preset>/pretrain/runs/ counts as done (so the committed runs are reused, not trained again); an
interrupted run resumes from its checkpoint. Runs are trained one after another, by seed, so a grid
stopped early leaves whole seeds; two processes may share a grid on disjoint --seeds.

runs.csv columns: the grid's axes, recipe, seed, run, batch_size, switch_step, tau_direct, tau_inverse,
final_heldout_loss, final_heldout_se (its evaluation noise: the standard error over held-out rows),
kish_n_stage1 and kish_n_stage2 (the mean Kish effective count of the weights, sum(w)^2 / sum(w^2) of the
n items, over the steps up to I and after it; n for uniform weights), seconds_per_step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pandas as pd

from common.cli import exit_on_known_errors
from common.config import load_preset
from common.grids import load_grid, planned_runs
from common.io import read_json, write_csv
from common.paths import results_dir
from common.presence.methods import get_method
from common.reporting.run_results import final_heldout_se

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pretrain_all  # noqa: E402  (the sibling script: run specs, names and resumable training)

FIELDS = ["run", "batch_size", "switch_step", "tau_direct", "tau_inverse", "final_heldout_loss", "final_heldout_se",
          "kish_n_stage1", "kish_n_stage2", "seconds_per_step"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True, help="a grid of 03_pretrain/grids/ (scaling, schedule) or a YAML path")
    p.add_argument("--preset", default="tiny", help="tiny | small | paper | path to a preset YAML")
    p.add_argument("--seeds", nargs="+", type=int, help="only these of the grid's seeds")
    p.add_argument("--plan", action="store_true", help="list the runs the grid lacks and their cost; train nothing")
    p.add_argument("--collect", action="store_true", help="only collect the finished runs into runs.csv")
    return p.parse_args(argv)


def with_names(planned: list[dict], preset_arg: str) -> list[dict]:
    """Each planned run with its name (as pretrain.py names it) and its pretrain.py arguments."""
    for row in planned:
        row["args"] = pretrain_all.run_arguments(row["spec"], row["seed"], preset_arg)
        row["run"] = pretrain_all.run_name(row["args"])
    return planned


def cost_in_preset_runs(missing: list[dict], preset) -> float:
    """The missing runs' cost in runs of the preset itself: rows per step relative to the preset's batch
    (a run's time grows about linearly with its batch at these sizes)."""
    batch = preset.pretrain.batch_size
    factors = []
    for row in missing:
        given = [a.split("=", 1)[1] for a in row["args"] if a.startswith("pretrain.batch_size=")]
        factors.append(int(given[0]) / batch if given else 1.0)
    return sum(factors)


def seconds_per_preset_run(runs_dir: Path, preset) -> float | None:
    """The median wall time of the preset's committed baseline runs, None without any."""
    times = [read_json(p / "metrics.json").get("wall_seconds") for p in sorted(runs_dir.glob("baseline-s*"))
             if (p / "metrics.json").is_file()]
    times = [t for t in times if t]
    return statistics.median(times) if times else None


def kish_by_stage(log: pd.DataFrame, config: dict) -> tuple[float | None, float | None]:
    """The mean Kish count of the logged weights up to I and after it; a uniform update's is its item count."""
    pretrain = config["preset"]["pretrain"]
    if get_method(config["method"]).update == "uniform":
        items = float(pretrain["batch_size"] if config.get("per") == "sample" else pretrain["num_microbatches"])
        return items, items
    if "kish_n" not in log or log["kish_n"].isna().all():
        return None, None
    switch_step = pretrain["switch_step"]
    first, second = log[log["step"] <= switch_step]["kish_n"], log[log["step"] > switch_step]["kish_n"]
    mean = lambda s: float(s.mean()) if s.notna().any() else None  # noqa: E731
    return mean(first), mean(second)


def collect(planned: list[dict], runs_dir: Path, axes: list[str]) -> list[dict]:
    """One row per planned run that has finished (metrics.json written), in the plan's order."""
    rows = []
    for row in planned:
        folder = runs_dir / row["run"]
        if not (folder / "metrics.json").is_file():
            continue
        config, metrics = read_json(folder / "config.json"), read_json(folder / "metrics.json")
        pretrain = config["preset"]["pretrain"]
        log = pd.read_csv(folder / "train_log.csv")
        stage1, stage2 = kish_by_stage(log, config)
        rows.append({**{a: row[a] for a in axes}, "recipe": row["recipe"], "seed": row["seed"], "run": row["run"],
                     "batch_size": pretrain["batch_size"], "switch_step": pretrain["switch_step"],
                     "tau_direct": pretrain["tau_direct"], "tau_inverse": pretrain["tau_inverse"],
                     "final_heldout_loss": metrics["final_heldout_loss"],
                     "final_heldout_se": final_heldout_se(folder / "heldout.csv"),
                     "kish_n_stage1": stage1, "kish_n_stage2": stage2,
                     "seconds_per_step": metrics.get("seconds_per_step")})
    return rows


def main(args: argparse.Namespace) -> dict:
    grid, preset = load_grid(args.grid), load_preset(args.preset)
    planned = [r for r in planned_runs(grid, preset) if args.seeds is None or r["seed"] in args.seeds]
    planned = with_names(planned, args.preset)
    runs_dir = results_dir(preset.name, "pretrain") / "runs"
    unique = list({row["run"]: row for row in planned}.values())  # cells share the runs of recipes that ignore them
    missing = [row for row in unique if not (runs_dir / row["run"] / "metrics.json").is_file()]
    cost, per_run = cost_in_preset_runs(missing, preset), seconds_per_preset_run(runs_dir, preset)
    hours = f", about {cost * per_run / 3600:.1f} h at the median wall time of this preset's baseline runs " \
            f"({per_run:.0f} s)" if per_run else ""
    print(f"grid {grid.name} at {preset.name}: {len(unique)} runs, {len(unique) - len(missing)} done, "
          f"{len(missing)} to train (the cost of {cost:.1f} runs of the preset{hours})")
    if args.plan:
        for row in missing:
            print(f"  {row['run']}: {row['spec']}")
        return {"missing": len(missing)}
    if not args.collect:
        for row in missing:
            pretrain_all.ensure_run(args.preset, row["args"])
    rows = collect(planned, runs_dir, list(grid.axes))
    path = results_dir(preset.name, grid.name) / "runs.csv"
    write_csv(path, rows, list(grid.axes) + ["recipe", "seed"] + FIELDS, digits=pretrain_all.DIGITS)
    print(f"wrote {path} ({len(rows)} of {len(planned)} planned rows)")
    return {"missing": len(missing), "rows": len(rows), "path": str(path)}


if __name__ == "__main__":
    with exit_on_known_errors():
        main(parse_args())

"""Run a grid of pre-training runs: methods x seeds (default: the preset's pretrain.reproduce_methods
and pretrain.seeds). Finished runs are skipped and interrupted ones resume, so the command can be
repeated. Runs of a method that needs a scorer run (PRESENCE-Sequential) first score the data with the baseline run of
the same seed.

    python 03_pretrain/pretrain_all.py --preset tiny
    python 03_pretrain/pretrain_all.py --preset small --seeds 0 1 2 \
        --runs baseline presence presence-D presence-I presence-I-D "presence-single tau=-2" \
               "presence-single tau=2" "presence switch_step=100" presence-sequential

A run is a method followed by options of 03_pretrain/pretrain.py written key=value
(tau, switch_step, per, si_layers, noise_rate) or section.field=value for any other preset field
("presence pretrain.batch_size=256", passed on as --set). --jobs N trains N runs at once, each on cores / N threads
(on a CPU, two one-thread runs of the tiny model finish sooner than two two-thread runs in turn); the
Sequential runs come after the others. A run counts as finished when its metrics.json and final model are
both written; with --results-only, a committed metrics.json alone (a fresh clone has no models): for a
seed grid that only adds runs to the tables, which then does not train the committed runs again. Later
stages (02, 04) need the models, so `make reproduce` does not pass it. Writes results/<preset>/pretrain/summary.csv and heldout.csv (every run's held-out losses:
run, method, seed, step, lang, n_rows, n_tokens, loss, se).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.cli import exit_on_known_errors
from common.config import load_preset
from common.evaluation.heldout import HELDOUT_COLUMNS
from common.io import keep_equal_numbers, read_json, read_stored_text, write_csv
from common.paths import artefacts_dir, results_dir
from common.presence.methods import BASELINE, NAMES as METHODS, get_method
from common.reporting.run_results import collect_heldout, finished_runs

HERE = Path(__file__).resolve().parent
OPTION_FLAGS = {"tau": "--tau", "switch_step": "--switch-step", "per": "--per", "si_layers": "--si-layers",
                "noise_rate": "--noise-rate"}
SUMMARY_COLUMNS = ["run", "method", "seed", "tau", "per", "switch_step", "si_layers", "noise_rate", "steps",
                   "final_loss", "final_heldout_loss", "si_noise_auroc_mean", "tokens_per_second",
                   "seconds_per_step", "model_tflops", "mfu", "wall_seconds"]
# A finished run trained again (make reproduce on a fresh clone, which has no checkpoints) moves its held-out
# losses by float noise only (another thread count sums in another order): equal at this many significant
# digits, they keep the text the run folder had, so that the tables of losses per row stay as committed.
SETTLED_TABLES, DIGITS = ("heldout.csv", "heldout_rows.csv"), 6


def run_arguments(spec: str, seed: int, preset: str) -> list[str]:
    """'presence-single tau=2' -> pretrain.py arguments."""
    method, *options = spec.split()
    args = ["--preset", preset, "--method", method, "--seed", str(seed)]
    for option in options:
        key, _, value = option.partition("=")
        if "." in key and value:  # any preset field, e.g. pretrain.batch_size=256
            args += ["--set", option]
            continue
        if key not in OPTION_FLAGS or not value:
            raise SystemExit(f"run {spec!r}: unknown option {option!r}. Fix: use key=value with key in "
                             f"{sorted(OPTION_FLAGS)}, or section.field=value for a preset field")
        args += [OPTION_FLAGS[key], value]
    return args


def run_name(args: list[str]) -> str:
    """The name pretrain.py derives for these arguments (asked from pretrain.py itself)."""
    sys.path.insert(0, str(HERE))
    import pretrain  # the sibling script, same stage

    parsed = pretrain.parse_args(args)
    return pretrain.default_run_name(parsed)


def call(script: str, args: list[str], threads: int | None = None) -> None:
    command = [sys.executable, str(HERE / script), *args]
    print("$", " ".join(command[1:]), flush=True)
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env)


def finished(preset_name: str, name: str, results_only: bool = False) -> bool:
    """pretrain.py writes the final model, then metrics.json last (and removes both when a run starts or
    resumes): a run is finished when both are there, and only then do the tables count it. With
    `results_only`, metrics.json alone is enough (the run's results, committed without its model)."""
    return ((results_dir(preset_name, "pretrain") / "runs" / name / "metrics.json").is_file()
            and (results_only or (artefacts_dir(preset_name, "pretrain", name, "final") / "presence_run.json").is_file()))


def ensure_run(preset_name: str, args: list[str], threads: int | None = None, results_only: bool = False) -> None:
    name = run_name(args)
    if finished(preset_name, name, results_only):
        print(f"{name}: finished, skipped")
        return
    started = (artefacts_dir(preset_name, "pretrain", name, "checkpoints") / "LATEST").is_file()
    run_dir = results_dir(preset_name, "pretrain") / "runs" / name
    previous = {table: read_stored_text(run_dir / table) for table in SETTLED_TABLES
                if (run_dir / "metrics.json").is_file() and (run_dir / table).is_file()}
    call("pretrain.py", args + (["--resume"] if started else ["--overwrite"]), threads=threads)
    for table, text in previous.items():
        keep_equal_numbers(run_dir / table, text, DIGITS)


def ensure_runs(preset_name: str, runs: list[list[str]], jobs: int, results_only: bool = False) -> None:
    """Every run, `jobs` at a time; a failed run does not stop the others, and is raised at the end."""
    if jobs <= 1:
        for args in runs:
            ensure_run(preset_name, args, results_only=results_only)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(ensure_run, preset_name, args, threads, results_only) for args in runs]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]


def summarise(preset_name: str) -> Path:
    rows = []
    for run_dir in finished_runs(results_dir(preset_name, "pretrain") / "runs"):
        config, metrics = read_json(run_dir / "config.json"), read_json(run_dir / "metrics.json")
        pretrain_cfg = config["preset"]["pretrain"]
        rows.append({"run": run_dir.name, "method": config["method"], "seed": config["seed"], "tau": config["tau"],
                     "per": config["per"], "switch_step": pretrain_cfg["switch_step"],
                     "si_layers": pretrain_cfg["si_layers"], "noise_rate": config.get("noise_rate", 0.0),
                     "steps": pretrain_cfg["steps"], **{k: metrics.get(k) for k in SUMMARY_COLUMNS[9:]}})
    path = results_dir(preset_name, "pretrain") / "summary.csv"
    # at 6 significant digits a retrained run's losses (float noise in the 8th) leave their cells as they were;
    # its timings do change
    write_csv(path, rows, SUMMARY_COLUMNS, digits=DIGITS)
    write_csv(path.with_name("heldout.csv"), collect_heldout(results_dir(preset_name, "pretrain") / "runs"),
              HELDOUT_COLUMNS, digits=DIGITS)
    return path


def main(args: argparse.Namespace) -> dict:
    preset = load_preset(args.preset)  # args.preset may be a YAML path: folders are named by preset.name
    specs = args.runs or preset.pretrain.reproduce_methods
    seeds = args.seeds if args.seeds is not None else preset.pretrain.seeds
    is_sequential = [spec.split()[0] in METHODS and "scorer_run" in get_method(spec.split()[0]).needs for spec in specs]
    results_only = getattr(args, "results_only", False)
    ensure_runs(preset.name, [run_arguments(spec, seed, args.preset) for seed in seeds
                              for spec, seq in zip(specs, is_sequential) if not seq], args.jobs, results_only)
    # Sequential runs need the baseline of their seed (the scoring model) and its scores.
    for seed in seeds:
        for spec in (s for s, seq in zip(specs, is_sequential) if seq):
            sequential = run_arguments(spec, seed, args.preset)
            if finished(preset.name, run_name(sequential), results_only):
                print(f"{run_name(sequential)}: finished, skipped")
                continue
            ensure_run(preset.name, run_arguments(BASELINE.name, seed, args.preset))  # its model scores the data
            scores = artefacts_dir(preset.name, "pretrain", "sequential", f"scores-s{seed}.npy")
            if not scores.is_file():
                call("score_candidates.py", ["--preset", args.preset, "--seed", str(seed)])
            ensure_run(preset.name, sequential)
    path = summarise(preset.name)
    print(f"wrote {path}")
    return {"summary": str(path)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--runs", nargs="+", help="run specs (default: pretrain.reproduce_methods)")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: pretrain.seeds")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (CPU: e.g. the core count)")
    parser.add_argument("--results-only", action="store_true",
                        help="count a run whose results/ folder holds its metrics.json as done, model or not (a "
                             "seed grid on a fresh clone: the committed runs are not trained again)")
    with exit_on_known_errors():
        main(parser.parse_args())

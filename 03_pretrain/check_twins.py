"""Do the committed runs come from the code that is committed? For every recipe of a preset's finished runs,
train its lowest seed again from this checkout, in a scratch folder, and compare the final held-out loss with
the committed run's. A run needs no twin when it was trained from this very commit, or from one whose code
is this checkout's: the two differ in results/, tests/ and Markdown files only (`git diff`), which no run reads.

    python 03_pretrain/check_twins.py --preset tiny                       # ~1.5 min a recipe on one core
    python 03_pretrain/check_twins.py --preset tiny --recipes presence-s0 baseline-s0

Writes results/<preset>/pretrain/twins.csv: per recipe the run, the commit it was trained from, the commit of
the twin, both losses, |difference|, whether it is within --tolerance (default 1e-6) and how it was checked
(a twin, the same commit, or the same code). Exits 1 when one is
not. Sequential runs need their scores, which the twin re-uses from artefacts/<preset>/pretrain/sequential/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common.cli import exit_on_known_errors
from common.config import load_preset
from common.io import read_json, write_csv
from common.paths import REPO_ROOT, artefacts_dir, results_dir
from common.presence.methods import get_method
from common.reporting.run_results import finished_runs
from common.runinfo import git_commit

HERE = Path(__file__).resolve().parent
COLUMNS = ["run", "method", "seed", "run_commit", "twin_commit", "run_loss", "twin_loss", "abs_difference",
           "within_tolerance", "checked_by"]
# What no run reads: its outputs, the prose and the tests (no stage imports tests/). Two commits that differ only
# here train the same runs.
NOT_CODE = ("results", "*.md", "tests")


def same_code(run_commit: str, commit: str, repository: Path = REPO_ROOT) -> bool:
    """Whether `run_commit` and `commit` (clean commits of `repository`) differ in nothing but NOT_CODE; False
    for a dirty or unknown commit."""
    if run_commit.endswith("+dirty") or commit.endswith("+dirty"):
        return False
    excluded = [f":(exclude){pattern}" for pattern in NOT_CODE]
    result = subprocess.run(["git", "diff", "--quiet", run_commit, commit, "--", ".", *excluded], cwd=repository,
                            capture_output=True)
    return result.returncode == 0  # 1: they differ; 128: a commit git does not know


def twin_arguments(config: dict, preset_arg: str, out: Path) -> list[str]:
    """pretrain.py arguments that repeat a run's recipe from its config.json, into `out`."""
    args = ["--preset", preset_arg, "--method", config["method"], "--seed", str(config["seed"]),
            "--run-name", config["run_name"], "--out", str(out), "--overwrite"]
    if config.get("tau") is not None:
        args += ["--tau", f"{config['tau']:g}"]
    if config.get("per", "microbatch") != "microbatch":
        args += ["--per", config["per"]]
    if config.get("noise_rate"):
        args += ["--noise-rate", f"{config['noise_rate']:g}"]
    reference = load_preset(preset_arg).to_dict()
    for section in ("data", "model", "pretrain"):
        for key, value in flatten(config["preset"][section]).items():
            if flatten(reference[section]).get(key) != value:
                args += ["--set", f"{section}.{key}={json.dumps(value)}"]
    return args


def paired_run(arguments: list[str], runs_dir: Path) -> list[str]:
    """For a twin of a weight-matched control, the committed run it replays (a twin trains in a scratch
    folder, where pretrain.py's default, the paired run beside it, is absent); nothing for other methods."""
    sys.path.insert(0, str(HERE))
    import pretrain  # the sibling script: its own rule for naming the paired run

    args = pretrain.parse_args(arguments)
    method = get_method(args.method)
    if "paired_run" not in method.needs:
        return []
    paired = pretrain.parse_args([*arguments, "--method", method.controls])  # the later --method wins
    paired.run_name = None
    return ["--paired-run", str(runs_dir / pretrain.default_run_name(paired))]


def flatten(section: dict, prefix: str = "") -> dict:
    """{"tokenizer": {"vocab_size": 800}} -> {"tokenizer.vocab_size": 800}."""
    out = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def lowest_seed_per_recipe(runs_dir: Path) -> list[Path]:
    """One run folder per recipe (the run name without its seed): the one of the lowest seed."""
    chosen: dict[str, tuple[int, Path]] = {}
    for folder in finished_runs(runs_dir):
        config = read_json(folder / "config.json")
        recipe = folder.name.rsplit("-s", 1)[0]
        if recipe not in chosen or config["seed"] < chosen[recipe][0]:
            chosen[recipe] = (config["seed"], folder)
    return [folder for _, folder in sorted(chosen.values(), key=lambda item: item[1].name)]


def main(args: argparse.Namespace) -> int:
    preset = load_preset(args.preset)
    runs_dir = results_dir(preset.name, "pretrain") / "runs"
    folders = [runs_dir / name for name in args.recipes] if args.recipes else lowest_seed_per_recipe(runs_dir)
    commit = git_commit()
    rows = []
    with tempfile.TemporaryDirectory(prefix="twins-") as scratch:
        for folder in folders:
            config, metrics = read_json(folder / "config.json"), read_json(folder / "metrics.json")
            run_commit = read_json(folder / "environment.json").get("git_commit", "unknown")
            row = {"run": folder.name, "method": config["method"], "seed": config["seed"], "run_commit": run_commit,
                   "twin_commit": commit, "run_loss": metrics["final_heldout_loss"]}
            if run_commit == commit and not commit.endswith("+dirty"):
                row.update(twin_loss=row["run_loss"], abs_difference=0.0, within_tolerance=True,
                           checked_by="same commit")
            elif same_code(run_commit, commit):
                row.update(twin_loss=row["run_loss"], abs_difference=0.0, within_tolerance=True,
                           checked_by="same code")
            else:
                out = Path(scratch) / folder.name
                # the twin shares the run's name, so its checkpoints go to a scratch artefacts folder of its own
                arguments = twin_arguments(config, args.preset, out)
                subprocess.run([sys.executable, str(HERE / "pretrain.py"), *arguments, *paired_run(arguments, runs_dir)],
                               check=True, env=twin_environment(Path(scratch), preset.name))
                twin = read_json(out / "metrics.json")["final_heldout_loss"]
                row.update(twin_loss=twin, abs_difference=abs(twin - row["run_loss"]),
                           within_tolerance=abs(twin - row["run_loss"]) <= args.tolerance, checked_by="twin")
            print(f"{folder.name}: {row['run_loss']:.9f} vs {row['twin_loss']:.9f} (|Δ| {row['abs_difference']:.1e})")
            rows.append(row)
    path = results_dir(preset.name, "pretrain") / "twins.csv"
    write_csv(path, rows, COLUMNS)
    print(f"wrote {path}")
    return 0 if all(r["within_tolerance"] for r in rows) else 1


def twin_environment(scratch: Path, preset_name: str) -> dict:
    """The environment of a twin: artefacts in `scratch`, reading this checkout's data (and Sequential's
    scores) through links, so that no committed run's checkpoints are touched."""
    root = scratch / "artefacts"
    (root / preset_name / "pretrain").mkdir(parents=True, exist_ok=True)
    for part in (("data",), ("pretrain", "sequential")):
        link, target = root.joinpath(preset_name, *part), artefacts_dir(preset_name, *part)
        if target.exists() and not link.exists():
            link.symlink_to(target)
    return {**os.environ, "PRESENCE_ARTEFACTS": str(root)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--recipes", nargs="+", help="run folder names (default: the lowest seed of each recipe)")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    with exit_on_known_errors():
        sys.exit(main(parser.parse_args()))

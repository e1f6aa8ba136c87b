"""Do the committed runs come from the code that is committed? For every recipe of a preset's finished runs,
train its lowest seed again from this checkout, in a scratch folder, and compare the final held-out loss with
the committed run's. A run needs no twin when it was trained from this very commit, or from one that agrees
with it on every file a run reads (`git diff` over the repository modules the data, scoring and training
scripts import, found statically, and the presets, grids and pinned packages): results, prose, tests, the
figures and the reporting modules that only they use can change without a twin.

    python 03_pretrain/check_twins.py --preset tiny                       # ~1.5 min a recipe on one core
    python 03_pretrain/check_twins.py --preset tiny --recipes presence-s0 baseline-s0

Writes results/<preset>/pretrain/twins.csv: per recipe the run, the commit it was trained from, the commit of
the twin, both losses, |difference|, whether it is within --tolerance (default 1e-6) and how it was checked
(a twin, the same commit, or the same code). Exits 1 when one is
not. Sequential runs need their scores, which the twin re-uses from artefacts/<preset>/pretrain/sequential/.
"""
from __future__ import annotations

import argparse
import ast
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
sys.path.insert(0, str(HERE))
import pretrain  # noqa: E402  (the sibling script: its parser and its rule for naming the paired run)

COLUMNS = ["run", "method", "seed", "run_commit", "twin_commit", "run_loss", "twin_loss", "abs_difference",
           "within_tolerance", "checked_by"]
# The scripts that make a run (its data, its scores for Sequential, its training) and what they read besides
# code: the presets, the grids' knobs, the pinned packages. Two commits that agree on these and on every
# repository module the scripts import train the same runs.
ENTRY_POINTS = ("01_data/prepare_data.py", "03_pretrain/pretrain.py", "03_pretrain/pretrain_all.py",
                "03_pretrain/run_grid.py", "03_pretrain/score_candidates.py")
RUN_INPUTS = ("presets", "03_pretrain/grids", "pyproject.toml")


def module_files(name: str, importer: str, repository: Path) -> list[str]:
    """The repository files that `import name` runs from the file `importer`: the module and each package
    above it (a package's __init__.py runs first), or a sibling script (03_pretrain puts its own folder on
    sys.path); nothing for a module outside the repository."""
    parts = name.split(".")
    found = []
    for base in ("", str(Path(importer).parent)):
        for depth in range(1, len(parts) + 1):
            stem = Path(base, *parts[:depth])
            for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
                if (repository / candidate).is_file():
                    found.append(candidate.as_posix())
    return found


def code_a_run_reads(repository: Path = REPO_ROOT) -> list[str]:
    """Every repository file a run's scripts import, at any depth, found statically (imports inside
    functions count too, so a module loaded only when a branch runs is not missed)."""
    seen: set[str] = set()
    pending = list(ENTRY_POINTS)
    while pending:
        path = pending.pop()
        if path in seen or not (repository / path).is_file():
            continue
        seen.add(path)
        for node in ast.walk(ast.parse((repository / path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from a.b import c` may import the module a.b.c, or take the name c from a.b
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                pending += module_files(name, path, repository)
    return sorted(seen)


def same_code(run_commit: str, commit: str, repository: Path = REPO_ROOT) -> bool:
    """Whether `run_commit` and `commit` (clean commits of `repository`) agree on every file a run reads:
    code_a_run_reads() of the checkout and RUN_INPUTS. A change to what a script imports shows in the
    importing file, which is in the set; results, prose, tests, the figures and this checker are not.
    False for a dirty or unknown commit."""
    if run_commit.endswith("+dirty") or commit.endswith("+dirty"):
        return False
    read = code_a_run_reads(repository) + [path for path in RUN_INPUTS if (repository / path).exists()]
    result = subprocess.run(["git", "diff", "--quiet", run_commit, commit, "--", *read], cwd=repository,
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
                subprocess.run([sys.executable, str(HERE / "pretrain.py"), *arguments,
                                *paired_run(arguments, runs_dir)], check=True,
                               env=twin_environment(Path(scratch), preset.name))
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

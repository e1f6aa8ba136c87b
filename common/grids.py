"""Grids of pre-training runs as data (03_pretrain/grids/<name>.yaml): axes whose values become preset
overrides, the recipes run in every cell, the seeds, and the comparisons (a − b, paired by seed) made
within each cell.

An axis is a name of AXES with a list of values; each value becomes preset fields:
- microbatch_size m: pretrain.batch_size = pretrain.num_microbatches * m (the number of microbatches stays);
- switch_fraction f: pretrain.switch_step = round(f * pretrain.steps) (I as a share of the run; 0 and 1 are
  the single-stage endpoints, tau2 throughout and tau1 throughout);
- tau_magnitude t: pretrain.tau_direct = +t, pretrain.tau_inverse = -t (the two-stage schedule at |tau| = t).

A recipe that does not read a field (the baseline reads no temperature) is the same run in every cell
that differs only there: cells share it, and it is trained once.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.config import ConfigError, Preset
from common.presence.methods import get_method
from common.paths import REPO_ROOT

GRIDS_DIR = REPO_ROOT / "03_pretrain" / "grids"


def _microbatch_size(preset: Preset, m) -> dict[str, object]:
    return {"pretrain.batch_size": preset.pretrain.num_microbatches * int(m)}


def _switch_fraction(preset: Preset, f) -> dict[str, object]:
    return {"pretrain.switch_step": round(float(f) * preset.pretrain.steps)}


def _tau_magnitude(preset: Preset, t) -> dict[str, object]:
    return {"pretrain.tau_direct": float(t), "pretrain.tau_inverse": -float(t)}


AXES = {"microbatch_size": _microbatch_size, "switch_fraction": _switch_fraction, "tau_magnitude": _tau_magnitude}


@dataclass(frozen=True)
class Grid:
    name: str
    description: str
    axes: dict[str, list]  # axis -> values, in the order cells are listed
    recipes: list[str]  # methods, optionally with pretrain_all options ("presence per=sample")
    seeds: list[int]
    comparisons: list[tuple[str, str]]  # (a, b) recipes compared within each cell
    fewer_seeds: dict[str, list[int]] = field(default_factory=dict)  # "axis=value" -> the seeds of such cells
    marked: dict[str, object] = field(default_factory=dict)  # the paper's cell, marked in figures

    def cells(self) -> list[dict[str, object]]:
        """Every combination of the axes' values, as {axis: value}."""
        names = list(self.axes)
        return [dict(zip(names, values)) for values in itertools.product(*(self.axes[n] for n in names))]

    def seeds_of(self, cell: dict[str, object]) -> list[int]:
        for key, seeds in self.fewer_seeds.items():
            axis, _, value = key.partition("=")
            if axis in cell and float(cell[axis]) == float(value):
                return list(seeds)
        return list(self.seeds)


def load_grid(name_or_path: str) -> Grid:
    """03_pretrain/grids/<name>.yaml (or a YAML path), validated: known axes, methods and comparisons."""
    path = Path(name_or_path) if name_or_path.endswith((".yaml", ".yml")) else GRIDS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in GRIDS_DIR.glob("*.yaml")))
        raise ConfigError(f"grid: no grid {name_or_path!r}. Fix: use one of {known} or a path to a grid YAML")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = sorted(set(raw.get("axes", {})) - set(AXES))
    if unknown or not raw.get("axes"):
        raise ConfigError(f"grid {path.name}: axes {unknown or '(none)'} are not known. Fix: use some of "
                          f"{', '.join(AXES)}")
    for recipe in raw.get("recipes", []):
        get_method(recipe.split()[0])
    comparisons = [tuple(pair) for pair in raw.get("comparisons", [])]
    absent = sorted({r for pair in comparisons for r in pair} - set(raw.get("recipes", [])))
    if absent or any(len(pair) != 2 for pair in comparisons):
        raise ConfigError(f"grid {path.name}: comparisons must be pairs of its recipes; {absent} are not. Fix: "
                          "list them under recipes")
    if not raw.get("seeds"):
        raise ConfigError(f"grid {path.name}: no seeds. Fix: list them under seeds")
    return Grid(path.stem, str(raw.get("description", "")).strip(), {k: list(v) for k, v in raw["axes"].items()},
                list(raw.get("recipes", [])), [int(s) for s in raw["seeds"]], comparisons,
                {str(k): [int(s) for s in v] for k, v in (raw.get("fewer_seeds") or {}).items()},
                dict(raw.get("marked") or {}))


def cell_overrides(preset: Preset, cell: dict[str, object]) -> dict[str, object]:
    """The preset fields a cell sets, {"pretrain.batch_size": 128, ...}."""
    overrides = {}
    for axis, value in cell.items():
        overrides.update(AXES[axis](preset, value))
    return overrides


def run_spec(recipe: str, overrides: dict[str, object]) -> str:
    """A pretrain_all run spec: the recipe, then each override as section.field=value."""
    return " ".join([recipe] + [f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                                for key, value in overrides.items()])


def planned_runs(grid: Grid, preset: Preset) -> list[dict]:
    """One row per (cell, recipe, seed): the cell's axis values, recipe, seed and run spec; ordered by seed,
    then cell, then recipe (a grid stopped early leaves whole seeds, and a control that replays a run's
    weights comes after that run when the recipes list it after)."""
    rows = []
    for seed in sorted({s for cell in grid.cells() for s in grid.seeds_of(cell)}):
        for cell in grid.cells():
            if seed not in grid.seeds_of(cell):
                continue
            overrides = cell_overrides(preset, cell)
            rows += [{**cell, "recipe": recipe, "seed": seed, "spec": run_spec(recipe, overrides)}
                     for recipe in grid.recipes]
    return rows

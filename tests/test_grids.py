"""Grids of runs (common/grids.py, 03_pretrain/run_grid.py) and what is read from them
(common/reporting/grid_results.py), against hand-computed cases."""
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from common.config import ConfigError, load_preset
from common.grids import cell_overrides, load_grid, planned_runs, run_spec
from common.reporting.grid_results import extrapolate, grid_differences, log_trend
from conftest import MINI_DATA, MINI_MODEL, MINI_PRETRAIN, csv_rows, load_stage


def test_the_committed_grids_expand_to_their_cells_seeds_and_overrides():
    tiny = load_preset("tiny")
    scaling = load_grid("scaling")
    rows = planned_runs(scaling, tiny)
    # 4 recipes at m = 1, 4, 16 with 5 seeds, at m = 64 with 3
    assert len(rows) == 4 * (3 * 5 + 3)
    assert cell_overrides(tiny, {"microbatch_size": 16}) == {"pretrain.batch_size": 128}  # 8 microbatches of 16
    assert {r["seed"] for r in rows if r["microbatch_size"] == 64} == {0, 1, 2}
    assert [r["seed"] for r in rows] == sorted(r["seed"] for r in rows)  # whole seeds first
    schedule = load_grid("schedule")
    assert cell_overrides(tiny, {"switch_fraction": 0.25, "tau_magnitude": 2}) == {
        "pretrain.switch_step": 50, "pretrain.tau_direct": 2.0, "pretrain.tau_inverse": -2.0}
    assert cell_overrides(tiny, {"switch_fraction": 1.0, "tau_magnitude": 1})["pretrain.switch_step"] == 200
    assert len(schedule.cells()) == 18 and schedule.marked == {"switch_fraction": 0.1, "tau_magnitude": 1}
    assert run_spec("presence", {"pretrain.tau_direct": 0.5, "pretrain.switch_step": 0}) == \
        "presence pretrain.tau_direct=0.5 pretrain.switch_step=0"


def test_a_grid_with_unknown_axes_or_comparisons_is_refused(tmp_path):
    bad_axis = tmp_path / "a.yaml"
    bad_axis.write_text("axes: {learning_rate: [1]}\nrecipes: [baseline]\nseeds: [0]\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_grid(str(bad_axis))
    bad_pair = tmp_path / "b.yaml"
    bad_pair.write_text("axes: {microbatch_size: [1]}\nrecipes: [baseline]\nseeds: [0]\ncomparisons: [[presence, baseline]]\n")
    with pytest.raises(ConfigError, match="presence"):
        load_grid(str(bad_pair))
    with pytest.raises(ConfigError, match="scaling"):
        load_grid("no-such-grid")


def test_differences_per_cell_by_hand():
    runs = pd.DataFrame({"m": [1] * 6 + [4] * 4, "recipe": ["a", "a", "a", "b", "b", "b", "a", "a", "b", "b"],
                         "seed": [0, 1, 2, 0, 1, 2, 0, 1, 0, 1],
                         "final_heldout_loss": [1.0, 2.0, 3.0, 0.5, 1.0, 2.0, 5.0, 5.0, 4.0, 4.5],
                         "final_heldout_se": [0.1] * 10, "kish_n_stage2": [6.0] * 3 + [8.0] * 3 + [7.0] * 4})
    table = grid_differences(runs, ["m"], [("a", "b")]).set_index("m")
    # m = 1: differences 0.5, 1, 1 -> mean 5/6, sd 0.2887, se 0.1667
    assert table.loc[1, "delta"] == pytest.approx(5 / 6)
    assert table.loc[1, "se"] == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3))
    assert table.loc[1, "ci_high"] - table.loc[1, "delta"] == pytest.approx(4.302653 * math.sqrt(1 / 36), rel=1e-5)
    assert table.loc[4, "delta"] == pytest.approx(0.75) and table.loc[4, "n_pairs"] == 2
    assert table.loc[1, "kish_a_stage2"] == 6.0 and table.loc[1, "kish_b_stage2"] == 8.0
    # Holm over the grid's two rows: the smaller p doubled, the larger kept (at least the smaller's)
    p = sorted(table["t_p"])
    assert sorted(table["holm_p"]) == pytest.approx([2 * p[0], max(2 * p[0], p[1])])


def test_log_trend_by_hand():
    # x = 1, 2, 4 (log2: 0, 1, 2), y = 0, 1, 3, se 1: OLS slope 1.5, intercept -1/6; at x = 8 (log2 3): 13/3;
    # cov = (X'X)^-1 = [[5, -3], [-3, 3]] / 6, so var at [1, 3] = (5 - 18 + 27) / 6 = 7 / 3; chi2 = 1/6 < df = 1
    fit = log_trend([1, 2, 4], [0, 1, 3], [1, 1, 1], at=8)
    assert fit["slope_per_doubling"] == pytest.approx(1.5) and fit["predicted"] == pytest.approx(13 / 3)
    assert fit["predicted_se"] == pytest.approx(math.sqrt(7 / 3)) and fit["chi2"] == pytest.approx(1 / 6)
    assert fit["inflation"] == 1.0 and fit["df"] == 1
    assert fit["ci_high"] - fit["predicted"] == pytest.approx(1.959964 * math.sqrt(7 / 3), rel=1e-6)
    # cells that scatter more than their errors: the covariance grows by chi2 / df
    scattered = log_trend([1, 2, 4], [0, 3, 0], [0.1, 0.1, 0.1], at=8)
    assert scattered["inflation"] == pytest.approx(scattered["chi2"] / 1) and scattered["lack_of_fit_p"] < 1e-6
    # weights 1 / se^2: a cell with a tiny error pins the line
    pinned = log_trend([1, 2, 4], [0, 1, 3], [1, 1e-6, 1], at=2)
    assert pinned["predicted"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="two or more"):
        log_trend([4, 4], [1, 2], [1, 1], at=8)


def test_extrapolate_fits_each_comparison_of_a_grid():
    x = np.array([1, 4, 16])
    differences = pd.DataFrame({"m": np.concatenate([x, x]), "a": ["p"] * 3 + ["q"] * 3, "b": ["c"] * 6,
                                "delta": np.concatenate([0.1 * np.log2(x), 0.3 - 0.05 * np.log2(x)]),
                                "se": [0.01] * 6})
    trends = extrapolate(differences, "m", 128).set_index("a")
    assert trends.loc["p", "predicted"] == pytest.approx(0.7)  # an exact line: 0.1 * log2(128)
    assert trends.loc["q", "slope_per_doubling"] == pytest.approx(-0.05)
    assert trends.loc["q", "chi2"] == pytest.approx(0.0, abs=1e-12)


def _miniature_variant(tmp_path, name):
    """A preset YAML of the miniature runs the stage tests train, so that a grid can run on it."""
    raw = {"base": "tiny"}
    for item in MINI_DATA + MINI_MODEL + MINI_PRETRAIN:
        key, value = item.split("=", 1)
        section, _, field = key.partition(".")
        target = raw.setdefault(section, {})
        if "." in field:
            outer, field = field.split(".")
            target = target.setdefault(outer, {})
        target[field] = yaml.safe_load(value)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_run_grid_trains_what_is_missing_once_and_collects_one_row_per_run(tmp_path, artefacts, monkeypatch):
    run_grid = load_stage("03_pretrain/run_grid.py")
    pretrain = load_stage("03_pretrain/pretrain.py")
    variant = _miniature_variant(tmp_path, "tiny_grid")
    (artefacts / "tiny_grid").mkdir()
    (artefacts / "tiny_grid" / "data").symlink_to((artefacts / "tiny" / "data").resolve())
    grid = tmp_path / "mini.yaml"
    grid.write_text("axes: {microbatch_size: [1, 2]}\nrecipes: [baseline, presence, presence-matched]\nseeds: [0]\n"
                    "comparisons: [[presence-matched, baseline], [presence, presence-matched]]\n")
    results = tmp_path / "results"
    monkeypatch.setattr(run_grid, "results_dir", lambda preset, stage: results / preset / stage)
    trained = []

    def train(preset_arg, args):  # pretrain.py in-process, into the test's results
        name = run_grid.pretrain_all.run_name(args)
        trained.append(name)
        pretrain.main(pretrain.parse_args(args + ["--out", str(results / "tiny_grid" / "pretrain" / "runs" / name)]))

    monkeypatch.setattr(run_grid.pretrain_all, "ensure_run", train)
    options = dict(grid=str(grid), preset=str(variant), seeds=None, plan=False, collect=False)
    run_grid.main(run_grid.argparse.Namespace(**options))
    # 4 microbatches of 1 and of 2 rows (the miniature's batch is 8 = 4 x 2, so m = 2 is the preset itself)
    assert trained == ["baseline-batch_size4-s0", "presence-batch_size4-s0", "presence-matched-batch_size4-s0",
                       "baseline-s0", "presence-s0", "presence-matched-s0"]
    rows = csv_rows(results / "tiny_grid" / "mini" / "runs.csv")
    assert [(r["microbatch_size"], r["recipe"], r["batch_size"]) for r in rows] == [
        ("1", "baseline", "4"), ("1", "presence", "4"), ("1", "presence-matched", "4"),
        ("2", "baseline", "8"), ("2", "presence", "8"), ("2", "presence-matched", "8")]
    by_run = {r["run"]: r for r in rows}
    # the weight-matched control applies PRESENCE's weights in another order: the same Kish counts
    for stage in ("kish_n_stage1", "kish_n_stage2"):
        assert float(by_run["presence-matched-s0"][stage]) == pytest.approx(float(by_run["presence-s0"][stage]))
    assert float(by_run["baseline-s0"]["kish_n_stage2"]) == 4.0  # uniform weights over 4 microbatches
    assert all(float(r["final_heldout_se"]) > 0 for r in rows)
    trained.clear()
    assert run_grid.main(run_grid.argparse.Namespace(**options))["missing"] == 0 and trained == []


def _synthetic_runs(grid, effects, seed=0):
    """runs.csv rows of a grid: each recipe's loss is 5 + its effect in the cell + seed noise shared by the
    recipes of a seed (what pairing removes) + a little of its own."""
    rng = np.random.default_rng(seed)
    rows = []
    for cell in grid.cells():
        for s in grid.seeds_of(cell):
            shared = rng.normal(0, 0.05)
            for recipe in grid.recipes:
                rows.append({**cell, "recipe": recipe, "seed": s, "final_heldout_loss": 5 + effects(recipe, cell)
                             + shared + rng.normal(0, 0.002), "final_heldout_se": 0.01,
                             "kish_n_stage2": 8.0 if recipe == "baseline" else 6.0})
    return pd.DataFrame(rows)


def test_figures_of_the_committed_grids_from_synthetic_runs(tmp_path):
    figures = load_stage("05_figures/make_figures.py")
    scaling = load_grid("scaling")
    # reweighting costs 0.1 at m = 1, halving per quadrupling of m; PRESENCE gains 0.02 over its control
    cost = lambda m: 0.1 * 2 ** (-math.log2(m) / 2)  # noqa: E731
    effects = lambda r, c: {"baseline": 0.0, "presence-matched": cost(c["microbatch_size"]),  # noqa: E731
                            "presence": cost(c["microbatch_size"]) - 0.02,
                            "presence-loss": cost(c["microbatch_size"])}[r]
    made = figures.write_grid(scaling, _synthetic_runs(scaling, effects), tmp_path / "scaling", "tiny")
    assert made == "16 differences, 4 trends"
    differences = pd.read_csv(tmp_path / "scaling" / "differences.csv")
    info = differences[(differences["a"] == "presence") & (differences["b"] == "presence-matched")]
    assert np.allclose(info["delta"], -0.02, atol=0.005)
    trends = pd.read_csv(tmp_path / "scaling" / "extrapolation.csv").set_index(["a", "b"])
    assert set(trends["at"]) == {128} and (tmp_path / "scaling" / "scaling.png").stat().st_size > 10_000
    # the cost halves per quadrupling: -0.025 per doubling at m = 1..4, flattening after (a line cannot follow)
    assert trends.loc[("presence-matched", "baseline"), "slope_per_doubling"] < 0
    assert trends.loc[("presence", "presence-matched"), "predicted"] == pytest.approx(-0.02, abs=0.01)
    readme = (tmp_path / "scaling" / "README.md").read_text()
    assert "## Extrapolation" in readme and "presence − baseline" in readme
    schedule = load_grid("schedule")
    effects = lambda r, c: 0.0 if r == "baseline" else 0.05 * c["tau_magnitude"] - (0.01 if r == "presence" else 0)  # noqa: E731
    assert figures.write_grid(schedule, _synthetic_runs(schedule, effects), tmp_path / "schedule", "tiny") == \
        "36 differences"
    differences = pd.read_csv(tmp_path / "schedule" / "differences.csv")
    versus_baseline = differences[differences["b"] == "baseline"]
    assert np.allclose(versus_baseline["delta"], 0.05 * versus_baseline["tau_magnitude"] - 0.01, atol=0.005)
    assert (tmp_path / "schedule" / "schedule.png").is_file()

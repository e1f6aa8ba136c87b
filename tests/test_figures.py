"""05_figures' figures: each plotting function writes a non-empty PNG whose Figure carries the
expected title, labelled axes and a legend; missing inputs skip a figure with its reason; and
make_figures.py runs end to end on a small synthetic results tree."""
import importlib.util
import json
import shutil
import sys

import pandas as pd
import pytest

import common.reporting.plotting as plotting
from common.config import load_preset, preset_argument
from common.paths import REPO_ROOT
from synthetic_results import add_repeat_run, write_synthetic_noise_results, write_synthetic_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_make_figures():
    path = REPO_ROOT / "05_figures" / "make_figures.py"
    spec = importlib.util.spec_from_file_location("make_figures", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_figures"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def low_dpi(monkeypatch):
    monkeypatch.setattr(plotting, "DPI", 40)  # the tests read Figure objects, not pixels


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    write_synthetic_results(root, "tiny")
    make_figures = load_make_figures()
    notes = []
    return make_figures.load_inputs(lambda stage: root / "tiny" / stage, load_preset("tiny"), notes)


def assert_readable(fig, out_png, title: str, axes_titles: list[str]):
    """A non-empty PNG; the suptitle; every visible axes with a y label and an x label (or sharing x
    with a labelled one); the expected axes titles; a legend somewhere."""
    assert out_png.read_bytes()[:8] == PNG_MAGIC and out_png.stat().st_size > 1000
    assert title in fig._suptitle.get_text()
    visible = [ax for ax in fig.axes if ax.get_visible()]
    for ax in visible:
        assert ax.get_ylabel(), f"axes {ax.get_title()!r} has no y label"
        siblings = ax.get_shared_x_axes().get_siblings(ax)
        assert any(a.get_xlabel() for a in siblings), f"axes {ax.get_title()!r} has no x label"
    titles = " | ".join(ax.get_title() for ax in visible)
    for expected in axes_titles:
        assert expected in titles
    assert fig.legends or any(ax.get_legend() for ax in visible)


def test_figure1(inputs, tmp_path):
    out = tmp_path / "f1.png"
    fig = plotting.plot_figure1(inputs["si_scores"], out, " (preset tiny)")
    assert_readable(fig, out, "Figure 1", ["clean vs word-order-jumbled", "random vs domain-mismatched"])
    # the headline uses layer set "first" at the last checkpoint: 60 samples per language and condition
    assert "layer set 'first'" in fig._suptitle.get_text() and "step 200" in fig._suptitle.get_text()
    assert "n=60 per language" in " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())


def test_figure3_marks_the_stages(inputs, tmp_path):
    out = tmp_path / "f3.png"
    logs = inputs["logs"][inputs["logs"]["standard"]]
    fig = plotting.plot_training_loss(logs, out, switch_step=20)
    assert_readable(fig, out, "Figure 3", ["Training loss", "Difference"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("direct stage" in label and "I = 20" in label for label in labels)
    assert any("inverse stage" in label for label in labels)
    assert any(label.startswith("baseline (n=2 seeds") for label in labels)
    bottom = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert any("direct stage" in label for label in bottom)
    assert any("PRESENCE − presence-shuffled, held-out loss" in label for label in bottom)


def test_smoothing_leaves_the_ends_out_instead_of_shortening_the_window():
    values = pd.Series([10.0, 0, 0, 0, 0, 0])
    smoothed = plotting.smooth(values, 3)
    assert smoothed.isna().tolist() == [True, False, False, False, False, True]
    assert smoothed.tolist()[1:5] == pytest.approx([10 / 3, 0, 0, 0])


def test_figure4(inputs, tmp_path):
    out = tmp_path / "f4.png"
    logs = inputs["logs"][inputs["logs"]["standard"]]
    fig = plotting.plot_presence_vs_sequential(logs, inputs["downstream"], out)
    assert_readable(fig, out, "Figure 4", ["Training loss", "Held-out loss", "Downstream"])


def test_figure4_draws_each_task_s_own_chance_level(inputs, tmp_path):
    """Over each task's bars: its chance level, from the language averages (verse retrieval: 1 of the 200
    candidates, 0.5%, not 100%); none for F1."""
    logs = inputs["logs"][inputs["logs"]["standard"]]
    fig = plotting.plot_presence_vs_sequential(logs, inputs["downstream"], tmp_path / "f4.png")
    bars = fig.axes[2]
    tasks = [t.get_text() for t in bars.get_xticklabels()]
    levels = {}
    for collection in bars.collections:
        for (x0, y0), (x1, y1) in collection.get_segments():
            if y0 == y1 and x1 - x0 == pytest.approx(0.9):  # a chance line spans its group of bars
                levels[tasks[round((x0 + x1) / 2)]] = y0
    assert levels == {"xnli": pytest.approx(100 / 3), "pawsx": pytest.approx(50.0),
                      "verse retrieval": pytest.approx(0.5)}


def test_figure5_puts_the_baseline_at_tau_zero(inputs, tmp_path):
    out = tmp_path / "f5.png"
    logs = inputs["logs"][inputs["logs"]["standard"]]
    fig = plotting.plot_single_stage_tau(logs, inputs["runs"], inputs["downstream"], out)
    assert_readable(fig, out, "Figure 5", ["per constant temperature", "held-out loss vs τ", "Downstream score vs τ"])
    taus = plotting.single_stage_runs(inputs["runs"]).set_index("run_name")["tau"]
    assert taus["baseline-s0"] == 0 and taus["presence-D-s0"] == 1 and taus["presence-I-s0"] == -1
    assert taus["presence-single-tau+2-s0"] == 2


def test_figure5_says_which_temperatures_were_not_fine_tuned(inputs, tmp_path):
    """Only the baseline (τ = 0) fine-tuned, as at tiny: the score panel names the runs without scores and keeps
    the axis of the other temperatures, instead of showing one point and nothing else."""
    logs = inputs["logs"][inputs["logs"]["standard"]]
    baseline_only = inputs["downstream"][inputs["downstream"]["variant"] == "baseline"]
    fig = plotting.plot_single_stage_tau(logs, inputs["runs"], baseline_only, tmp_path / "f5.png")
    loss_ax, score_ax = fig.axes[1], fig.axes[2]
    text = " ".join(t.get_text() for t in score_ax.texts)
    assert text.startswith("not fine-tuned:")
    for line in ("τ = -2: presence-single, 1 of 1 runs", "τ = -1: presence-I, 1 of 1 runs",
                 "τ = +1: presence-D, 1 of 1 runs", "τ = +2: presence-single, 1 of 1 runs"):
        assert line in text
    assert "τ = 0" not in text and score_ax.get_xlim() == loss_ax.get_xlim()


def test_schedules(inputs, tmp_path):
    out = tmp_path / "sched.png"
    fig = plotting.plot_schedules(inputs["logs"], out, switch_step=20)
    assert_readable(fig, out, "Schedules", ["Learning rate", "Temperature τ"])
    strip_labels = {t.get_text() for ax in fig.axes[1:] for t in ax.texts}
    assert {"presence", "presence (I=50)", "presence-I-D"} <= strip_labels  # one strip per recipe


def test_weights_over_training_marks_uniform(inputs, tmp_path):
    out = tmp_path / "w.png"
    fig = plotting.plot_weights_over_training(inputs["logs"], inputs["runs"], out, switch_step=20)
    assert_readable(fig, out, "Reweighting over training", ["Entropy", "Largest weight", "Mean self-influence"])
    assert any("ln 8 = 2.08" in t.get_text() for t in fig.axes[0].texts)


def test_si_overhead(inputs, tmp_path):
    out = tmp_path / "bench.png"
    fig = plotting.plot_si_overhead(inputs["bench"], out)
    assert_readable(fig, out, "Cost of self-influence", ["device: cpu"])
    labels = " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert "1.30×" in labels and "1.10× (CPU)" in labels and "1.50×" in labels
    assert any("axis cut" in t.get_text() for t in fig.axes[0].texts)  # the 9x naive bar


def test_xtreme_per_language(inputs, tmp_path):
    out = tmp_path / "lang.png"
    fig = plotting.plot_xtreme_per_language(inputs["xtreme"], inputs["retrieval"], out)
    assert_readable(fig, out, "Per-language scores", ["XNLI accuracy (zero-shot)", "verse retrieval accuracy"])


@pytest.mark.parametrize("draw", [
    lambda out: plotting.plot_figure1(pd.DataFrame(columns=["lang", "condition", "si"]), out),
    lambda out: plotting.plot_training_loss(pd.DataFrame(columns=["variant", "step", "loss", "run_name"]), out, 20),
    lambda out: plotting.plot_si_overhead(None, out),
    lambda out: plotting.plot_xtreme_per_language(None, None, out),
])
def test_nothing_to_draw_raises_with_reason(draw, tmp_path):
    with pytest.raises(plotting.MissingInputError):
        draw(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_make_figures_on_an_offline_run_without_finetuning(tmp_path):
    """Pre-training runs of the baseline and PRESENCE only (no XTREME, SI analysis or benchmark): the
    tables show our held-out loss as the only measure, the figures needing the rest are skipped with
    reasons, and a stale PNG of a skipped figure is removed."""
    write_synthetic_results(tmp_path, "tiny", finetune=False, si=False, bench=False, methods=("baseline", "presence"))
    stale = tmp_path / "tiny" / "figures" / "si_overhead.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_MAGIC)
    make_figures = load_make_figures()
    result = make_figures.main(make_figures.parse_args(["--preset", "tiny", "--results-root", str(tmp_path)]))
    status = result["figures"]
    assert status["figure3_training_loss.png"] == "made" and status["weights_over_training.png"] == "made"
    assert status["si_overhead.png"].startswith("skipped: bench results are missing")
    assert status["figure4_presence_vs_sequential.png"].startswith("skipped: needs PRESENCE and at least one")
    assert status["figure1_si_noise_domain.png"].startswith("skipped")
    assert not stale.exists()
    tables = tmp_path / "tiny" / "tables"
    table3 = pd.read_csv(tables / "table3_main.csv", keep_default_na=False)
    assert set(table3[table3["task"] == "xnli"]["note"]) == {"not run"}
    loss = table3[(table3["task"] == "heldout_loss") & (table3["method"] == "presence")].iloc[0]
    assert float(loss["ours_mean"]) > 0 and loss["paper_value"] == ""
    headline = (tables / "headline.md").read_text()
    assert "not tested here" in headline and "figure3_training_loss.png" in headline
    assert "figure1_si_noise_domain.png" not in headline  # skipped figures are not linked
    index = (tmp_path / "tiny" / "figures" / "README.md").read_text()
    assert "skipped: bench results are missing" in index and "[figure3_training_loss.png]" in index
    assert "the information control (PRESENCE-shuffled) was not run" in headline


@pytest.mark.slow
def test_make_figures_compares_presence_with_its_control(tmp_path):
    """The synthetic runs' held-out rows differ by their offsets: PRESENCE −0.05, the control −0.01, so
    the paired Δ PRESENCE − control is −0.04 in every seed (seed std 0)."""
    write_synthetic_results(tmp_path, "tiny", finetune=False, si=False, bench=False,
                            methods=("baseline", "presence", "presence-shuffled"))
    make_figures = load_make_figures()
    make_figures.main(make_figures.parse_args(["--preset", "tiny", "--results-root", str(tmp_path)]))
    table3 = pd.read_csv(tmp_path / "tiny" / "tables" / "table3_main.csv", keep_default_na=False)
    loss = table3[(table3["task"] == "heldout_loss") & (table3["method"] == "presence")].iloc[0]
    assert float(loss["ours_delta_vs_control"]) == pytest.approx(-0.04)
    assert float(loss["ours_delta_vs_control_seed_std"]) == pytest.approx(0.0, abs=1e-9)
    assert float(loss["ours_delta_vs_baseline"]) == pytest.approx(-0.05)
    text = (tmp_path / "tiny" / "tables" / "table3_main.md").read_text()
    assert "| PRESENCE-shuffled (control) | ours (tiny) |" in text and "Δ PRESENCE − PRESENCE-shuffled" in text
    comparisons = pd.read_csv(tmp_path / "tiny" / "tables" / "comparisons.csv").set_index(["a", "b"])
    assert list(comparisons.index) == [("presence-shuffled", "baseline"), ("presence", "baseline"),
                                       ("presence", "presence-shuffled")]
    assert comparisons.loc[("presence", "presence-shuffled"), "delta"] == pytest.approx(-0.04)
    assert (comparisons["n_pairs"] == 2).all()
    assert "| presence − presence-shuffled | 2 (0,1) |" in (tmp_path / "tiny" / "tables" / "comparisons.md").read_text()


@pytest.mark.slow
def test_a_recipe_run_twice_for_a_seed_counts_once(tmp_path):
    """A second finished run of a recipe and seed (here with all its losses and scores 1 and 10 higher) is
    left out of every table and figure, with a note: the run named as pretrain.py names the recipe's run is
    used; when none is, the first by name."""
    base = write_synthetic_results(tmp_path, "tiny", si=False, bench=False,
                                   methods=("baseline", "presence", "presence-shuffled"))
    make_figures = load_make_figures()
    args = make_figures.parse_args(["--preset", "tiny", "--results-root", str(tmp_path)])
    first = make_figures.main(args)
    tables = {p.name: p.read_text() for p in (base / "tables").glob("*.csv")}
    add_repeat_run(base, "presence-s0", "presence-resume-check-s0")
    # seed 1: no run has the default name presence-s1; the first by name, presence-b-s1, is the original
    add_repeat_run(base, "presence-s1", "presence-b-s1", shift=0.0)
    add_repeat_run(base, "presence-s1", "presence-z-s1")
    shutil.rmtree(base / "pretrain" / "runs" / "presence-s1")
    for scores in ("xtreme.csv", "retrieval.csv"):
        frame = pd.read_csv(base / "finetune" / scores)
        frame[frame["run"] != "presence-s1"].to_csv(base / "finetune" / scores, index=False)
    again = make_figures.main(args)
    assert again["figures"] == first["figures"]
    assert {p.name: p.read_text() for p in (base / "tables").glob("*.csv")} == tables
    notes = " | ".join(again["notes"])
    assert ("recipe 'presence', seed 0, has 2 finished runs (presence-resume-check-s0, presence-s0): tables and "
            "figures use presence-s0 (named as 03_pretrain/pretrain.py names this recipe's run) and leave out "
            "presence-resume-check-s0") in notes
    assert ("use presence-b-s1 (the first by name; none is named presence-s1, as pretrain.py would name it) and "
            "leave out presence-z-s1") in notes
    assert "scores of presence-resume-check-s0, presence-z-s1 left out" in notes
    headline = (base / "tables" / "headline.md").read_text()
    assert "`presence-s0`" in headline and "presence-resume-check-s0" not in headline


def test_headline_commands_name_a_variant_by_its_file():
    """A variant has no presets/<name>.yaml, so `--preset tiny_x10` would not load: the headline's
    commands must give its path, relative to the repository wherever the user typed it from."""
    variant = REPO_ROOT / "presets" / "variants" / "tiny_x10.yaml"
    assert preset_argument(str(variant)) == "presets/variants/tiny_x10.yaml"
    assert preset_argument("tiny") == "tiny"
    assert preset_argument("tiny_x10") == "presets/variants/tiny_x10.yaml"  # a stage knows only preset.name
    assert preset_argument("/elsewhere/mine.yaml") == "/elsewhere/mine.yaml"
    assert load_preset(str(REPO_ROOT / preset_argument(str(variant)))).name == "tiny_x10"


def test_update_readme_replaces_only_the_marked_block(tmp_path, monkeypatch):
    path = REPO_ROOT / "05_figures" / "update_readme.py"
    spec = importlib.util.spec_from_file_location("update_readme", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    headline = tmp_path / "tiny" / "tables" / "headline.md"
    headline.parent.mkdir(parents=True)
    headline.write_text("### Results\n| a |\n")
    monkeypatch.setattr(module, "results_dir", lambda preset, stage: tmp_path / preset / stage)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n<!-- results:begin -->\nold table\n<!-- results:end -->\n## Set-up\n")
    module.main(module.parse_args(["--preset", "tiny", "--readme", str(readme)]))
    expected = "# Title\n<!-- results:begin -->\n### Results\n| a |\n<!-- results:end -->\n## Set-up\n"
    assert readme.read_text() == expected


def test_score_error_bars_stay_inside_0_to_100():
    yerr = plotting.score_yerr([0.03, 50.0, 99.0], [0.04, 5.0, 3.0])
    assert yerr.ravel().tolist() == pytest.approx([0.03, 5.0, 3.0, 0.04, 5.0, 1.0])


def test_chance_levels_are_drawn_where_a_task_has_one(inputs, tmp_path):
    fig = plotting.plot_xtreme_per_language(inputs["xtreme"], inputs["retrieval"], tmp_path / "x.png")
    lines = {ax.get_title().split(" ")[0]: [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
             for ax in fig.axes}
    assert lines["XNLI"] == [pytest.approx(100 / 3)] and lines["PAWS-X"] == [pytest.approx(50.0)]
    assert lines["verse"] == [pytest.approx(100 / 200)]  # 1 of n_examples = 200 candidates
    assert lines["XQuAD"] == []  # F1: no chance level


def test_per_language_panels_at_the_floor_are_drawn_on_a_fixed_scale(tmp_path):
    """MLQA F1 of 0.1-0.4% and retrieval at its chance (0.5%) are floor noise: a fixed 0-10% scale and a
    note, not an axis that makes 0.1 and 0.4 look far apart; XNLI at 40% keeps its own scale."""
    rows = [{"run": f"{v}-s0", "variant": v, "seed": 0, "task": task, "setting": "zero-shot", "lang": lang,
             "metric": metric, "value": value, "n_examples": 200, "chance": chance}
            for v, shift in (("baseline", 0.0), ("presence", 0.3))
            for task, metric, chance, base in (("mlqa", "f1", None, 0.1), ("xnli", "accuracy", 100 / 3, 40.0),
                                               ("verse_retrieval", "accuracy", 0.5, 0.3))
            for lang, value in (("de", base + shift), ("hi", base + 2 * shift))]
    frame = pd.DataFrame(rows)
    fig = plotting.plot_xtreme_per_language(frame[frame["task"] != "verse_retrieval"],
                                            frame[frame["task"] == "verse_retrieval"], tmp_path / "x.png")
    panels = {ax.get_title().split(" ")[0]: ax for ax in fig.axes}
    for name, top, note in (("MLQA", 10.0, "within 0.7 points of 0"), ("verse", 10.5, "within 0.4 points of chance")):
        assert panels[name].get_ylim() == (0.0, top)
        assert note in " ".join(t.get_text() for t in panels[name].texts)
    assert not panels["XNLI"].texts and panels["XNLI"].get_ylim()[1] > 40


def test_noise_figures(tmp_path):
    write_synthetic_noise_results(tmp_path, "tiny")
    make_figures = load_make_figures()
    notes = []
    inputs = make_figures.load_inputs(lambda stage: tmp_path / "tiny" / stage,
                                      load_preset("tiny", ["data.noise_rates=[0.2]"]), notes)
    out = tmp_path / "noise.png"
    fig = plotting.plot_noise_experiment(inputs["logs"], inputs["runs"], inputs["noise_runs"], out, switch_step=20)
    assert_readable(fig, out, "known-noise experiment", ["Weight on the noisy rows", "self-influence rank the noisy",
                                                         "Final held-out loss"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(label.startswith("presence (per-sample) (n=2 seeds") for label in labels)
    assert any("noisy share of the batch (mean 0.200)" in label for label in labels)
    out = tmp_path / "granularity.png"
    fig = plotting.plot_noise_granularity(inputs["granularity"], out)
    assert_readable(fig, out, "Granularity", ["still track the noise", "Weight on the noisy rows"])


@pytest.mark.slow
def test_make_figures_marks_what_a_reproduction_reused(tmp_path, monkeypatch):
    """Runs and evaluations made before --since are reused: their cells get †, provenance.md and the
    figure index say which and why; the ones made after are regenerated."""
    write_synthetic_results(tmp_path, "tiny", si=False, bench=False, methods=("baseline", "presence"))
    runs_dir = tmp_path / "tiny" / "pretrain" / "runs"
    artefacts = tmp_path / "artefacts"
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(artefacts))
    monkeypatch.delenv("PRESENCE_XTREME_DIR", raising=False)
    for name, when in (("baseline-s0", "2026-01-02T00:00:00+00:00"), ("presence-s0", "2026-01-02T00:00:00+00:00"),
                       ("baseline-s1", "2025-12-31T00:00:00+00:00"), ("presence-s1", "2025-12-31T00:00:00+00:00")):
        (runs_dir / name / "environment.json").write_text(json.dumps({"time_utc": when}))
    for run in ("baseline-s0", "presence-s0"):  # retrieval re-evaluated for the retrained runs only
        folder = artefacts / "tiny" / "finetune" / run / "verse_retrieval" / "zero-shot"
        folder.mkdir(parents=True)
        (folder / "environment.json").write_text(json.dumps({"time_utc": "2026-01-02T01:00:00+00:00"}))
    make_figures = load_make_figures()
    make_figures.main(make_figures.parse_args(["--preset", "tiny", "--results-root", str(tmp_path),
                                               "--since", "2026-01-01T00:00:00"]))
    provenance = (tmp_path / "tiny" / "tables" / "provenance.md").read_text()
    assert "| pre-training run | baseline-s0 | regenerated |  |" in provenance
    assert "| pre-training run | baseline-s1 | reused | not in make reproduce's fast path" in provenance
    assert "| fine-tuning | presence-s0 / verse_retrieval / zero-shot | regenerated |" in provenance
    assert "presence-s0 / xnli / zero-shot | reused | XTREME data absent" in provenance
    table3 = (tmp_path / "tiny" / "tables" / "table3_main.md").read_text()
    assert "(n=2) †" in table3 and "† includes numbers reused" in table3
    index = (tmp_path / "tiny" / "figures" / "README.md").read_text()
    assert "reused rather than regenerated" in index and "baseline-s1" in index

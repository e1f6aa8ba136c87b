"""03_pretrain/pretrain.py end to end on the miniature data: exact resume, NaN handling, and 2-process
data parallelism giving the single-process run."""
import argparse
import csv
import os
import subprocess
import sys

import pytest
import torch

import common.presence.train_step as train_step_module
from common.checkpoint import latest_checkpoint
from common.config import ConfigError
from common.data.packed_data import SpanCorruptionBatches
from common.paths import REPO_ROOT
from conftest import csv_rows, final_weights, free_port, load_stage, pretrain_args

pretrain = load_stage("03_pretrain/pretrain.py")
SCRIPT = str(REPO_ROOT / "03_pretrain" / "pretrain.py")
NOISY = ["--noise-rate", "0.3", "--set", "data.noise_rates=[0.3]"]  # the rate tests/conftest.py's data build has


def losses(run_dir):
    with open(run_dir / "train_log.csv") as f:
        return [(int(r["step"]), r["loss"], r["heldout_loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("method", [["--method", "presence"],
                                    ["--method", "presence-shuffled", "--per", "sample", *NOISY]],
                         ids=["presence", "shuffled-per-sample-noisy"])
def test_resume_is_exact(tmp_path, artefacts, method):
    pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "whole", *method)))
    pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "halves", *method, "--steps", "3")))
    pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "halves", *method, "--resume")))
    for log in ("train_log.csv", "heldout.csv", "heldout_rows.csv", "step_weights.csv") + (
            ("noise_log.csv",) if NOISY[1] in method else ()):
        whole, halves = (csv_rows(tmp_path / run / log, drop=["seconds", "run"]) for run in ("whole", "halves"))
        assert whole == halves, log
    assert [step for step, _, _ in losses(tmp_path / "whole")] == [1, 2, 3, 4, 5, 6]
    whole, halves = final_weights(artefacts, "whole"), final_weights(artefacts, "halves")
    assert whole.keys() == halves.keys()
    assert all(torch.equal(whole[k], halves[k]) for k in whole)


def test_heldout_files_cover_the_split_per_language(tmp_path, artefacts):
    pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "run", "--method", "baseline")))
    heldout = csv_rows(tmp_path / "run" / "heldout.csv")
    assert sorted({(r["step"], r["lang"]) for r in heldout}) == [(s, lang) for s in ("3", "6") for lang in ("all", "en", "hi")]
    per_row = csv_rows(tmp_path / "run" / "heldout_rows.csv")
    split_rows = SpanCorruptionBatches(artefacts / "tiny" / "data", "heldout", 1, seed=0).num_rows
    assert len(per_row) == split_rows
    final = {r["lang"]: r for r in heldout if r["step"] == "6"}
    for lang in ("en", "hi"):
        mine = [float(r["loss"]) for r in per_row if r["lang"] == lang]
        assert float(final[lang]["loss"]) == pytest.approx(sum(mine) / len(mine), rel=1e-12)
        assert int(final[lang]["n_rows"]) == len(mine)
    logged = [r for r in csv_rows(tmp_path / "run" / "train_log.csv") if r["heldout_loss"]]
    assert [float(r["heldout_loss"]) for r in logged] == [float(r["loss"]) for r in heldout if r["lang"] == "all"]


def test_noise_run_logs_what_the_labels_say(tmp_path, artefacts):
    """The noisy shares of batch and weight are recomputed here from the loader's rows and the labels."""
    pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "noisy", "--method", "presence", *NOISY,
                                               "--set", "pretrain.noise_log_every=2")))
    loader = SpanCorruptionBatches(artefacts / "tiny" / "data", "train", 8, seed=0, noise_rate=0.3)
    log = csv_rows(tmp_path / "noisy" / "train_log.csv")
    for r in log:
        labels = loader.noise_labels[loader.batch_rows(int(r["step"]) - 1)]
        assert float(r["noisy_batch_share"]) == pytest.approx((labels > 0).mean())
        assert 0 <= float(r["noisy_weight_share"]) <= 1 and float(r["kish_n"]) <= 4 + 1e-9
        assert 0 < float(r["z_variance_share"]) <= 1
        assert (r["si_noise_auroc"] != "") == (int(r["step"]) % 2 == 0 and 0 < (labels > 0).sum() < 8)
    kinds = csv_rows(tmp_path / "noisy" / "noise_log.csv")
    assert {r["kind"] for r in kinds} == {"all", "jumbled", "random", "python"}
    for step in ("1", "4"):
        mine = {r["kind"]: r for r in kinds if r["step"] == step}
        assert sum(float(mine[k]["weight_share"]) for k in ("jumbled", "random", "python")) == \
            pytest.approx(float(mine["all"]["weight_share"]))
    metrics = __import__("json").loads((tmp_path / "noisy" / "metrics.json").read_text())
    assert metrics["noise_rate"] == 0.3


def test_the_oracle_gives_noisy_rows_no_weight(tmp_path, artefacts):
    pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "oracle", "--method", "noise-oracle", *NOISY)))
    log = csv_rows(tmp_path / "oracle" / "train_log.csv")
    assert all(float(r["noisy_weight_share"]) == 0 for r in log)
    assert any(float(r["noisy_batch_share"]) > 0 for r in log)
    with pytest.raises(ConfigError, match="noisy data"):
        pretrain.get_config(pretrain.parse_args(["--method", "noise-oracle"]))
    with pytest.raises(ConfigError, match="noise_rates"):
        pretrain.get_config(pretrain.parse_args(["--method", "presence", "--noise-rate", "0.4"]))


@pytest.mark.parametrize("nan_step, kept", [(6, "step-4"), (5, "step-2")])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, artefacts, monkeypatch, nan_step, kept):
    """Checkpoints come every 2 steps. A NaN at step 6 keeps step-4 (step 5 ran finite after it); a NaN at
    step 5, right after step-4 was saved, drops step-4 as the likely cause and falls back to step-2."""
    real_step = train_step_module.update_direction
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        stats = real_step(*args, **kwargs)
        return stats if calls["n"] < nan_step else type(stats)(float("nan"), stats.scores, stats.weights)

    monkeypatch.setattr(train_step_module, "update_direction", poisoned)
    with pytest.raises(FloatingPointError, match=f"step {nan_step} of nan: loss is nan") as error:
        pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "nan", "--method", "presence")))
    assert f"resumes from its checkpoint of step {kept[5:]}" in str(error.value) and "--resume" in str(error.value)
    checkpoints = artefacts / "tiny" / "pretrain" / "nan" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == kept
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [kept]
    assert [step for step, _, _ in losses(tmp_path / "nan")] == list(range(1, nan_step))


@pytest.mark.parametrize("per", ["microbatch", "sample"])
def test_the_weight_matched_control_replays_presence_weights(tmp_path, artefacts, per):
    """Each step the control applies the multiset of weights its paired PRESENCE run applied (so the same
    largest weight and Kish count), in another order; without that run it refuses."""
    extra = ["--per", per, "--seed", "1"]
    matched = pretrain_args(tmp_path, "matched", "--method", "presence-matched", "--paired-run", "paired", *extra)
    with pytest.raises(ConfigError, match="replays the weights of the presence run .*paired.*Fix: train it first"):
        pretrain.main(pretrain.parse_args(matched))
    pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "paired", "--method", "presence", *extra)))
    pretrain.main(pretrain.parse_args(matched))
    presence, control = (csv_rows(tmp_path / name / "train_log.csv") for name in ("paired", "matched"))
    for a, b in zip(presence, control):
        assert float(a["max_weight"]) == pytest.approx(float(b["max_weight"]), rel=1e-12)
        assert float(a["kish_n"]) == pytest.approx(float(b["kish_n"]), rel=1e-12)
        assert a["si_loss_spearman"] != "" and a["tau"] != "" and b["tau"] == ""
    logged = [list(map(float, r["weights"].split())) for r in csv_rows(tmp_path / "paired" / "step_weights.csv")]
    assert len(logged) == len(presence) and all(sum(w) == pytest.approx(1.0) for w in logged)
    other_seed = pretrain_args(tmp_path, "matched2", "--method", "presence-matched", "--paired-run", "paired",
                               "--per", per, "--seed", "2")
    with pytest.raises(ConfigError, match="differs in seed"):
        pretrain.main(pretrain.parse_args(other_seed))


def test_the_baseline_logs_si_and_loss_when_asked(tmp_path, artefacts):
    """pretrain.log_si_loss: the baseline's log gets the within-step Spearman of SI and loss, and its losses
    stay the baseline's (PRESENCE's step at tau = 0 is the same update to float rounding)."""
    pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "plain", "--method", "baseline")))
    pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "measured", "--method", "baseline",
                                                    "--set", "pretrain.log_si_loss=true")))
    plain, measured = (csv_rows(tmp_path / name / "train_log.csv") for name in ("plain", "measured"))
    assert all(r["si_loss_spearman"] == "" for r in plain)
    assert all(-1 <= float(r["si_loss_spearman"]) <= 1 for r in measured)
    for a, b in zip(plain, measured):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)
    assert not (tmp_path / "measured" / "step_weights.csv").exists()


def test_chunks_and_checkpointing_train_the_same_run(tmp_path, artefacts):
    """Microbatches of 2 rows as 2 chunks of 1, and activation checkpointing: the same losses as the plain
    run to float rounding; neither is part of the run's recipe."""
    pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "plain", "--method", "presence")))
    pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "chunked", "--method", "presence", "--set",
                                                    "pretrain.microbatch_chunks=2", "--set",
                                                    "pretrain.activation_checkpointing=true")))
    plain, chunked = (csv_rows(tmp_path / name / "train_log.csv") for name in ("plain", "chunked"))
    for a, b in zip(plain, chunked):
        for column in ("loss", "si_mean", "max_weight"):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-4), column
    name = lambda *words: pretrain.default_run_name(pretrain.parse_args(list(words)))  # noqa: E731
    assert name("--set", "pretrain.microbatch_chunks=2") == "presence-s0"
    with pytest.raises(ConfigError, match="activation_checkpointing.*Fix: use --per microbatch"):
        pretrain.get_config(pretrain.parse_args(["--per", "sample", "--set", "pretrain.activation_checkpointing=true"]))
    with pytest.raises(ConfigError, match="microbatch_chunks: 3 chunks cannot split microbatches of 4 rows"):
        pretrain.get_config(pretrain.parse_args(["--set", "pretrain.microbatch_chunks=3"]))


def test_bad_options_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="--method"):
        pretrain.get_config(pretrain.parse_args(["--method", "presence-xl"]))
    with pytest.raises(ConfigError, match="--tau"):
        pretrain.get_config(pretrain.parse_args(["--method", "presence-single"]))
    with pytest.raises(ConfigError, match="num_microbatches"):
        pretrain.get_config(pretrain.parse_args(["--set", "pretrain.num_microbatches=5"]))
    with pytest.raises(ConfigError, match=r"pretrain.switch_step: 20 is outside \[0, steps=10\]"):
        pretrain.get_config(pretrain.parse_args(["--steps", "10"]))  # PRESENCE reads I


def test_a_knob_the_method_does_not_read_is_not_checked_against_it():
    """I = 20 of tiny is beyond 10 steps: refused for PRESENCE (above), not for methods that ignore I."""
    for method in ("baseline", "presence-D", "presence-linear"):
        preset, chosen = pretrain.get_config(pretrain.parse_args(["--method", method, "--steps", "10"]))
        assert preset.pretrain.steps == 10 and chosen.name == method


def test_overrides_that_change_the_recipe_change_the_default_name():
    name = lambda *words: pretrain.default_run_name(pretrain.parse_args(list(words)))  # noqa: E731
    assert name("--method", "presence") == "presence-s0"  # the committed run's name
    assert name("--method", "presence", "--steps", "30") == "presence-steps30-s0"
    assert name("--method", "presence", "--set", "pretrain.steps=30") == "presence-steps30-s0"
    assert name("--method", "baseline", "--steps", "10", "--seed", "2") == "baseline-steps10-s2"
    assert name("--method", "presence", "--set", "pretrain.peak_lr=0.001") == "presence-peak_lr0.001-s0"
    assert name("--method", "presence", "--switch-step", "50", "--per", "sample") == "presence-I50-per-sample-s0"
    assert name("--method", "presence", "--switch-step", "20") == "presence-s0"  # the preset's own I
    assert name("--method", "baseline", "--switch-step", "50") == "baseline-s0"  # I is not the baseline's
    # how often a run logs or saves is not its recipe
    assert name("--method", "presence", "--set", "pretrain.save_every=7") == "presence-s0"
    assert name("--method", "presence-single", "--tau", "2", "--si-layers", "all") == "presence-single-tau+2-si-all-s0"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [[], ["--per", "sample", "--set", "distributed.strategy=fsdp"]],
                         ids=["replicate-per-microbatch", "fsdp-per-sample"])
def test_two_gloo_processes_train_like_one(tmp_path, artefacts, recipe):
    env = {**os.environ, "PRESENCE_ARTEFACTS": str(artefacts), "OMP_NUM_THREADS": "1"}
    single = pretrain_args(tmp_path, "single", "--method", "presence", "--steps", "4", *recipe[:2])
    subprocess.run([sys.executable, SCRIPT, *single], env=env, check=True, cwd=REPO_ROOT, capture_output=True)
    double = pretrain_args(tmp_path, "double", "--method", "presence", "--steps", "4", *recipe)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), SCRIPT, *double],
                   env=env, check=True, cwd=REPO_ROOT, capture_output=True)
    one, two = losses(tmp_path / "single"), losses(tmp_path / "double")
    assert [s for s, _, _ in one] == [s for s, _, _ in two] == [1, 2, 3, 4]
    assert [float(l) for _, l, _ in one] == pytest.approx([float(l) for _, l, _ in two], rel=1e-5)
    a, b = final_weights(artefacts, "single"), final_weights(artefacts, "double")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_grid_specs_become_pretrain_arguments_and_names():
    grid = load_stage("03_pretrain/pretrain_all.py")
    args = grid.run_arguments("presence-single tau=-2", 1, "small")
    assert args == ["--preset", "small", "--method", "presence-single", "--seed", "1", "--tau", "-2"]
    assert grid.run_name(args) == "presence-single-tau-2-s1"
    assert grid.run_name(grid.run_arguments("presence switch_step=50 per=sample", 0, "tiny")) == \
        "presence-I50-per-sample-s0"
    with pytest.raises(SystemExit, match="unknown option"):
        grid.run_arguments("presence temperature=2", 0, "tiny")
    # any preset field, as pretrain.py's --set; a field the method does not read is not in its name
    spec = "presence pretrain.batch_size=64 pretrain.tau_direct=0.5 pretrain.tau_inverse=-0.5"
    assert grid.run_arguments(spec, 2, "tiny")[-6:] == ["--set", "pretrain.batch_size=64", "--set",
                                                       "pretrain.tau_direct=0.5", "--set", "pretrain.tau_inverse=-0.5"]
    assert grid.run_name(grid.run_arguments(spec, 2, "tiny")) == "presence-batch_size64-tau_direct0.5-tau_inverse-0.5-s2"
    assert grid.run_name(grid.run_arguments("baseline pretrain.tau_direct=0.5", 0, "tiny")) == "baseline-s0"


def test_grid_finds_the_runs_of_a_preset_given_as_a_yaml_path(tmp_path, monkeypatch):
    """Folders are named by the preset's name, not by the path the user typed: a finished run of a
    variant is skipped, not trained again over itself."""
    grid = load_stage("03_pretrain/pretrain_all.py")
    variant = tmp_path / "tiny_longer.yaml"
    variant.write_text("base: tiny\npretrain:\n  steps: 400\n  switch_step: 40\n")
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(tmp_path / "artefacts"))
    monkeypatch.setattr(grid, "results_dir", lambda preset, stage: tmp_path / "results" / preset / stage)
    finished = tmp_path / "artefacts" / "tiny_longer" / "pretrain" / "baseline-s0" / "final"
    finished.mkdir(parents=True)
    (finished / "presence_run.json").write_text("{}")
    (tmp_path / "results" / "tiny_longer" / "pretrain" / "runs" / "baseline-s0").mkdir(parents=True)
    (tmp_path / "results" / "tiny_longer" / "pretrain" / "runs" / "baseline-s0" / "metrics.json").write_text("{}")
    calls, summarised = [], []
    monkeypatch.setattr(grid, "call", lambda script, args, threads=None: calls.append((script, args)))
    monkeypatch.setattr(grid, "summarise", lambda name: summarised.append(name) or tmp_path / "summary.csv")
    grid.main(argparse.Namespace(preset=str(variant), runs=["baseline", "presence"], seeds=[0], jobs=1))
    assert summarised == ["tiny_longer"]
    assert calls == [("pretrain.py", ["--preset", str(variant), "--method", "presence", "--seed", "0", "--overwrite"])]


def test_a_seed_grid_on_a_fresh_clone_trains_only_the_runs_without_committed_results(tmp_path, monkeypatch):
    """--results-only: runs whose metrics.json is committed (no model: a fresh clone) are done, also a
    Sequential one, whose scorer is then not needed; without it every run is trained, as make reproduce
    needs the models."""
    grid = load_stage("03_pretrain/pretrain_all.py")
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(tmp_path / "artefacts"))
    monkeypatch.setattr(grid, "results_dir", lambda preset, stage: tmp_path / "results" / preset / stage)
    for name in ("baseline-s0", "presence-sequential-s0"):
        (tmp_path / "results" / "tiny" / "pretrain" / "runs" / name).mkdir(parents=True)
        (tmp_path / "results" / "tiny" / "pretrain" / "runs" / name / "metrics.json").write_text("{}")
    monkeypatch.setattr(grid, "summarise", lambda name: tmp_path / "summary.csv")
    for results_only, trained in ((True, ["presence"]),
                                  (False, ["baseline", "presence", "baseline", None, "presence-sequential"])):
        calls = []
        monkeypatch.setattr(grid, "call", lambda script, args, threads=None: calls.append(
            args[args.index("--method") + 1] if "--method" in args else None))
        grid.main(argparse.Namespace(preset="tiny", runs=["baseline", "presence", "presence-sequential"], seeds=[0],
                                     jobs=1, results_only=results_only))
        assert calls == trained, results_only


def test_grid_trains_jobs_at_once_and_sequential_runs_last(tmp_path, monkeypatch):
    grid = load_stage("03_pretrain/pretrain_all.py")
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(tmp_path / "artefacts"))
    calls = []
    monkeypatch.setattr(grid, "call", lambda script, args, threads=None: calls.append(
        (script, args[args.index("--method") + 1] if "--method" in args else None, threads)))
    monkeypatch.setattr(grid, "summarise", lambda name: tmp_path / "summary.csv")
    monkeypatch.setattr(grid.os, "cpu_count", lambda: 4)
    grid.main(argparse.Namespace(preset="tiny", runs=["presence-sequential", "baseline", "presence"], seeds=[0],
                                 jobs=2))
    assert sorted(calls[:2]) == [("pretrain.py", "baseline", 2), ("pretrain.py", "presence", 2)]
    assert calls[-2:] == [("score_candidates.py", None, None), ("pretrain.py", "presence-sequential", None)]


def test_a_twin_retrains_a_run_and_compares_its_loss(tmp_path, artefacts, monkeypatch):
    twins = load_stage("03_pretrain/check_twins.py")
    monkeypatch.setattr(twins, "results_dir", lambda preset, stage: tmp_path / "results" / preset / stage)
    runs = tmp_path / "results" / "tiny" / "pretrain" / "runs"
    pretrain.main(pretrain.parse_args(pretrain_args(runs, "presence-s0", "--method", "presence")))
    environment = runs / "presence-s0" / "environment.json"
    environment.write_text(environment.read_text().replace('"git_commit": "', '"git_commit": "older-'))
    assert twins.main(argparse.Namespace(preset="tiny", recipes=None, tolerance=1e-6)) == 0
    row = csv_rows(tmp_path / "results" / "tiny" / "pretrain" / "twins.csv")[0]
    assert row["run"] == "presence-s0" and row["run_commit"].startswith("older-") and row["within_tolerance"] == "True"
    assert float(row["abs_difference"]) <= 1e-6
    metrics = runs / "presence-s0" / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"final_heldout_loss": ', '"final_heldout_loss": 1'))
    assert twins.main(argparse.Namespace(preset="tiny", recipes=["presence-s0"], tolerance=1e-6)) == 1


def test_a_twin_of_the_weight_matched_control_replays_the_committed_paired_run(tmp_path, artefacts, monkeypatch):
    """A twin trains in a scratch folder; the PRESENCE run its weight-matched control replays is the committed
    one, found by pretrain.py's own name for it."""
    twins = load_stage("03_pretrain/check_twins.py")
    monkeypatch.setattr(twins, "results_dir", lambda preset, stage: tmp_path / "results" / preset / stage)
    runs = tmp_path / "results" / "tiny" / "pretrain" / "runs"
    paired = pretrain.parse_args(pretrain_args(runs, "unnamed", "--method", "presence"))
    paired.run_name = None
    paired_name = pretrain.default_run_name(paired)
    pretrain.main(pretrain.parse_args(pretrain_args(runs, paired_name, "--method", "presence")))
    pretrain.main(pretrain.parse_args(pretrain_args(runs, "presence-matched-s0", "--method", "presence-matched",
                                                    "--paired-run", paired_name)))
    environment = runs / "presence-matched-s0" / "environment.json"
    environment.write_text(environment.read_text().replace('"git_commit": "', '"git_commit": "older-'))
    assert twins.main(argparse.Namespace(preset="tiny", recipes=["presence-matched-s0"], tolerance=1e-6)) == 0
    row = csv_rows(tmp_path / "results" / "tiny" / "pretrain" / "twins.csv")[0]
    assert row["checked_by"] == "twin" and float(row["abs_difference"]) <= 1e-6


def test_two_commits_have_the_same_code_when_they_differ_only_in_what_no_run_reads(tmp_path):
    """A hand-built repository: the training script imports a package module inside a function and a sibling
    script; a change to those, to a preset or to the pinned packages is code, a change to results, prose,
    tests, a module no run imports or the figures is not."""
    same_code = load_stage("03_pretrain/check_twins.py").same_code
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    for folder in ("results/tiny", "common", "tests", "03_pretrain", "05_figures", "presets"):
        (tmp_path / folder).mkdir(parents=True)
    files = {"03_pretrain/pretrain.py": "import helper\n\ndef main():\n    from common.step import x\n",
             "03_pretrain/helper.py": "y = 1\n", "common/__init__.py": "", "common/step.py": "x = 1\n",
             "common/tables.py": "z = 1\n", "05_figures/make_figures.py": "import common.tables\n",
             "presets/tiny.yaml": "steps: 200\n", "pyproject.toml": "torch==2.13.0\n", "README.md": "a\n",
             "results/tiny/runs.csv": "1\n", "tests/test_a.py": "1\n"}
    not_code = {"README.md": "b\n", "results/tiny/runs.csv": "2\n", "tests/test_a.py": "2\n", "common/tables.py": "z = 2\n",
                "05_figures/make_figures.py": "import common.tables  # figures\n"}
    code = [{"common/step.py": "x = 2\n"}, {"03_pretrain/helper.py": "y = 2\n"}, {"common/__init__.py": "w = 1\n"},
            {"presets/tiny.yaml": "steps: 100\n"}, {"pyproject.toml": "torch==2.14.0\n"}]

    def commit(change: dict) -> str:
        for name, text in {**files, **change}.items():
            (tmp_path / name).write_text(text)
        git("add", "-A")
        git("commit", "-qm", "c", "--allow-empty")
        return git("rev-parse", "HEAD")

    first, prose = commit({}), commit(not_code)
    assert same_code(first, prose, tmp_path) and same_code(prose, first, tmp_path)
    for change in code:
        changed = commit(change)
        assert not same_code(first, changed, tmp_path), change
        commit({})
    assert not same_code(first + "+dirty", prose, tmp_path)
    assert not same_code("0" * 40, prose, tmp_path)  # a commit this repository does not have


FAMILY_MODELS = {"gpt2": ["model.family=gpt2", "model.tie_word_embeddings=true"],
                 "llama": ["model.family=llama", "model.num_heads=2"],
                 "bert": ["model.family=bert", "model.tie_word_embeddings=true"]}


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
@pytest.mark.parametrize("per", ["microbatch", "sample"])
def test_every_family_pretrains_with_presence_and_reloads(tmp_path, artefacts, family, per):
    """One script for every family: PRESENCE trains a GPT-2, a Llama and a BERT on their own objectives, the
    held-out loss is finite, and the final model loads with its Auto class to equal logits."""
    from common.modeling import load_pretrained
    sets = [x for item in FAMILY_MODELS[family] for x in ("--set", item)]
    metrics = pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, "run", "--method", "presence", "--per", per,
                                                              *sets)))
    assert 0 < metrics["final_heldout_loss"] < 20 and metrics["parameters"]["total"] > 0
    rows = csv_rows(tmp_path / "run" / "train_log.csv")
    assert all(r["si_mean"] != "" and float(r["si_mean"]) > 0 for r in rows)
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    final = artefacts / "tiny" / "pretrain" / "run" / "final"
    model = load_pretrained(final).eval()
    assert type(model).__name__.lower().startswith(family)
    auto = (AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM).from_pretrained(final).eval()
    ids = torch.randint(3, 700, (2, 12))
    with torch.no_grad():  # Hugging Face's own Auto class reads the same network
        assert torch.equal(model(input_ids=ids).logits, auto(input_ids=ids).logits)


def test_the_script_reads_as_a_table_of_contents():
    """The run's state is one object: no function of pretrain.py takes more than six parameters, and main
    stays a short list of the stages of a run."""
    import ast
    tree = ast.parse((REPO_ROOT / "03_pretrain" / "pretrain.py").read_text())
    wide = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
            and len(f.args.args) + len(f.args.kwonlyargs) > 6]
    assert not wide, wide
    main = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "main")
    assert main.end_lineno - main.lineno < 25

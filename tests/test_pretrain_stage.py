"""03_pretrain/pretrain.py end to end on the miniature data: exact resume, NaN handling, and 2-process
data parallelism giving the single-process run."""
import argparse
import csv
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common.presence.train_step as train_step_module
from common.checkpoint import latest_checkpoint
from common.config import ConfigError
from common.paths import REPO_ROOT
from conftest import MINI_MODEL, MINI_PRETRAIN, load_stage

pretrain = load_stage("03_pretrain/pretrain.py")
SCRIPT = str(REPO_ROOT / "03_pretrain" / "pretrain.py")


def args_for(tmp_path, name, *extra):
    sets = [x for item in MINI_MODEL + MINI_PRETRAIN for x in ("--set", item)]
    return ["--preset", "tiny", "--run-name", name, "--out", str(tmp_path / name), *sets, *extra]


def losses(run_dir):
    with open(run_dir / "train_log.csv") as f:
        return [(int(r["step"]), r["loss"], r["heldout_loss"]) for r in csv.DictReader(f)]


def final_weights(artefacts, name):
    return load_file(artefacts / "tiny" / "pretrain" / name / "final" / "model.safetensors")


def test_resume_is_exact(tmp_path, mini_artefacts, monkeypatch):
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(mini_artefacts))
    pretrain.main(pretrain.parse_args(args_for(tmp_path, "whole", "--method", "presence")))
    pretrain.main(pretrain.parse_args(args_for(tmp_path, "halves", "--method", "presence", "--steps", "3")))
    pretrain.main(pretrain.parse_args(args_for(tmp_path, "halves", "--method", "presence", "--resume")))
    assert losses(tmp_path / "whole") == losses(tmp_path / "halves")
    assert [step for step, _, _ in losses(tmp_path / "whole")] == [1, 2, 3, 4, 5, 6]
    whole, halves = final_weights(mini_artefacts, "whole"), final_weights(mini_artefacts, "halves")
    assert whole.keys() == halves.keys()
    assert all(torch.equal(whole[k], halves[k]) for k in whole)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, mini_artefacts, monkeypatch):
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(mini_artefacts))
    real_step = train_step_module.presence_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        stats = real_step(*args, **kwargs)
        return stats if calls["n"] < 5 else type(stats)(float("nan"), stats.scores, stats.weights)

    monkeypatch.setattr(train_step_module, "presence_step", poisoned)
    with pytest.raises(FloatingPointError, match="step 5"):
        pretrain.main(pretrain.parse_args(args_for(tmp_path, "nan", "--method", "presence")))
    checkpoint = latest_checkpoint(mini_artefacts / "tiny" / "pretrain" / "nan" / "checkpoints")
    assert checkpoint.name == "step-4"
    assert [step for step, _, _ in losses(tmp_path / "nan")] == [1, 2, 3, 4]


def test_bad_options_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="--method"):
        pretrain.get_config(pretrain.parse_args(["--method", "presence-xl"]))
    with pytest.raises(ConfigError, match="--tau"):
        pretrain.get_config(pretrain.parse_args(["--method", "presence-single"]))
    with pytest.raises(ConfigError, match="num_microbatches"):
        pretrain.get_config(pretrain.parse_args(["--set", "pretrain.num_microbatches=5"]))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(tmp_path, mini_artefacts):
    env = {**os.environ, "PRESENCE_ARTEFACTS": str(mini_artefacts), "OMP_NUM_THREADS": "1"}
    single = args_for(tmp_path, "single", "--method", "presence", "--steps", "4")
    subprocess.run([sys.executable, SCRIPT, *single], env=env, check=True, cwd=REPO_ROOT, capture_output=True)
    double = args_for(tmp_path, "double", "--method", "presence", "--steps", "4")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), SCRIPT, *double],
                   env=env, check=True, cwd=REPO_ROOT, capture_output=True)
    one, two = losses(tmp_path / "single"), losses(tmp_path / "double")
    assert [s for s, _, _ in one] == [s for s, _, _ in two] == [1, 2, 3, 4]
    assert [float(l) for _, l, _ in one] == pytest.approx([float(l) for _, l, _ in two], rel=1e-5)
    a, b = final_weights(mini_artefacts, "single"), final_weights(mini_artefacts, "double")
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


def test_grid_finds_the_runs_of_a_preset_given_as_a_yaml_path(tmp_path, monkeypatch):
    """Folders are named by the preset's name, not by the path the user typed: a finished run of a
    variant is skipped, not trained again over itself."""
    grid = load_stage("03_pretrain/pretrain_all.py")
    variant = tmp_path / "tiny_longer.yaml"
    variant.write_text("base: tiny\npretrain:\n  steps: 400\n  switch_step: 40\n")
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(tmp_path / "artefacts"))
    finished = tmp_path / "artefacts" / "tiny_longer" / "pretrain" / "baseline-s0" / "final"
    finished.mkdir(parents=True)
    (finished / "presence_run.json").write_text("{}")
    calls, summarised = [], []
    monkeypatch.setattr(grid, "call", lambda script, args: calls.append((script, args)))
    monkeypatch.setattr(grid, "summarise", lambda name: summarised.append(name) or tmp_path / "summary.csv")
    grid.main(argparse.Namespace(preset=str(variant), runs=["baseline", "presence"], seeds=[0]))
    assert summarised == ["tiny_longer"]
    assert calls == [("pretrain.py", ["--preset", str(variant), "--method", "presence", "--seed", "0", "--overwrite"])]

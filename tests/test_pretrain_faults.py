"""03_pretrain/pretrain.py under faults, on the miniature data: a blow-up is never applied or saved and the
fix it prints recovers the run; one process and one run folder per checkpoint store; SIGTERM and SIGINT
save, say how to resume, and resume exactly; --resume refuses another run and applies a schedule change;
a run is finished only when all its outputs are; damaged data and a full disk name the file and the fix."""
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.checkpoint import CheckpointError, latest_checkpoint
from common.config import ConfigError
from common.paths import REPO_ROOT
from common.runinfo import RunExistsError
from conftest import csv_rows, final_weights, load_stage, pretrain_args

pretrain = load_stage("03_pretrain/pretrain.py")
SCRIPT = str(REPO_ROOT / "03_pretrain" / "pretrain.py")
NOISY = ["--noise-rate", "0.3", "--set", "data.noise_rates=[0.3]"]  # the rate tests/conftest.py's data build has


def run(*args):
    return pretrain.main(pretrain.parse_args(list(args)))


def store(artefacts, name):
    return artefacts / "tiny" / "pretrain" / name


def assert_same_run(tmp_path, artefacts, a, b):
    """Trained alike: the same train_log.csv (timings aside) and the same final weights, bit for bit."""
    assert csv_rows(tmp_path / a / "train_log.csv", drop=["seconds"]) == \
        csv_rows(tmp_path / b / "train_log.csv", drop=["seconds"])
    weights_a, weights_b = final_weights(artefacts, a), final_weights(artefacts, b)
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def printed_command(message, marker):
    """The pretrain.py arguments of the command that `message` prints after `marker`."""
    words = shlex.split(message.split(marker, 1)[1].splitlines()[0])
    assert words[:2] == ["python", "03_pretrain/pretrain.py"]
    return words[2:]


@pytest.mark.parametrize("when, huge", [("from-the-start", "1e6"), ("mid-run", "1000000.0")])
def test_an_overflow_is_never_saved_and_the_printed_fix_recovers_the_run(tmp_path, artefacts, when, huge):
    """peak_lr=1e6 (also written as YAML 1.1 reads it: a string) blows the weights up in one step, and the
    next step's update is NaN. No checkpoint ever holds a non-finite value, the blown-up checkpoint is
    dropped, and the printed command trains the run to its end exactly like a run that never diverged."""
    method = ["--method", "presence", "--set", "pretrain.save_every=1"]
    run(*pretrain_args(tmp_path, "clean", *method))
    if when == "mid-run":
        run(*pretrain_args(tmp_path, "run", *method, "--steps", "3"))
    overflow = pretrain_args(tmp_path, "run", *method, "--set", f"pretrain.peak_lr={huge}",
                             *(["--resume"] if when == "mid-run" else []))
    with pytest.raises(FloatingPointError, match="Training stopped; nothing of this step was saved") as error:
        run(*overflow)
    saved = list(store(artefacts, "run").rglob("model.safetensors"))
    assert all(torch.isfinite(t).all() for path in saved for t in load_file(path).values())
    fix = printed_command(str(error.value), "Fix: a lower learning rate: ")
    assert "pretrain.peak_lr=0.01" in fix and f"pretrain.peak_lr={huge}" not in fix
    run(*fix)
    assert_same_run(tmp_path, artefacts, "clean", "run")


def test_a_run_held_by_another_process_is_refused_until_that_process_dies(tmp_path, artefacts):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom common.runinfo import run_lock\nwith run_lock(sys.argv[1]):\n"
         "    print('locked', flush=True)\n    time.sleep(600)", str(store(artefacts, "run"))],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"], ["--overwrite"]):
            with pytest.raises(RunExistsError, match=f"pid {holder.pid}"):
                run(*pretrain_args(tmp_path, "run", "--method", "baseline", *extra))
        assert not (tmp_path / "run").exists()
    finally:
        holder.kill()
        holder.wait()
    run(*pretrain_args(tmp_path, "run", "--method", "baseline"))  # a killed holder leaves no stuck lock
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_two_run_folders_of_one_name_cannot_share_a_checkpoint_store(tmp_path, artefacts):
    run(*pretrain_args(tmp_path / "a", "runX", "--method", "presence"))
    before = final_weights(artefacts, "runX")
    for extra in ([], ["--resume"]):
        with pytest.raises(RunExistsError, match=f"holds the checkpoints of the run in {tmp_path / 'a' / 'runX'}"):
            run(*pretrain_args(tmp_path / "b", "runX", "--method", "baseline", "--seed", "1", *extra))
    after = final_weights(artefacts, "runX")
    assert all(torch.equal(before[k], after[k]) for k in before) and not (tmp_path / "b").exists()
    run(*pretrain_args(tmp_path / "b", "runX", "--method", "baseline", "--seed", "1", "--overwrite"))  # on purpose
    owner = json.loads((store(artefacts, "runX") / "owner.json").read_text())
    assert owner == {"run_dir": str((tmp_path / "b" / "runX").resolve())}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_says_how_to_resume_and_the_run_resumes_exactly(tmp_path, artefacts, signum):
    """The run is asked for far more steps than it gets, so that the signal always arrives mid-run; the
    resumed run is then told to stop two steps later and compared with a run of that length."""
    process = subprocess.Popen([sys.executable, SCRIPT, *pretrain_args(tmp_path, "stopped", "--method", "presence",
                                                                        "--steps", "100000")],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               # the thread count of this process: the runs compared below run in it, and
                               # a different count sums some gradients in another order
                               env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
                                    "PYTHONPATH": str(REPO_ROOT)})
    log, deadline = tmp_path / "stopped" / "train_log.csv", time.monotonic() + 600
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):  # the header and two steps
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signum)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 128 + signum, output[-2000:]
    stopped = int(csv_rows(log)[-1]["step"])
    assert latest_checkpoint(store(artefacts, "stopped") / "checkpoints").name == f"step-{stopped}"
    assert f"{signal.Signals(signum).name}: stopped stopped after step {stopped}" in output
    resume = printed_command(output, "Resume with: ")
    assert resume[-1] == "--resume"
    resume[resume.index("--steps") + 1] = str(stopped + 2)
    run(*resume)
    run(*pretrain_args(tmp_path, "whole", "--method", "presence", "--steps", str(stopped + 2)))
    assert_same_run(tmp_path, artefacts, "whole", "stopped")


def test_resume_refuses_another_run_and_applies_a_changed_schedule(tmp_path, artefacts):
    run(*pretrain_args(tmp_path, "run", "--method", "presence", "--steps", "3"))
    outputs = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != "environment.json"}
    for change in (["--method", "baseline"], ["--seed", "1"], ["--set", "model.d_ff=64"],
                   ["--set", "pretrain.grad_clip=1.0"], ["--steps", "2"]):
        steps = [] if change[0] == "--steps" else ["--steps", "6"]
        with pytest.raises(ConfigError, match="--resume: the run was made with other settings|pretrain.steps: the run"):
            run(*pretrain_args(tmp_path, "run", "--method", "presence", *steps, "--resume", *change))
        assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != "environment.json"} == outputs
    run(*pretrain_args(tmp_path, "run", "--method", "presence", "--resume", "--set", "pretrain.peak_lr=0.02",
                       "--set", "pretrain.switch_step=4"))
    log = csv_rows(tmp_path / "run" / "train_log.csv")
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4, 5, 6]
    for row in log[3:]:  # the scheduler's rate for step t is peak * sqrt(warmup / max(t - 1, warmup)), warmup 2
        step = int(row["step"])
        assert float(row["lr"]) == pytest.approx(0.02 * math.sqrt(2 / max(step - 1, 2)), rel=1e-12)
        assert float(row["tau"]) == (1.0 if step <= 4 else -1.0)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["preset"]["pretrain"]["peak_lr"], config["preset"]["pretrain"]["switch_step"]) == (0.02, 4)
    assert config["history"] == [{"resumed_at_step": 3, "changes": {"preset.pretrain.peak_lr": [0.01, 0.02],
                                                                    "preset.pretrain.steps": [3, 6],
                                                                    "preset.pretrain.switch_step": [2, 4]}}]


def test_a_run_counts_as_finished_only_when_all_its_outputs_are_written(tmp_path, artefacts, monkeypatch):
    """A run extended by --resume whose metrics.json cannot be written is not finished (its old metrics.json
    is gone with the old final model); leftovers of interrupted writes are cleaned on the next start."""
    grid = load_stage("03_pretrain/pretrain_all.py")
    results = tmp_path / "results"
    monkeypatch.setattr(grid, "results_dir", lambda preset, stage: results / preset / stage)
    runs = results / "tiny" / "pretrain" / "runs"
    run(*pretrain_args(runs, "baseline-s0", "--method", "baseline", "--steps", "4"))
    assert grid.finished("tiny", "baseline-s0")

    def full_disk(path, obj):
        raise OSError(28, "No space left on device", str(path))

    write_json = pretrain.write_json
    monkeypatch.setattr(pretrain, "write_json", full_disk)
    with pytest.raises(OSError, match="metrics.json.*The run stopped; its checkpoint of step 6 is kept. Fix: .*--resume"):
        run(*pretrain_args(runs, "baseline-s0", "--method", "baseline", "--resume"))
    monkeypatch.setattr(pretrain, "write_json", write_json)
    assert (store(artefacts, "baseline-s0") / "final" / "presence_run.json").is_file()
    assert not grid.finished("tiny", "baseline-s0")
    calls = []
    monkeypatch.setattr(grid, "call", lambda script, args, threads=None: calls.append(args[-1]))
    grid.ensure_run("tiny", ["--preset", "tiny", "--method", "baseline", "--seed", "0"])
    assert calls == ["--resume"]

    leftovers = [runs / "baseline-s0" / ".metrics.json.x1y2.tmp", store(artefacts, "baseline-s0") / ".final.tmp",
                 store(artefacts, "baseline-s0") / "checkpoints" / ".step-8.tmp"]
    for path in leftovers:
        path.write_text("half")
    run(*pretrain_args(runs, "baseline-s0", "--method", "baseline", "--resume"))
    assert grid.finished("tiny", "baseline-s0") and not any(p.exists() for p in leftovers)


@pytest.fixture
def data_copy(tmp_path, mini_artefacts, monkeypatch):
    """This test's own copy of the miniature data, to damage."""
    root = tmp_path / "artefacts"
    shutil.copytree(mini_artefacts / "tiny" / "data", root / "tiny" / "data", ignore=shutil.ignore_patterns("corpus"))
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(root))
    return root / "tiny" / "data"


def damage(path, how):
    content = np.fromfile(path, dtype=np.uint8)
    if how == "truncated":
        content[:-7].tofile(path)
    elif how == "random bytes":
        np.random.default_rng(0).integers(0, 256, size=content.size, dtype=np.uint8).tofile(path)
    else:  # the same ids in another order: every id in the vocabulary, only the hash can tell
        ids = np.fromfile(path, dtype=np.uint16)
        np.random.default_rng(0).permutation(ids).tofile(path)


@pytest.mark.parametrize("file, how, noisy, expected", [
    ("packed/train.bin", "truncated", False, "has .* bytes"),
    ("packed/train.bin", "random bytes", False, "outside the vocabulary"),
    ("packed/train.bin", "shuffled ids", True, "does not match the sha256"),
    ("packed/heldout.bin", "shuffled ids", True, "does not match the sha256"),
    ("packed/noise-0.3/train.bin", "truncated", False, "has .* bytes"),
    ("packed/noise-0.3/train_noise.npy", "random bytes", False, "has .* bytes|cannot be read"),
])
def test_damaged_data_names_the_file_and_the_fix_and_keeps_the_checkpoint(tmp_path, data_copy, file, how, noisy,
                                                                          expected):
    """A run of two steps, then its data are damaged and it is resumed (--verify-data, the full check, for
    damage that keeps every id in the vocabulary)."""
    noise = NOISY if "noise" in file else []
    run(*pretrain_args(tmp_path, "run", "--method", "baseline", "--steps", "2", *noise))
    damage(data_copy / file, how)
    resume = pretrain_args(tmp_path, "run", "--method", "baseline", "--resume", *noise,
                           *(["--verify-data"] if noisy else []))
    with pytest.raises(ValueError, match=f"{data_copy / file}.*{expected}|{expected}.*{data_copy / file}") as error:
        run(*resume)
    assert "Fix: rebuild the data: python 01_data/prepare_data.py --preset tiny --force" in str(error.value)
    assert latest_checkpoint(data_copy.parent / "pretrain" / "run" / "checkpoints").name == "step-2"


def test_a_full_disk_names_the_checkpoint_keeps_the_last_one_and_the_run_resumes(tmp_path, artefacts, monkeypatch):
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):  # what torch.save raises when the disk is full
        if "step-4" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="checkpoints/step-4 failed .*PytorchStreamWriter.*its checkpoint of step 2 is "
                                      "kept. Fix: .*--resume") as error:
        run(*pretrain_args(tmp_path, "run", "--method", "presence"))
    checkpoints = store(artefacts, "run") / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step-2" and not list(checkpoints.glob(".*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    run(*printed_command(str(error.value), "then: "))
    run(*pretrain_args(tmp_path, "whole", "--method", "presence"))
    assert_same_run(tmp_path, artefacts, "whole", "run")


def test_bad_values_are_refused_before_anything_is_written(tmp_path, artefacts):
    presence = ("--method", "presence")
    for args, message in (
            (pretrain_args(tmp_path, "run", *presence, "--seed", "-1"), "--seed: -1 is negative"),
            (pretrain_args(tmp_path, "run", *presence, "--set", "pretrain.steps=abc") + ["--steps", "3"],
             "--steps: --set pretrain.steps sets it too"),
            (pretrain_args(tmp_path, "run", *presence, "--set", "pretrain.peak_lr=.inf"),
             "pretrain.peak_lr: inf is not a finite number"),
            (pretrain_args(tmp_path, "run", "--method", "presence-single", "--tau", "nan"),
             "--tau: nan is not a finite number")):
        with pytest.raises(ConfigError, match=message):
            run(*args)
    assert not (tmp_path / "run").exists() and not store(artefacts, "run").exists()


def test_the_grid_driver_reads_finished_from_metrics_and_final(tmp_path, monkeypatch):
    grid = load_stage("03_pretrain/pretrain_all.py")
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(tmp_path / "artefacts"))
    monkeypatch.setattr(grid, "results_dir", lambda preset, stage: tmp_path / "results" / preset / stage)
    final = tmp_path / "artefacts" / "tiny" / "pretrain" / "baseline-s0" / "final" / "presence_run.json"
    metrics = tmp_path / "results" / "tiny" / "pretrain" / "runs" / "baseline-s0" / "metrics.json"
    for path in (final, metrics):
        path.parent.mkdir(parents=True)
    final.write_text("{}")
    assert not grid.finished("tiny", "baseline-s0")  # killed between final/ and metrics.json
    metrics.write_text("{}")
    assert grid.finished("tiny", "baseline-s0")


def test_a_retrained_run_whose_losses_moved_by_float_noise_keeps_its_tables(tmp_path, monkeypatch):
    """A fresh clone has the committed run folders but no checkpoints, so the grid trains its runs again; held-out
    losses that moved in the 9th digit (another thread count) leave heldout.csv and heldout_rows.csv as committed,
    a loss that really moved gets its new text."""
    grid = load_stage("03_pretrain/pretrain_all.py")
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(tmp_path / "artefacts"))
    monkeypatch.setattr(grid, "results_dir", lambda preset, stage: tmp_path / "results" / preset / stage)
    run_dir = tmp_path / "results" / "tiny" / "pretrain" / "runs" / "baseline-s0"
    run_dir.mkdir(parents=True)
    committed = {"heldout_rows.csv": "row,lang,n_tokens,loss\r\n0,en,29,5.207934622106881\r\n"
                                     "1,hi,29,5.66559319840423\r\n",
                 "heldout.csv": "run,step,lang,n_rows,loss,se\r\n"
                                "baseline-s0,50,all,2,6.413615794915447,0.021929849795302776\r\n"}
    for name, text in committed.items():
        (run_dir / name).write_bytes(text.encode())
    (run_dir / "metrics.json").write_text("{}")

    def retrain(script, args, threads=None):  # what pretrain.py --overwrite writes: every digit, new noise
        assert args[-1] == "--overwrite"
        (run_dir / "heldout_rows.csv").write_bytes(b"row,lang,n_tokens,loss\r\n0,en,29,5.2079346230\r\n1,hi,29,5.7\r\n")
        (run_dir / "heldout.csv").write_bytes(
            b"run,step,lang,n_rows,loss,se\r\nbaseline-s0,50,all,2,6.4136157951,0.0219298497958\r\n")

    monkeypatch.setattr(grid, "call", retrain)
    grid.ensure_run("tiny", ["--preset", "tiny", "--method", "baseline", "--seed", "0"])
    assert (run_dir / "heldout.csv").read_bytes() == committed["heldout.csv"].encode()
    assert (run_dir / "heldout_rows.csv").read_bytes() == \
        committed["heldout_rows.csv"].replace("5.66559319840423", "5.7").encode()


def test_a_truncated_checkpoint_is_skipped_at_resume_for_the_newest_intact_one(tmp_path, artefacts, monkeypatch,
                                                                               capsys):
    """A run stopped after its step-4 checkpoint, before it was confirmed (step-2 is kept beside it), whose
    step-4 weights are then cut short: --resume says so, resumes from step 2, and ends like a run that never
    stopped. With no intact checkpoint left, one line names the file and the fix."""
    def stopped(*args, **kwargs):
        raise OSError(28, "No space left on device", "metrics.json")

    finish = pretrain.finish
    monkeypatch.setattr(pretrain, "finish", stopped)
    with pytest.raises(OSError, match="No space left"):
        run(*pretrain_args(tmp_path, "run", "--method", "presence", "--steps", "4"))
    monkeypatch.setattr(pretrain, "finish", finish)
    checkpoints = store(artefacts, "run") / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-2", "step-4"]
    weights = checkpoints / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    run(*pretrain_args(tmp_path, "run", "--method", "presence", "--steps", "4", "--resume"))
    out = capsys.readouterr().out
    assert f"checkpoint {checkpoints / 'step-4'} skipped: {weights} cannot be read (" in out
    assert f"using {checkpoints / 'step-2'}, the newest intact checkpoint" in out
    assert f"resumed run from {checkpoints / 'step-2'} at step 2" in out
    run(*pretrain_args(tmp_path, "whole", "--method", "presence", "--steps", "4"))
    assert_same_run(tmp_path, artefacts, "whole", "run")
    final = store(artefacts, "run") / "final" / "model.safetensors"  # what 04's fix for a damaged final/ says
    final.write_bytes(final.read_bytes()[:100])
    run(*pretrain_args(tmp_path, "run", "--method", "presence", "--steps", "4", "--resume"))
    assert_same_run(tmp_path, artefacts, "whole", "run")

    only = checkpoints / "step-4" / "model.safetensors"  # the finished run keeps one checkpoint
    only.write_bytes(only.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{only} cannot be read .*: checkpoint .* is damaged and the run has "
                                              "no other. Fix: start the run anew"):
        run(*pretrain_args(tmp_path, "run", "--method", "presence", "--steps", "6", "--resume"))

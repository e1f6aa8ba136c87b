"""03_pretrain/gpu_checks.sh, the GPU checks in one script, run end to end on the CPU with the miniature
data: every step runs and every promised output is written."""
import json
import os
import subprocess
import sys


from common.io import read_csv
from common.paths import REPO_ROOT

SETS = ("--set data.input_length=32 --set data.tokenizer.vocab_size=800 --set model.d_model=16 --set model.d_ff=32 "
        "--set model.num_layers=1 --set model.num_decoder_layers=1 --set model.num_heads=2 --set model.d_kv=8 "
        "--set pretrain.num_microbatches=4")


def test_gpu_checks_script_runs_on_cpu(tmp_path, mini_artefacts):
    out = tmp_path / "out"
    env = dict(os.environ, PRESET="tiny", DEVICE="cpu", SHAPES="2x4 4x2", STEPS="4", REPEATS="2", SI_BATCH="8",
               SETS=SETS, OUT=str(out), PRESENCE_ARTEFACTS=str(mini_artefacts), PYTHON=sys.executable)
    done = subprocess.run(["bash", "03_pretrain/gpu_checks.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    files = sorted(p.name for p in out.iterdir())
    assert files == ["log.txt", "optimizer.csv", "pretrain_baseline_metrics.json", "pretrain_baseline_train_log.csv",
                     "pretrain_presence_metrics.json", "pretrain_presence_train_log.csv", "si_overhead.csv",
                     "train_throughput.csv"]
    throughput = read_csv(out / "train_throughput.csv")
    assert [(r["shape"], r["method"]) for r in throughput] == [
        ("2x4", "baseline"), ("2x4", "presence"), ("4x2", "baseline"), ("4x2", "presence")]
    for row in throughput:
        tokens_per_step = int(row["batch_size"]) * (int(row["input_length"]) + int(row["target_length"]))
        assert int(row["batch_size"]) == 8 and (int(row["input_length"]), int(row["target_length"])) == (32, 8)
        # tokens/s is written rounded to an integer and step_ms to 0.01 ms: equal within those roundings
        step_ms = float(row["step_ms"])
        low, high = (tokens_per_step / ((step_ms + d) / 1e3) for d in (0.005, -0.005))
        assert low - 0.5 <= float(row["tokens_per_s"]) <= high + 0.5
        assert row["mfu"] == "" and row["matmul_ceiling_tflops"] == ""  # MFU is reported on GPUs only
    for method in ("baseline", "presence"):
        metrics = json.loads((out / f"pretrain_{method}_metrics.json").read_text())
        assert metrics["steps"] == 4 and metrics["tokens_per_second"] > 0 and metrics["final_heldout_loss"] > 0
        log = read_csv(out / f"pretrain_{method}_train_log.csv")
        assert [int(r["step"]) for r in log] == [1, 2, 3, 4]
    taus = [r["tau"] for r in read_csv(out / "pretrain_presence_train_log.csv")]
    assert taus == ["1.0", "1.0", "-1.0", "-1.0"]  # I = STEPS / 2
    assert {r["method"] for r in read_csv(out / "si_overhead.csv")} >= {"baseline", "presence-microbatch"}
    assert [r["optimizer"] for r in read_csv(out / "optimizer.csv")] == ["hf-adafactor", "adafactor", "adamw-foreach"]
    assert "== done" in (out / "log.txt").read_text()

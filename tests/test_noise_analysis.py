"""02_si_analysis/analyze_noise.py on miniature noisy runs: its shares agree with the runs' batches and
labels, its final AUROC with self-influence computed by brute force (one autograd pass per row) and
counted pair by pair, and it writes one row per run, checkpoint, kind and microbatch size."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from common.data.packed_data import SpanCorruptionBatches
from common.modeling import load_pretrained
from common.presence.influence import layer_set
from conftest import load_stage, pretrain_args

pretrain = load_stage("03_pretrain/pretrain.py")
analyze_noise = load_stage("02_si_analysis/analyze_noise.py")
NOISY = ["--noise-rate", "0.3", "--set", "data.noise_rates=[0.3]", "--set", "pretrain.noise_log_every=2"]
WRITTEN = 10.0 ** (1 - analyze_noise.DIGITS)  # the relative precision its tables are written at


def brute_force_auroc(positive, negative) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


@pytest.mark.slow
def test_noise_analysis_on_miniature_runs(tmp_path, artefacts):
    for method in ("baseline", "presence"):
        pretrain.main(pretrain.parse_args(pretrain_args(tmp_path, f"{method}-noise", "--method", method, *NOISY)))
    # a second run of PRESENCE's recipe and seed (its run folder only): counted once, as the tables count it
    repeat = shutil.copytree(tmp_path / "presence-noise", tmp_path / "presence-noise-again")
    config = json.loads((repeat / "config.json").read_text())
    (repeat / "config.json").write_text(json.dumps({**config, "run_name": repeat.name}))
    out = tmp_path / "noise"
    analyze_noise.main(analyze_noise.parse_args(["--preset", "tiny", "--set", "data.noise_rates=[0.3]",
                                                 "--runs-dir", str(tmp_path), "--out", str(out),
                                                 "--scoring-rows", "36", "--sizes", "1", "2", "--draws", "3"]))
    runs = pd.read_csv(out / "noise_runs.csv").set_index("run")
    assert sorted(runs.index) == ["baseline-noise", "presence-noise"]
    train = SpanCorruptionBatches(artefacts / "tiny" / "data", "train", 8, seed=0, noise_rate=0.3)
    shares = [(train.noise_labels[train.batch_rows(step)] > 0).mean() for step in range(6)]
    for run in runs.itertuples():
        assert run.noisy_batch_share == pytest.approx(np.mean(shares), rel=WRITTEN)
        assert run.noise_kind == "mixed" and run.noise_rate == 0.3 and 0 <= run.noisy_weight_share <= 1
    baseline = runs.loc["baseline-noise"]
    assert baseline.noisy_weight_share == pytest.approx(np.mean(shares), rel=WRITTEN)  # uniform weights: the batch share
    assert baseline.noisy_weight_share_direct == pytest.approx(np.mean(shares[:2]), rel=WRITTEN)  # steps 1-2: tau = +1
    assert baseline.noisy_weight_share_inverse == pytest.approx(np.mean(shares[2:]), rel=WRITTEN)
    logged = pd.read_csv(tmp_path / "baseline-noise" / "train_log.csv")["si_noise_auroc"]
    assert baseline.si_auroc_mean == pytest.approx(logged.dropna().mean(), rel=WRITTEN) and logged.notna().sum() >= 2

    scored = analyze_noise.scoring_set(train, 36, seed=0)
    labels = train.noise_labels[scored]
    assert (labels == 0).sum() == 18 and all((labels == k).sum() == 6 for k in (1, 2, 3))
    model = load_pretrained(artefacts / "tiny" / "pretrain" / "baseline-noise" / "final").double().eval()
    params = layer_set(model, "first")
    si = []
    for row in scored:
        loss = model(**train.fixed_rows(np.array([row]))).loss
        si.append(sum(g.square().sum() for g in torch.autograd.grad(loss, params)).item())
    si = np.array(si)
    assert baseline.si_auroc_final == pytest.approx(brute_force_auroc(si[labels > 0], si[labels == 0]), rel=WRITTEN)

    comparisons = pd.read_csv(out / "noise_comparisons.csv")
    # the oracle is absent here; PRESENCE against the baseline, paired row by row, by hand
    row = comparisons[comparisons["comparison"] == "presence − baseline"].iloc[0]
    a, b = (pd.read_csv(tmp_path / f"{m}-noise" / "heldout_rows.csv") for m in ("presence", "baseline"))
    weights = pd.read_csv(tmp_path / "baseline-noise" / "heldout.csv")
    languages = sorted(set(a["lang"]))
    per_language = {lang: (a[a["lang"] == lang]["loss"].to_numpy() - b[b["lang"] == lang]["loss"].to_numpy())
                    for lang in languages}
    final = weights[weights["step"] == weights["step"].max()].set_index("lang")["loss"]
    # the overall row's weights, recovered from the baseline's own per-language and overall losses (2 languages)
    p = (final["all"] - final[languages[1]]) / (final[languages[0]] - final[languages[1]])
    expected = p * per_language[languages[0]].mean() + (1 - p) * per_language[languages[1]].mean()
    assert row["delta"] == pytest.approx(expected, rel=WRITTEN) and row["noise_rate"] == 0.3
    assert "presence − baseline" in (out / "noise_summary.md").read_text()
    kinds = pd.read_csv(out / "noise_si_by_kind.csv")
    assert set(kinds["kind"]) == {"all", "jumbled", "random", "python"}
    assert sorted(set(kinds["checkpoint_step"])) == [2, 3, 6]  # the snapshots at 25% and 50%, then the final model
    granularity = pd.read_csv(out / "granularity.csv")
    assert set(granularity["run"]) == {"baseline-noise"}  # scored with the noisy baseline's checkpoints
    assert sorted(zip(granularity["checkpoint_step"], granularity["microbatch_size"])) == \
        [(s, m) for s in (2, 3, 6) for m in (1, 2)]
    for column in ("noisy_batch_share", "noisy_weight_share_tau_minus1", "noisy_weight_share_tau_plus1"):
        assert granularity[column].between(0, 1).all()

"""02_si_analysis and PRESENCE-Sequential's scoring on the miniature data: a tiny pre-trained run's
checkpoints are scored end to end, and the tables agree with the per-sample scores they summarise; an
interrupted analysis or scoring leaves nothing that counts as a result."""
import json

import numpy as np
import pandas as pd
import pytest

from common.config import ConfigError
from common.reporting.stats import auroc
from conftest import MINI_DATA, MINI_MODEL, MINI_PRETRAIN, load_stage

pretrain = load_stage("03_pretrain/pretrain.py")
score_candidates = load_stage("03_pretrain/score_candidates.py")
analyze_si = load_stage("02_si_analysis/analyze_si.py")
SETS = [x for item in MINI_DATA + MINI_MODEL + MINI_PRETRAIN for x in ("--set", item)]


@pytest.fixture(scope="module")
def scorer_run(mini_artefacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRESENCE_ARTEFACTS", str(mini_artefacts))
        pretrain.main(pretrain.parse_args(["--preset", "tiny", "--method", "baseline", "--seed", "0",
                                           "--out", str(out / "baseline-s0"), *SETS]))
    return out


def test_analysis_scores_every_probe_and_summaries_match(scorer_run, mini_artefacts, tmp_path, monkeypatch):
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(mini_artefacts))
    out = tmp_path / "si"
    metrics = analyze_si.main(analyze_si.parse_args(["--preset", "tiny", "--out", str(out), *SETS]))
    scores = pd.read_csv(out / "si_scores.csv")
    probes = analyze_si.read_probes(mini_artefacts / "tiny" / "data" / "probes.jsonl.gz")
    # snapshots at 25% and 50% of 6 steps (steps 2 and 3) score the paper's layer set, the final model all three
    assert metrics["checkpoints"] == ["baseline-s0/step-2", "baseline-s0/step-3", "baseline-s0/final"]
    assert len(scores) == len(probes) * (1 + 1 + 3)
    assert (scores["si"] > 0).all() and np.isfinite(scores["loss"]).all()
    assert set(scores["condition"]) == {"clean", "jumbled", "random", "mismatched"}

    summary = pd.read_csv(out / "si_summary.csv")
    final = scores[(scores["checkpoint"] == "baseline-s0/final") & (scores["layer_set"] == "first")]
    for lang in ("en", "hi"):
        clean = final[(final["lang"] == lang) & (final["condition"] == "clean")]
        jumbled = final[(final["lang"] == lang) & (final["condition"] == "jumbled")]
        row = summary[(summary["checkpoint"] == "baseline-s0/final") & (summary["layer_set"] == "first")
                      & (summary["lang"] == lang) & (summary["condition"] == "jumbled")].iloc[0]
        precision = 10.0 ** (1 - analyze_si.DIGITS)  # the tables' stated precision
        assert row["mean"] == pytest.approx(jumbled["si"].mean(), rel=precision)
        assert row["auroc_si"] == pytest.approx(auroc(jumbled["si"], clean["si"]), rel=precision)
        assert row["ci_low"] <= row["mean"] <= row["ci_high"]
    reliability = pd.read_csv(out / "si_reliability.csv")
    at_final = reliability[reliability["step"] == 6]["spearman_with_final"]
    assert len(at_final) == 3 and list(at_final) == pytest.approx([1.0, 1.0, 1.0])  # en x2 comparisons, hi
    for figure in ("figure1_si_noise_domain.png", "si_layer_sets.png", "si_reliability.png"):
        assert (out / "figures" / figure).stat().st_size > 0


def test_a_rerun_with_float_noise_rewrites_no_table(scorer_run, mini_artefacts, tmp_path, monkeypatch):
    """si_scores.csv as an earlier analysis left it, written with every digit and off in the 7th (another
    thread count, a retrained checkpoint): a rerun that finds the same scores to 6 digits rewrites no table."""
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(mini_artefacts))
    out = tmp_path / "si"
    args = analyze_si.parse_args(["--preset", "tiny", "--out", str(out), *SETS])
    analyze_si.main(args)
    scores = pd.read_csv(out / "si_scores.csv")
    scores[["loss", "si"]] *= 1 + 2e-7
    scores.to_csv(out / "si_scores.csv", index=False)
    before = {name: (out / name).read_bytes() for name in analyze_si.TABLES}
    analyze_si.main(args)
    assert {name: (out / name).read_bytes() for name in analyze_si.TABLES} == before


def test_analysis_refuses_to_replace_another_scorers_results(scorer_run, mini_artefacts, tmp_path, monkeypatch):
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(mini_artefacts))
    out = tmp_path / "si"
    out.mkdir()
    (out / "config.json").write_text('{"scorer": "presence-s3"}')
    with pytest.raises(FileExistsError, match="--overwrite"):
        analyze_si.main(analyze_si.parse_args(["--preset", "tiny", "--out", str(out), *SETS]))


def test_sequential_keeps_the_lowest_scores(scorer_run, mini_artefacts, tmp_path, monkeypatch):
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(mini_artefacts))
    result = score_candidates.main(score_candidates.parse_args(["--preset", "tiny", "--seed", "0",
                                                                "--out", str(tmp_path), *SETS]))
    scores = np.load(result["scores"])
    assert len(scores) == result["rows"] and np.isfinite(scores).all()
    run = pretrain.get_run(pretrain.parse_args(["--preset", "tiny", "--method", "presence-sequential", "--seed", "0",
                                                *SETS]))
    kept = pretrain.training_rows(run, len(scores))
    assert len(kept) == round(0.5 * len(scores))
    assert scores[kept].max() <= np.delete(scores, kept).min()
    reverse = pretrain.training_rows(pretrain.get_run(pretrain.parse_args(
        ["--method", "presence-sequential-reverse", *SETS])), len(scores))
    assert len(reverse) == len(kept) and set(kept) | set(reverse) == set(range(len(scores)))
    assert scores[reverse].min() >= scores[kept].max()
    per_language = pd.read_csv(tmp_path / "scores-s0.csv")
    assert per_language["rows"].sum() == len(scores)


def test_any_saved_model_can_score_the_probes(scorer_run, mini_artefacts, tmp_path, monkeypatch):
    """The path hub users take (--checkpoint google/mt5-base), here with a local model folder."""
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(mini_artefacts))
    folder = mini_artefacts / "tiny" / "pretrain" / "baseline-s0" / "final"
    metrics = analyze_si.main(analyze_si.parse_args(["--preset", "tiny", "--checkpoint", str(folder),
                                                     "--out", str(tmp_path / "si"), *SETS]))
    assert metrics["checkpoints"] == [str(folder)]
    scores = pd.read_csv(tmp_path / "si" / "si_scores.csv")
    assert set(scores["layer_set"]) == {"first", "embeddings", "all"}


def test_an_interrupted_analysis_leaves_no_mix_and_no_metrics(scorer_run, mini_artefacts, tmp_path, monkeypatch):
    """A complete analysis, then another scorer's (--overwrite) that dies after its first two tables: the
    folder holds only the new scorer's tables, names it, and has no metrics.json (not complete)."""
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(mini_artefacts))
    out = tmp_path / "si"
    analyze_si.main(analyze_si.parse_args(["--preset", "tiny", "--out", str(out), *SETS]))
    assert (out / "metrics.json").is_file()

    def killed(scores):
        raise KeyboardInterrupt

    monkeypatch.setattr(analyze_si, "correlation_rows", killed)
    folder = str(mini_artefacts / "tiny" / "pretrain" / "baseline-s0" / "final")
    with pytest.raises(KeyboardInterrupt):
        analyze_si.main(analyze_si.parse_args(["--preset", "tiny", "--checkpoint", folder, "--overwrite",
                                               "--out", str(out), *SETS]))
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["config.json", "environment.json",
                                                                    "si_scores.csv", "si_summary.csv"]
    assert json.loads((out / "config.json").read_text())["scorer"] == folder
    assert set(pd.read_csv(out / "si_scores.csv")["checkpoint"]) == {folder}


def test_scores_appear_only_with_their_summary(scorer_run, mini_artefacts, tmp_path, monkeypatch):
    """pretrain_all.py takes the scores file for done: it must not exist without the per-language table."""
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(mini_artefacts))

    def full_disk(path, rows, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(score_candidates, "write_csv", full_disk)
    args = score_candidates.parse_args(["--preset", "tiny", "--seed", "7", "--scorer", "baseline-s0",
                                        "--out", str(tmp_path), *SETS])
    with pytest.raises(OSError, match="scores-s7.csv"):
        score_candidates.main(args)
    assert not (mini_artefacts / "tiny" / "pretrain" / "sequential" / "scores-s7.npy").exists()


def test_negative_seeds_are_refused_before_any_work(tmp_path):
    for stage in (analyze_si, score_candidates):
        with pytest.raises(ConfigError, match="--seed: -1 is negative"):
            stage.main(stage.parse_args(["--preset", "tiny", "--seed", "-1", "--out", str(tmp_path / "out"), *SETS]))
    assert not (tmp_path / "out").exists()

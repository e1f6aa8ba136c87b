"""05_figures' tables: the paper's numbers read right, our mean ± std over seeds and the Δs computed
right from hand-made CSVs, and missing or odd inputs reported instead of filled in."""
import json
import math

import pandas as pd
import pytest

from common.config import load_preset
from common.reporting.markdown import markdown_table, replace_marked_block
from common.reporting.paper_results import load_paper_results, paper_value
from common.reporting.result_tables import (TABLES, comparison_markdown, comparison_table, direction_summary,
                                            format_score, offline_markdown, offline_table, summarise_seeds)
from common.reporting.run_results import (attach_variants, default_run_name, language_averages, load_pretrain_runs,
                                          load_scores, paired_heldout_delta, read_table, repeated_runs, variant_label)
from conftest import load_stage

SCORE_HEADER = "run,method,seed,task,setting,lang,metric,value,n_examples\n"
TABLE3 = next(spec for spec in TABLES if spec.paper_table == "table3")
TABLE5 = next(spec for spec in TABLES if spec.paper_table == "table5")


def test_paper_cells_match_the_csv_read_by_hand():
    paper = load_paper_results()
    # Cells copied by hand from results/paper/paper_results.csv.
    assert paper_value(paper, "table2", "mt5-base", "baseline", "zero-shot", "xquad") == 72.33
    assert paper_value(paper, "table2", "mt5-base", "presence-sequential", "translate-train", "tydiqa") == 57.65
    assert paper_value(paper, "table3", "mt5-large", "presence", "translate-train", "xquad") == 83.15
    assert paper_value(paper, "table3", "mt5-base", "baseline", "zero-shot", "panx") == 43.28
    assert paper_value(paper, "table5", "mt5-base", "presence-I-D", "translate-train", "tydiqa") == 55.06
    assert paper_value(paper, "table5", "mt5-base", "presence", "zero-shot", "xquad") is None  # not in Table 5
    assert len(paper) == 104
    assert set(paper["table"]) == {"table2", "table3", "table4", "table5"}


def test_summarise_seeds_is_mean_and_sample_std_with_one_vote_per_seed():
    rows = pd.DataFrame({"variant": ["a"] * 4, "seed": [0, 1, 2, 2], "value": [10.0, 12.0, 13.0, 15.0]})
    out = summarise_seeds(rows, ["variant"]).iloc[0]
    # seed 2 counts once, as (13 + 15) / 2 = 14: values 10, 12, 14 -> mean 12, sample std 2
    assert out["mean"] == pytest.approx(12.0)
    assert out["std"] == pytest.approx(2.0)
    assert out["n"] == 3 and out["seeds"] == "0,1,2"


def write_scores(path, lines):
    path.write_text(SCORE_HEADER + "".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def hand_made_scores(tmp_path):
    path = write_scores(tmp_path / "xtreme.csv", [
        "baseline-s0,baseline,0,xnli,zero-shot,avg,accuracy,40.0,100",
        "baseline-s1,baseline,1,xnli,zero-shot,avg,accuracy,44.0,100",
        "presence-s0,presence,0,xnli,zero-shot,avg,accuracy,45.0,100",
        "presence-s1,presence,1,xnli,zero-shot,avg,accuracy,47.0,100",
        # no avg row: the language average is computed, (30 + 20) / 2 = 25
        "presence-s0,presence,0,mlqa,zero-shot,en,f1,30.0,50",
        "presence-s0,presence,0,mlqa,zero-shot,hi,f1,20.0,50",
        "presence-s0,presence,0,mlqa,zero-shot,hi,em,99.0,50",  # not the paper's metric: ignored
    ])
    notes = []
    scores = load_scores(path, notes)
    runs = pd.DataFrame(columns=["run_name", "variant"])
    return attach_variants(language_averages(scores), runs, notes), notes


def test_comparison_table_hand_computed(hand_made_scores):
    scores, notes = hand_made_scores
    assert any("without a pre-training config" in n for n in notes)
    table = comparison_table(TABLE3, load_paper_results(), scores, "tiny")
    cell = table.set_index(["setting", "task", "method", "paper_model"])
    base = cell.loc[("zero-shot", "xnli", "baseline", "mt5-base")]
    assert base["ours_mean"] == pytest.approx(42.0)
    assert base["ours_std"] == pytest.approx(math.sqrt(8.0))  # sample std of 40, 44
    assert base["ours_n_seeds"] == 2 and base["ours_seeds"] == "0,1"
    for model, paper_delta in (("mt5-base", 74.47 - 74.21), ("mt5-large", 78.54 - 67.96)):
        row = cell.loc[("zero-shot", "xnli", "presence", model)]
        assert row["ours_mean"] == pytest.approx(46.0)
        assert row["ours_delta_vs_baseline"] == pytest.approx(4.0)
        assert row["paper_delta_vs_baseline"] == pytest.approx(paper_delta)
        assert row["direction_agrees"] is True
    mlqa = cell.loc[("zero-shot", "mlqa", "presence", "mt5-base")]
    assert mlqa["ours_mean"] == pytest.approx(25.0) and mlqa["ours_n_seeds"] == 1
    assert pd.isna(mlqa["ours_delta_vs_baseline"]) and pd.isna(mlqa["direction_agrees"])  # no baseline to compare
    assert cell.loc[("zero-shot", "mlqa", "baseline", "mt5-base")]["note"] == "not run"
    assert (table[table["setting"] == "translate-train"]["ours_n_seeds"] == 0).all()


def test_disagreeing_direction_is_flagged(tmp_path):
    path = write_scores(tmp_path / "xtreme.csv", [
        "b,baseline,0,tydiqa,zero-shot,avg,f1,50.0,10",
        "d,presence-D,0,tydiqa,zero-shot,avg,f1,52.0,10",
    ])
    no_runs = pd.DataFrame(columns=["run_name", "variant"])
    scores = attach_variants(language_averages(load_scores(path, [])), no_runs, [])
    table = comparison_table(TABLE5, load_paper_results(), scores, "tiny")
    row = table.set_index(["setting", "task", "method"]).loc[("zero-shot", "tydiqa", "presence-D")]
    assert row["paper_delta_vs_baseline"] == pytest.approx(45.84 - 49.09)  # the paper: PRESENCE-D lower
    assert row["ours_delta_vs_baseline"] == pytest.approx(2.0)
    assert row["direction_agrees"] is False


def test_markdown_shows_both_sides_and_says_not_run(hand_made_scores):
    scores, _ = hand_made_scores
    table = comparison_table(TABLE3, load_paper_results(), scores, "tiny")
    text = comparison_markdown(TABLE3, table, table.iloc[0:0], "preset `tiny`: test scale", ["a note"])
    assert "| Baseline | paper (mT5-base) | 72.92 |" in text
    assert "42.00 ± 2.83 (n=2)" in text and "46.00 ± 1.41 (n=2)" in text and "25.00 (n=1)" in text
    assert "not run" in text and "approximate" in text and "- a note" in text
    assert "| +4.00 |" in text  # our XNLI delta
    assert "XNLI acc. (chance 33.3)" in text and "XQuAD F1 |" in text  # chance beside accuracy only


def test_fraction_scores_are_converted_to_percent_with_a_note(tmp_path):
    path = write_scores(tmp_path / "retrieval.csv", ["r,baseline,0,verse_retrieval,zero-shot,hi,accuracy,0.25,200",
                                                     "r,baseline,0,verse_retrieval,zero-shot,avg,accuracy,0.5,200"])
    notes = []
    scores = load_scores(path, notes)
    assert sorted(scores["value"]) == [25.0, 50.0]
    assert any("converted to percent" in n for n in notes)


def test_missing_and_broken_inputs_are_reported_not_filled(tmp_path):
    notes = []
    assert load_scores(tmp_path / "absent.csv", notes) is None
    (tmp_path / "bad.csv").write_text("run,method\nx,y\n")
    assert read_table(tmp_path / "bad.csv", ["run", "value"], notes) is None
    runs_dir = tmp_path / "runs"
    (runs_dir / "broken-s0").mkdir(parents=True)
    (runs_dir / "broken-s0" / "config.json").write_text("{not json")
    runs, logs = load_pretrain_runs(runs_dir, load_preset("tiny").pretrain, notes)
    assert runs.empty and logs.empty
    text = " | ".join(notes)
    assert "absent.csv is missing" in text and "lacks columns ['value']" in text and "not valid JSON" in text
    assert "run broken-s0 skipped" in text


def test_runs_are_grouped_by_config_not_by_name(tmp_path):
    reference = load_preset("tiny").pretrain
    preset = load_preset("tiny").to_dict()
    standard = {"method": "presence", "tau": None, "per": "microbatch", "preset": preset}
    assert variant_label(standard, reference) == "presence"
    single = {"method": "presence-single", "tau": 2.0, "preset": preset}
    assert variant_label(single, reference) == "presence-single tau=+2"
    changed = json.loads(json.dumps(preset))
    changed["pretrain"]["switch_step"] = 50
    label = variant_label({"method": "presence", "tau": None, "per": "sample", "preset": changed}, reference)
    assert label == "presence (per-sample, I=50)"
    # any other recipe field (a grid's batch size or temperatures) makes a variant too; an execution knob,
    # or a knob the method does not read, does not
    grid = json.loads(json.dumps(preset))
    grid["pretrain"].update(batch_size=256, tau_direct=0.5, log_every=1, microbatch_chunks=2)
    assert variant_label({"method": "presence", "preset": grid}, reference) == \
        "presence (batch_size=256, tau_direct=0.5)"
    assert variant_label({"method": "baseline", "preset": grid}, reference) == "baseline (batch_size=256)"
    assert default_run_name({"method": "presence", "seed": 3, "preset": grid}, reference) == \
        "presence-batch_size256-tau_direct0.5-s3"
    # a run named like the standard recipe still counts as a variant when its config differs
    folder = tmp_path / "runs" / "presence-s0"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"run_name": "presence-s0", "method": "presence", "seed": 0,
                                                    "tau": None, "per": "microbatch", "preset": changed}))
    (folder / "train_log.csv").write_text("step,loss,heldout_loss\n1,5.0,\n2,4.0,4.5\n")
    (folder / "metrics.json").write_text(json.dumps({"final_heldout_loss": 4.5, "final_loss": 4.0}))
    runs, logs = load_pretrain_runs(tmp_path / "runs", reference, [])
    assert runs.iloc[0]["variant"] == "presence (I=50)" and not runs.iloc[0]["standard"]
    assert runs.iloc[0]["final_heldout_loss"] == 4.5
    assert list(logs["loss"]) == [5.0, 4.0]


def test_an_unfinished_run_is_left_out_of_tables_and_curves_with_a_note(tmp_path):
    reference = load_preset("tiny").pretrain
    preset = load_preset("tiny").to_dict()
    for name, finished in (("baseline-s0", True), ("baseline-s1", False)):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"run_name": name, "method": "baseline", "seed": int(name[-1]),
                                                        "tau": None, "per": "microbatch", "preset": preset}))
        (folder / "train_log.csv").write_text("step,loss,heldout_loss\n1,5.0,\n2,4.0,4.5\n")
        if finished:  # pretrain.py writes metrics.json when the last step is done
            (folder / "metrics.json").write_text(json.dumps({"final_heldout_loss": 4.5, "final_loss": 4.0}))
    notes = []
    runs, logs = load_pretrain_runs(tmp_path / "runs", reference, notes)
    assert list(runs["run_name"]) == ["baseline-s0"] and set(logs["run_name"]) == {"baseline-s0"}
    assert any("baseline-s1" in note and "unfinished" in note and "--resume" in note for note in notes)


def test_offline_measures_and_direction_sentence():
    runs = pd.DataFrame({"run_name": ["b0", "b1", "p0", "p1"], "method": ["baseline"] * 2 + ["presence"] * 2,
                         "seed": [0, 1, 0, 1], "standard": [True] * 4, "final_heldout_loss": [4.0, 4.2, 3.9, 3.9]})
    # 04 writes three retrieval metrics per run; the table's column is X -> en accuracy ("accuracy") alone
    retrieval = pd.DataFrame({"variant": ["baseline", "presence"] * 3, "seed": [0] * 6, "task": ["verse_retrieval"] * 6,
                              "metric": ["accuracy"] * 2 + ["accuracy_en_to_x"] * 2 + ["accuracy_middle_layer"] * 2,
                              "value": [10.0, 12.5, 50.0, 30.0, 1.0, 90.0]})
    offline = offline_table(TABLE3, runs, retrieval, "tiny").set_index(["task", "method"])
    assert offline.loc[("heldout_loss", "baseline"), "ours_mean"] == pytest.approx(4.1)
    assert offline.loc[("heldout_loss", "presence"), "ours_delta_vs_baseline"] == pytest.approx(-0.2)
    assert offline.loc[("verse_retrieval", "baseline"), "ours_mean"] == pytest.approx(10.0)
    assert offline.loc[("verse_retrieval", "presence"), "ours_delta_vs_baseline"] == pytest.approx(2.5)
    empty = comparison_table(TABLE3, load_paper_results(), pd.DataFrame(
        columns=["variant", "seed", "task", "setting", "metric", "value"]), "tiny")
    sentence = direction_summary(empty, offline.reset_index(), our_steps=200)
    assert "not tested here" in sentence and "PRESENCE 3.900 vs baseline 4.100" in sentence
    assert "200 steps against the paper's 1M" in sentence


def test_format_and_markdown_helpers():
    assert format_score(1.234, 0.5, 3) == "1.23 ± 0.50 (n=3)"
    assert format_score(1.234, float("nan"), 1) == "1.23 (n=1)"
    assert format_score(None, None, 0) == "not run"
    assert markdown_table(["a", "b"], [["1", "x|y"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y |"
    readme = "intro\n<!-- results:begin -->\nold\n<!-- results:end -->\nrest\n"
    assert replace_marked_block(readme, "new\n") == "intro\n<!-- results:begin -->\nnew\n<!-- results:end -->\nrest\n"
    with pytest.raises(ValueError, match="markers"):
        replace_marked_block("no markers here", "x")


def test_paired_heldout_delta_by_hand():
    rows_b = pd.DataFrame({"row": range(5), "lang": ["en", "en", "hi", "hi", "hi"], "loss": [3.0, 3.0, 4.0, 4.0, 4.0]})
    rows_a = rows_b.assign(loss=rows_b["loss"] + [0.1, 0.3, 0.0, 0.2, 0.4])
    delta, se = paired_heldout_delta(rows_a, rows_b, {"en": 0.25, "hi": 0.75, "zh": 0.5})
    # zh has no rows: en and hi keep their 1 : 3 ratio. Per language the mean differences are 0.2 and 0.2;
    # their standard errors 0.1414 / sqrt(2) = 0.1 and 0.2 / sqrt(3)
    assert delta == pytest.approx(0.2)
    assert se == pytest.approx(math.sqrt(0.25 ** 2 * 0.1 ** 2 + 0.75 ** 2 * 0.2 ** 2 / 3))
    with pytest.raises(ValueError, match="different held-out rows"):
        paired_heldout_delta(rows_a.iloc[:4], rows_b, {"en": 1.0, "hi": 1.0})


def test_offline_table_reports_the_control_and_both_noises():
    runs = pd.DataFrame({"run_name": ["b0", "b1", "c0", "c1", "p0", "p1"],
                         "method": ["baseline"] * 2 + ["presence-shuffled"] * 2 + ["presence"] * 2,
                         "seed": [0, 1] * 3, "standard": [True] * 6,
                         "final_heldout_loss": [4.0, 4.2, 4.1, 4.3, 3.9, 4.0], "final_heldout_se": [0.05] * 6})
    paired = pd.DataFrame({"variant": ["presence"] * 4, "reference": ["baseline"] * 2 + ["presence-shuffled"] * 2,
                           "seed": [0, 1, 0, 1], "delta": [-0.1, -0.2, -0.2, -0.3], "eval_se": [0.01, 0.03, 0.02, 0.02]})
    offline = offline_table(TABLE3, runs, None, "tiny", paired).set_index(["task", "method"])
    presence = offline.loc[("heldout_loss", "presence")]
    assert presence["ours_delta_vs_baseline"] == pytest.approx(-0.15)
    assert presence["ours_delta_seed_std"] == pytest.approx(math.sqrt(0.005))  # sample std of -0.1, -0.2
    assert presence["ours_delta_eval_se"] == pytest.approx(0.02)
    assert presence["ours_delta_vs_control"] == pytest.approx(-0.25)
    assert presence["ours_delta_vs_control_eval_se"] == pytest.approx(0.02)
    assert offline.loc[("heldout_loss", "baseline"), "ours_eval_se"] == pytest.approx(0.05)
    text = "\n".join(offline_markdown(TABLE3, offline.reset_index()))
    assert "-0.150 (seed std 0.071) [eval SE 0.020]" in text and "-0.250 (seed std 0.071) [eval SE 0.020]" in text
    sentence = direction_summary(comparison_table(TABLE3, load_paper_results(), pd.DataFrame(
        columns=["variant", "seed", "task", "setting", "metric", "value"]), "tiny"), offline.reset_index(), 200)
    assert "against the information control" in sentence and "Δ -0.250" in sentence


@pytest.mark.parametrize("options", [
    ["--method", "presence", "--seed", "1"], ["--method", "presence-single", "--tau", "-2"],
    ["--method", "presence", "--switch-step", "50"], ["--method", "presence", "--si-layers", "all"],
    ["--method", "presence-shuffled", "--per", "sample", "--noise-rate", "0.2", "--set", "data.noise_rates=[0.2]"],
    ["--method", "noise-oracle", "--noise-rate", "0.2", "--set", "data.noise_rates=[0.2]", "--seed", "2"],
])
def test_the_default_run_name_of_a_recipe_is_the_one_pretrain_gives(options):
    """The tables pick a recipe's run by the name 03_pretrain/pretrain.py gives it by default; both must agree."""
    pretrain = load_stage("03_pretrain/pretrain.py")
    args = pretrain.parse_args(["--preset", "tiny", *options])
    config = {"method": args.method, "seed": args.seed, "tau": args.tau, "per": args.per,
              "noise_rate": args.noise_rate, "preset": pretrain.get_config(args)[0].to_dict()}
    assert default_run_name(config, load_preset("tiny").pretrain) == pretrain.default_run_name(args)


def test_repeats_of_a_recipe_and_seed_are_named_with_the_run_used_instead():
    reference, preset = load_preset("tiny").pretrain, load_preset("tiny").to_dict()
    run = {"method": "presence", "tau": None, "per": "microbatch", "preset": preset}
    configs = [{**run, "run_name": name, "seed": seed} for name, seed in
               (("presence-s0", 0), ("check-s0", 0), ("b-s1", 1), ("a-s1", 1), ("presence-s2", 2))]
    notes = []
    assert repeated_runs(configs, reference, notes) == {"check-s0": "presence-s0", "b-s1": "a-s1"}
    assert len(notes) == 2 and "none is named presence-s1" in notes[1]


@pytest.mark.parametrize("preset, model_text", [
    ("tiny", "T5 v1.1, d_model 64, 2+2 layers, span corruption (0.6M parameters)"),
    ("presets/variants/tiny_gpt2.yaml", "GPT-2, d_model 80, 4 layers, next-token prediction (0.6M parameters)"),
    ("presets/variants/tiny_bert.yaml", "BERT, d_model 80, 4 layers, masked-token prediction"),
])
def test_our_scale_names_the_model_family_and_its_objective(preset, model_text):
    from common.reporting.result_tables import describe_our_scale
    text = describe_our_scale(load_preset(preset), 642_800)
    assert model_text in text and ("T5" in text) == (preset == "tiny"), text


def test_stream_weight_shift_is_weight_over_batch_share_per_stage_with_absent_streams_as_zero(tmp_path):
    """Two seeds, switch step 10, logs at steps 10 and 20. Seed 0: stream a holds 1/2 of the batch and 3/4 of the
    weight at step 10; at step 20 b alone (a absent: share 0). Seed 1: a 1/2 and 1/4 at step 10, and a 1/4
    with weight 1/2 at step 20. By hand, per seed the mean weight share over the mean batch share:
    stage 1, a: 1.5 and 0.5 (mean 1.0); stage 2, a: seed 0 has 0/0 (no rows), seed 1 (1/2) / (1/4) = 2."""
    from common.reporting.streams import stream_weight_shift
    logs = {0: [(10, "a", 0.5, 0.75), (10, "b", 0.5, 0.25), (20, "b", 1.0, 1.0), (20, "c", 0.0, 0.0)],
            1: [(10, "a", 0.5, 0.25), (10, "b", 0.5, 0.75), (20, "a", 0.25, 0.5), (20, "b", 0.75, 0.5)]}
    for seed, rows in logs.items():
        run = tmp_path / f"presence-s{seed}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"method": "presence", "seed": seed, "per": "microbatch",
                                                     "preset": {"pretrain": {"switch_step": 10}}}))
        (run / "metrics.json").write_text("{}")
        (run / "stream_weights.csv").write_text("step,stream,batch_share,weight_share,seed\n" + "".join(
            f"{step},{stream},{b},{w},{seed}\n" for step, stream, b, w in rows))
    table = stream_weight_shift(tmp_path).set_index(["stream", "stage"])
    assert table.loc[("a", "tau1"), "weight_over_batch_mean"] == pytest.approx(1.0)
    assert table.loc[("a", "tau1"), "weight_over_batch_std"] == pytest.approx(math.sqrt(0.5))  # of 1.5 and 0.5
    assert table.loc[("b", "tau1"), "weight_over_batch_mean"] == pytest.approx((0.5 + 1.5) / 2)
    # stage 2: seed 0 never drew a (0/0, left out), seed 1 gave it twice its share
    assert table.loc[("a", "tau2"), "weight_over_batch_mean"] == pytest.approx(2.0)
    assert table.loc[("a", "tau2"), "n_seeds"] == 1
    assert table.loc[("b", "tau2"), "weight_over_batch_mean"] == pytest.approx((1.0 + (0.5 / 0.75)) / 2)

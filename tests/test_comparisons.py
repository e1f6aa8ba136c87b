"""The comparison table on a synthetic family whose answers are computed by hand, and the family of a
preset's runs formed from the table of methods."""
import json
import math

import pandas as pd
import pytest

from common.config import load_preset
from common.reporting.comparisons import COLUMNS, compare_recipes, comparisons_markdown, heldout_family
from common.reporting.run_results import load_pretrain_runs


def t2_two_sided_p(t):
    """Student t with df = 2: CDF 1/2 + t / (2 sqrt(t^2 + 2))."""
    return 1 - abs(t) / math.sqrt(t ** 2 + 2)


def t1_two_sided_p(t):
    """Student t with df = 1 (Cauchy): CDF 1/2 + arctan(t) / pi."""
    return 1 - 2 * math.atan(abs(t)) / math.pi


T2_975 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # df = 2: quantile (2q - 1) / sqrt(2 q (1 - q))
T1_975 = math.tan(math.pi * 0.475)  # df = 1: quantile tan(pi (q - 1/2))


@pytest.fixture
def family():
    """y is the reference; x - y = 1, 2, 3; w - y = 1.0, 1.1, 0.9; z ran seeds 0 and 1 only, z - y = 1, 3."""
    y = {0: 5.0, 1: 6.0, 2: 7.0}
    rows = [("y", s, v) for s, v in y.items()]
    rows += [("x", s, y[s] + d) for s, d in zip(y, (1.0, 2.0, 3.0))]
    rows += [("w", s, y[s] + d) for s, d in zip(y, (1.0, 1.1, 0.9))]
    rows += [("z", s, y[s] + d) for s, d in zip((0, 1), (1.0, 3.0))]
    results = pd.DataFrame(rows, columns=["recipe", "seed", "value"])
    return results, [("x", "y"), ("z", "y"), ("x", "z"), ("w", "y")]


def test_compare_recipes_on_a_hand_computed_family(family):
    table = compare_recipes(*family).set_index(["a", "b"])
    assert list(table.reset_index().columns) == COLUMNS
    # x - y: mean 2, sample std 1, se 1/sqrt(3), t = 2 sqrt(3)
    xy = table.loc[("x", "y")]
    assert xy["n_pairs"] == 3 and xy["seeds"] == "0,1,2"
    assert (xy["mean_a"], xy["mean_b"], xy["delta"]) == pytest.approx((8.0, 6.0, 2.0))
    assert (xy["ci_low"], xy["ci_high"]) == pytest.approx((2 - T2_975 / math.sqrt(3), 2 + T2_975 / math.sqrt(3)))
    p_xy = t2_two_sided_p(2 * math.sqrt(3))
    assert xy["t_p"] == pytest.approx(p_xy) and xy["sign_p"] == pytest.approx(0.25)
    # z - y on seeds 0, 1 only: differences 1, 3: mean 2, std sqrt(2), se 1, t = 2, df = 1
    zy = table.loc[("z", "y")]
    assert zy["n_pairs"] == 2 and zy["seeds"] == "0,1"
    assert (zy["mean_a"], zy["mean_b"]) == pytest.approx((7.5, 5.5))  # the means over the paired seeds
    assert (zy["ci_low"], zy["ci_high"]) == pytest.approx((2 - T1_975, 2 + T1_975))
    p_zy = t1_two_sided_p(2.0)
    assert zy["t_p"] == pytest.approx(p_zy)
    # x - z on seeds 0, 1: differences 0, -1: mean -0.5, se 0.5, t = -1; the sign test drops the tie
    xz = table.loc[("x", "z")]
    assert xz["delta"] == pytest.approx(-0.5) and xz["t_p"] == pytest.approx(0.5) and xz["sign_p"] == pytest.approx(1.0)
    # w - y: mean 1, std 0.1, t = 1 / (0.1 / sqrt(3))
    p_wy = t2_two_sided_p(math.sqrt(3) / 0.1)
    assert table.loc[("w", "y"), "t_p"] == pytest.approx(p_wy)
    # Holm over the four: sorted p_wy < p_xy < p_zy < 0.5, multiplied by 4, 3, 2, 1 and made monotone
    holm = {("w", "y"): 4 * p_wy, ("x", "y"): 3 * p_xy, ("z", "y"): 2 * p_zy, ("x", "z"): max(2 * p_zy, 0.5)}
    for pair, expected in holm.items():
        assert table.loc[pair, "holm_p"] == pytest.approx(expected)
    assert table["distinguishable"].to_dict() == {("x", "y"): False, ("z", "y"): False, ("x", "z"): False,
                                                  ("w", "y"): True}


def test_markdown_gives_the_interval_and_says_where_the_seeds_do_not_decide(family):
    text = comparisons_markdown(compare_recipes(*family))
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "+1.000 (+0.752 to +1.248)" in lines["w − y"] and lines["w − y"].endswith("| distinguishable |")
    assert lines["x − y"].endswith("| not distinguishable at 3 seeds |")
    assert "| 2 (0,1) |" in lines["z − y"] and lines["z − y"].endswith("| not distinguishable at 2 seeds |")
    assert "over the 4 comparisons" in text and "cannot fall below 0.25" in text


def test_a_comparison_without_common_seeds_is_reported_not_filled():
    results = pd.DataFrame({"recipe": ["a", "b", "c", "c"], "seed": [0, 1, 0, 1], "value": [1.0, 2.0, 3.0, 5.0]})
    table = compare_recipes(results, [("a", "b"), ("c", "b")])
    assert table.loc[0, "n_pairs"] == 0 and math.isnan(table.loc[0, "delta"]) and math.isnan(table.loc[0, "holm_p"])
    assert not table.loc[0, "distinguishable"]
    assert "| a − b | 0 |" in comparisons_markdown(table)
    # c - b has one seed: a difference, no test; the family has no p-value at all
    assert table.loc[1, "delta"] == pytest.approx(3.0) and math.isnan(table.loc[1, "t_p"])


def test_compare_recipes_refuses_what_it_cannot_pair():
    good = pd.DataFrame({"recipe": ["a", "b"], "seed": [0, 0], "value": [1.0, 2.0]})
    with pytest.raises(ValueError, match="without a value"):
        compare_recipes(good.assign(value=[1.0, float("nan")]), [("a", "b")])
    with pytest.raises(ValueError, match="more than one run"):
        compare_recipes(pd.concat([good, good]), [("a", "b")])
    with pytest.raises(ValueError, match="no runs of the recipes \\['c'\\]"):
        compare_recipes(good, [("a", "c")])


def runs_frame(rows):
    """The columns of load_pretrain_runs that heldout_family reads: method, per, tau, noise rate, seed, final
    held-out loss, default knobs."""
    return pd.DataFrame(rows, columns=["method", "per", "tau", "noise_rate", "seed", "final_heldout_loss",
                                       "default_knobs"])


def test_heldout_family_pairs_every_method_with_the_baseline_and_each_of_its_controls():
    rows = []
    for seed in range(3):
        rows += [("baseline", "microbatch", None, 0.0, seed, 4.0, True),
                 ("presence", "microbatch", None, 0.0, seed, 4.1, True),
                 ("presence-shuffled", "microbatch", None, 0.0, seed, 4.2, True),
                 ("presence-matched", "microbatch", None, 0.0, seed, 4.15, True),
                 ("presence", "microbatch", None, 0.0, seed, 3.0, False),  # I=50: not the preset's recipe
                 ("baseline", "microbatch", None, 0.2, seed, 4.3, True),
                 ("presence", "sample", None, 0.2, seed, 4.4, True),
                 ("presence-shuffled", "sample", None, 0.2, seed, 4.5, True),
                 ("noise-oracle", "microbatch", None, 0.2, seed, 4.25, True)]
    rows += [("presence-single", "microbatch", 2.0, 0.0, 0, 4.6, True),
             ("presence-sequential", "microbatch", None, 0.0, 1, float("nan"), True)]  # no loss: left out
    results, comparisons = heldout_family(runs_frame(rows))
    noisy = " at noise 0.2"
    assert comparisons == [
        ("presence-shuffled", "baseline"), ("presence", "baseline"), ("presence-single tau=+2", "baseline"),
        ("presence-matched", "baseline"), ("presence", "presence-shuffled"), ("presence", "presence-matched"),
        ("presence-shuffled (per-sample)" + noisy, "baseline" + noisy),
        ("presence (per-sample)" + noisy, "baseline" + noisy), ("noise-oracle" + noisy, "baseline" + noisy),
        ("presence (per-sample)" + noisy, "presence-shuffled (per-sample)" + noisy)]
    presence = results[results["recipe"] == "presence"]
    assert list(presence["value"]) == [4.1, 4.1, 4.1]  # the I=50 runs are not among them
    assert "presence-sequential" not in set(results["recipe"])


def test_heldout_family_without_a_baseline_compares_controls_only():
    rows = [("presence", "microbatch", None, 0.0, 0, 4.1, True),
            ("presence-shuffled", "microbatch", None, 0.0, 0, 4.2, True)]
    assert heldout_family(runs_frame(rows))[1] == [("presence", "presence-shuffled")]


def test_default_knobs_allow_granularity_and_noise_but_no_other_change(tmp_path):
    reference = load_preset("tiny").pretrain
    preset = load_preset("tiny").to_dict()
    changed = json.loads(json.dumps(preset))
    changed["pretrain"]["switch_step"] = 50
    configs = {"presence-per-sample-noise0.2-s0": {"per": "sample", "noise_rate": 0.2, "preset": preset},
               "presence-I50-s0": {"per": "microbatch", "preset": changed}}
    for name, config in configs.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"run_name": name, "method": "presence", "seed": 0,
                                                        "tau": None, **config}))
        (folder / "metrics.json").write_text(json.dumps({"final_heldout_loss": 4.5}))
    runs = load_pretrain_runs(tmp_path, reference, [])[0].set_index("run_name")
    assert runs.loc["presence-per-sample-noise0.2-s0", "default_knobs"]
    assert not runs.loc["presence-per-sample-noise0.2-s0", "standard"]
    assert not runs.loc["presence-I50-s0", "default_knobs"]


def test_the_answer_table_picks_its_questions_across_presets():
    from common.reporting.comparisons import answer_markdown
    row = dict(n_pairs=10, seeds="0-9", mean_a=1.0, mean_b=1.0, t_p=0.01, sign_p=0.02, distinguishable=True)
    tiny = pd.DataFrame([
        dict(row, a="presence", b="baseline", delta=0.1, ci_low=0.05, ci_high=0.15, holm_p=0.02),
        dict(row, a="presence-beyond-loss", b="presence-beyond-loss-shuffled", delta=-0.01, ci_low=-0.03,
             ci_high=0.01, holm_p=0.4, distinguishable=False),
        dict(row, a="presence-D", b="baseline", delta=0.2, ci_low=0.1, ci_high=0.3, holm_p=0.01)])
    noisy = pd.DataFrame([dict(row, a="presence (per-sample) at noise 0.2", b="sow-linupper (per-sample) at noise 0.2",
                               delta=-0.02, ci_low=-0.04, ci_high=0.0, holm_p=0.06, distinguishable=False)])
    text = answer_markdown({"tiny": tiny, "tiny_x10": noisy})
    lines = [line for line in text.splitlines() if line.startswith("| tiny")]
    assert len(lines) == 3  # presence-D answers no question
    assert "| tiny | does PRESENCE beat the baseline? | presence − baseline | 10 | +0.100 (+0.050 to +0.150) | 0.020 | " \
           "distinguishable |" in text
    assert "not distinguishable at 10 seeds" in lines[1] and "SI carry information beyond the loss" in lines[1]
    assert "presence (per-sample) at noise 0.2 − sow-linupper (per-sample) at noise 0.2" in lines[2]
    assert answer_markdown({}) == "No comparison has been run yet.\n"


def test_heldout_family_sets_presence_against_the_other_score_sources():
    rows = []
    for seed in range(2):
        rows += [("baseline", "microbatch", None, 0.0, seed, 4.0, True),
                 ("presence", "microbatch", None, 0.0, seed, 4.1, True),
                 ("presence-loss", "microbatch", None, 0.0, seed, 4.05, True),
                 ("presence-loss-shuffled", "microbatch", None, 0.0, seed, 4.07, True),
                 ("presence", "sample", None, 0.0, seed, 4.2, True),
                 ("sow-linupper", "sample", None, 0.0, seed, 4.02, True)]
    comparisons = heldout_family(runs_frame(rows))[1]
    assert ("presence", "presence-loss") in comparisons
    assert ("presence (per-sample)", "sow-linupper (per-sample)") in comparisons
    assert ("presence-loss", "presence-loss-shuffled") in comparisons
    assert ("presence", "presence-loss-shuffled") not in comparisons  # a control is compared with its own method

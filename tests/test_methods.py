"""The table of methods: each record against the paper's definitions, the plan a recipe makes per step, and
that no other module of common/ or the stages spells a method's name out."""
import ast
import io
import tokenize

import numpy as np
import pytest
import torch

from common.config import load_preset
from common.paths import REPO_ROOT
from common.presence import methods
from common.presence.methods import BY_NAME, METHODS, Knobs, Recipe, get_method
from common.presence.reweighting import Constant, Cosine, Linear, TwoStage
from common.reporting.run_results import recipe_changes

KNOBS = Knobs(tau_direct=1.0, tau_inverse=-1.0, switch_step=10, steps=100, tau=-2.0)


def test_methods_map_to_the_paper_schedules():
    expected = {"baseline": None, "presence": TwoStage(1.0, -1.0, 10), "presence-shuffled": TwoStage(1.0, -1.0, 10),
                "presence-D": Constant(1.0), "presence-I": Constant(-1.0), "presence-I-D": TwoStage(-1.0, 1.0, 10),
                "presence-single": Constant(-2.0), "presence-linear": Linear(1.0, -1.0, 100),
                "presence-cosine": Cosine(1.0, -1.0, 100), "presence-sequential": None,
                "presence-sequential-reverse": None, "noise-oracle": None, "presence-matched": None,
                "presence-loss": TwoStage(1.0, -1.0, 10), "presence-loss-shuffled": TwoStage(1.0, -1.0, 10),
                "presence-beyond-loss": TwoStage(1.0, -1.0, 10),
                "presence-beyond-loss-shuffled": TwoStage(1.0, -1.0, 10),
                # Sow et al.: uniform (tau 0) for 5% of the steps, then exp(f / r) with r = 1
                "sow-linupper": TwoStage(0.0, 1.0, 5), "sow-quadratic": TwoStage(0.0, 1.0, 5),
                "sow-extremes": TwoStage(0.0, 1.0, 5)}
    assert {m.name: m.tau_schedule(KNOBS) for m in METHODS} == expected


def test_a_schedule_reads_only_the_knobs_it_declares():
    """Changing a knob a method does not declare leaves its schedule unchanged (so the knob is neither
    validated against it nor part of its recipe); changing one it declares changes it."""
    changed = {"tau_direct": 3.0, "tau_inverse": -3.0, "switch_step": 50, "steps": 7, "tau": 5.0}
    for method in METHODS:
        for knob, value in changed.items():
            other = Knobs(**{**KNOBS.__dict__, knob: value})
            moved = method.tau_schedule(other) != method.tau_schedule(KNOBS)
            assert moved == (knob in method.reads), (method.name, knob)


def test_records_are_consistent():
    assert len({m.color.lower() for m in METHODS}) == len(METHODS), "colours must be unique"
    assert len({m.label for m in METHODS}) == len(METHODS)
    for m in METHODS:
        assert set(m.reads) <= set(methods.KNOBS) and set(m.granularities) <= {"microbatch", "sample"}
        assert (m.update == "scores") == (m.scores is not None)
        assert (m.control is None) == (m.controls is None)
        assert m.controls is None or m.controls in BY_NAME
    assert methods.controls_of("presence") == (methods.CONTROL, BY_NAME["presence-matched"])
    assert methods.paper_rows("table3") == ("baseline", "presence-shuffled", "presence")
    assert methods.paper_rows("table5") == ("baseline", "presence-shuffled", "presence-D", "presence-I",
                                            "presence-I-D", "presence")
    assert methods.single_stage_taus() == {"baseline": 0.0, "presence-D": 1.0, "presence-I": -1.0}
    with pytest.raises(ValueError, match="unknown method 'presense'"):
        get_method("presense")


def test_a_recipe_plans_each_step():
    presence = Recipe.of(get_method("presence"), "sample", 3, KNOBS)
    assert [presence.plan(s).tau for s in (1, 10, 11)] == [1.0, 1.0, -1.0]
    assert presence.plan(5).update == "scores" and presence.plan(5).per == "sample"
    assert presence.plan(5).shuffle_seed is None
    control = Recipe.of(get_method("presence-shuffled"), "microbatch", 3, KNOBS)
    seeds = [control.plan(s).shuffle_seed for s in (1, 2, 1)]
    assert seeds[0] == seeds[2] != seeds[1]  # a pure function of (seed, step): a resume draws the same ones
    assert Recipe.of(get_method("presence-shuffled"), "microbatch", 4, KNOBS).plan(1).shuffle_seed != seeds[0]
    baseline = Recipe.of(get_method("baseline"), "microbatch", 0, KNOBS).plan(1)
    assert baseline.update == "uniform" and baseline.tau is None
    measured = Recipe.of(get_method("baseline"), "microbatch", 0, KNOBS, measure_scores=True).plan(1)
    assert (measured.update, measured.tau, measured.shuffle_seed) == ("scores", 0.0, None)
    oracle = Recipe.of(get_method("noise-oracle"), "microbatch", 0, KNOBS)
    plan = oracle.plan(1, np.array([0, 2, 0, 1]))
    assert plan.update == "fixed" and torch.equal(plan.sample_weights, torch.tensor([0.5, 0, 0.5, 0], dtype=torch.float64))
    with pytest.raises(ValueError, match="every row of the batch is noisy"):
        oracle.plan(1, np.array([1, 3]))
    loss = Recipe.of(get_method("presence-loss-shuffled"), "sample", 0, KNOBS).plan(1)
    assert (loss.scores, loss.weighting, loss.update) == ("loss", "softmax-z", "scores") and loss.shuffle_seed
    peer = Recipe.of(get_method("sow-linupper"), "sample", 0, KNOBS)
    assert (peer.plan(5).tau, peer.plan(6).tau, peer.plan(6).weighting) == (0.0, 1.0, "linupper")


def test_the_weight_matched_control_replays_each_step_in_a_random_order():
    replayed = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    for per, field in (("microbatch", "microbatch_weights"), ("sample", "sample_weights")):
        recipe = Recipe.of(get_method("presence-matched"), per, 5, KNOBS, replayed)
        plans = [recipe.plan(step) for step in (1, 2, 1)]
        weights = [getattr(p, field).numpy() for p in plans]
        assert all(p.update == "fixed" for p in plans)
        assert sorted(weights[0]) == sorted(replayed[0]) and sorted(weights[1]) == sorted(replayed[1])
        assert np.array_equal(weights[0], weights[2])  # the same permutation on a resume
    orders = {tuple(Recipe.of(get_method("presence-matched"), "sample", seed, KNOBS, replayed).plan(1)
                    .sample_weights.tolist()) for seed in range(8)}
    assert len(orders) > 1  # the order is random, not the paired run's


def test_a_changed_switch_step_is_another_recipe_only_where_it_is_read():
    reference = load_preset("tiny").pretrain
    config = {"per": "microbatch", "preset": {"pretrain": {"switch_step": reference.switch_step + 5}}}
    assert recipe_changes({**config, "method": "presence"}, reference) == [f"I={reference.switch_step + 5}"]
    for name in ("presence-linear", "presence-cosine", "baseline", "presence-D"):
        assert recipe_changes({**config, "method": name}, reference) == [], name


def _string_literals(path):
    with open(path, encoding="utf-8") as f:
        for token in tokenize.generate_tokens(io.StringIO(f.read()).readline):
            if token.type == tokenize.STRING:
                try:
                    yield token.start[0], ast.literal_eval(token.string)
                except (SyntaxError, ValueError):  # f-strings and the like
                    continue


def test_no_module_but_the_table_spells_a_method_name_out():
    """Consumers read common/presence/methods.py; a literal method name elsewhere in common/ or a stage is a
    second definition waiting to drift (docstrings and messages that only mention one are not literals
    equal to the name). common/config.py is the presets' schema: its default grid is preset data."""
    sources = [p for p in sorted(REPO_ROOT.glob("common/**/*.py")) + sorted(REPO_ROOT.glob("0*_*/*.py"))
               if p.name not in ("methods.py", "config.py")]
    assert sources
    found = [f"{p.relative_to(REPO_ROOT)}:{line}: {value!r}" for p in sources for line, value in _string_literals(p)
             if value in BY_NAME]
    assert not found, found

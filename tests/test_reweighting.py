"""PRESENCE weights and tau schedules against hand-computed values."""
import math

import pytest
import torch

from common.presence.reweighting import (Cosine, Linear, TwoStage, kish_effective_count, presence_weights, shuffle,
                                        standardise)


def weights_of(*args, **kwargs):
    return presence_weights(*args, **kwargs)[0]


def test_weights_match_the_formula_by_hand():
    # scores 1, 2, 3: mean 2, population variance 2/3, so z = (-1, 0, 1) * sqrt(3/2) (eps = 0 here).
    z = math.sqrt(1.5)
    for tau in (1.0, -2.0):
        e = [math.exp(-tau * z), 1.0, math.exp(tau * z)]
        expected = torch.tensor([v / sum(e) for v in e], dtype=torch.float64)
        got = weights_of(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), tau, eps=0.0)
        assert torch.allclose(got, expected, rtol=1e-12, atol=0)


def test_eps_enters_under_the_square_root():
    scores = torch.tensor([0.0, 2.0], dtype=torch.float64)  # population variance 1, mean(|s|) 1
    w = weights_of(scores, 1.0, eps=3.0)  # z = (-1, 1) / sqrt(1 + 3 * 1^2)
    assert torch.allclose(w[1] / w[0], torch.tensor(math.exp(1.0), dtype=torch.float64), rtol=1e-12)


def test_equal_scores_and_a_single_score_give_uniform_weights():
    assert torch.equal(weights_of(torch.full((8,), 3.7), 100.0), torch.full((8,), 0.125))
    assert torch.equal(weights_of(torch.tensor([5.0]), -100.0), torch.tensor([1.0]))


@pytest.mark.parametrize("tau", [-100.0, 100.0])
def test_large_tau_and_large_scores_are_stable(tau):
    scores = torch.tensor([1e30, 3e30, 2e30, 1e-30], dtype=torch.float32)
    w = weights_of(scores, tau)
    assert torch.isfinite(w).all() and w.dtype == torch.float32
    assert torch.allclose(w.sum(), torch.tensor(1.0))
    assert w.argmax() == (1 if tau > 0 else 3)


def test_base_weights_are_returned_at_tau_zero_and_scaled_otherwise():
    scores = torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)
    base = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert torch.allclose(weights_of(scores, 0.0, base_weights=base), base, rtol=1e-15)
    plain = weights_of(scores, 1.5)
    expected = base * plain / (base * plain).sum()
    assert torch.allclose(weights_of(scores, 1.5, base_weights=base), expected, rtol=1e-12)


def test_scores_must_be_a_non_empty_vector():
    with pytest.raises(ValueError):
        weights_of(torch.tensor([]), 1.0)
    with pytest.raises(ValueError):
        weights_of(torch.ones(2, 2), 1.0)


def test_two_stage_is_tau1_up_to_and_including_the_switch_step():
    schedule = TwoStage(1.0, -1.0, switch_step=3)
    assert [schedule.tau_at(step) for step in range(1, 6)] == [1.0, 1.0, 1.0, -1.0, -1.0]


def test_continuous_schedules_by_hand():
    assert [Linear(1.0, -1.0, 5).tau_at(s) for s in range(1, 6)] == [1.0, 0.5, 0.0, -0.5, -1.0]
    cosine = [Cosine(1.0, -1.0, 5).tau_at(s) for s in range(1, 6)]
    assert cosine == pytest.approx([1.0, math.sqrt(0.5), 0.0, -math.sqrt(0.5), -1.0], abs=1e-12)
    assert Linear(2.0, 0.0, 3).tau_at(99) == 0.0 and Cosine(2.0, 0.0, 3).tau_at(0) == 2.0  # clamped


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_weights_do_not_depend_on_the_scores_scale(scale):
    """Self-influence shrinks with the target tokens per microbatch; an absolute eps of 1e-6 would make
    the weights of scores ~1e-6 nearly uniform. The relative eps leaves them unchanged."""
    scores = torch.tensor([0.3, 1.2, 0.7, 2.5, 0.1], dtype=torch.float64)
    for tau in (1.0, -1.0):
        assert torch.allclose(weights_of(scores * scale, tau), weights_of(scores, tau), rtol=1e-12)
    assert standardise(scores * scale)[1] == pytest.approx(standardise(scores)[1], rel=1e-12)


def test_variance_share_by_hand():
    # scores (0, 2): variance 1, eps * mean(|s|)^2 = 3 * 1, so a quarter of the variance survives
    z, share = standardise(torch.tensor([0.0, 2.0], dtype=torch.float64), eps=3.0)
    assert share == pytest.approx(0.25, rel=1e-12)
    assert torch.allclose(z, torch.tensor([-0.5, 0.5], dtype=torch.float64), rtol=1e-12)
    assert standardise(torch.zeros(4))[1] == 1.0 and torch.equal(standardise(torch.zeros(4))[0], torch.zeros(4, dtype=torch.float64))


def test_shuffle_is_a_seeded_permutation():
    scores = torch.arange(16.0)
    a, b, c = shuffle(scores, 7), shuffle(scores, 7), shuffle(scores, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort().values, scores) and not torch.equal(a, scores)


def test_kish_effective_count_by_hand():
    assert kish_effective_count(torch.full((8,), 0.125)) == pytest.approx(8.0)
    assert kish_effective_count(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert kish_effective_count(torch.tensor([0.5, 0.25, 0.25])) == pytest.approx(1 / 0.375)


def test_the_control_weights_the_shuffled_scores_and_keeps_their_variance_share():
    scores = torch.tensor([0.5, 3.0, 1.0, 7.0, 2.0], dtype=torch.float64)
    weights, share = presence_weights(scores, -1.0, shuffle_seed=11)
    assert torch.equal(weights, weights_of(shuffle(scores, 11), -1.0))
    assert sorted(weights.tolist()) == pytest.approx(sorted(weights_of(scores, -1.0).tolist()), rel=1e-12)
    assert share == pytest.approx(standardise(scores)[1], rel=1e-12)

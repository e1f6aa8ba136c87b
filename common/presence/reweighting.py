"""PRESENCE weights and temperature schedules.

Weights: w = softmax(tau * z), z = (s - mean(s)) / sqrt(var(s) + eps * mean(|s|)^2) over the n scores of
one step, with the population variance (divide by n; the paper does not say which). The paper gives no eps;
ours is relative to the scores' own scale, so that multiplying every score by any c > 0 leaves z and the
weights unchanged: self-influence shrinks with the number of target tokens per microbatch (~29k at the
paper's scale), and an absolute eps would flatten the weights there. `variance_share` says how much of
the scores' variance survives the eps (1 when eps is negligible). Since |z_i| <= sqrt(n - 1), the logits
stay bounded and the softmax (computed with its maximum subtracted) is stable for any |tau| <= 100.

The information control (common/presence/methods.py, control "shuffled") forms the weights from the same
scores permuted at random (`shuffle`): the same weight distribution every step, no link between a weight and
its item's influence.

Schedules map an optimizer step to tau. Steps are 1-based: step 1 is the first update, so the two-stage
schedule uses tau1 for steps 1..I and tau2 from step I + 1 on (the paper: "tau = tau1 for step <= I").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

def standardise(scores: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, float]:
    """(z, variance share) in float64: z = (s - mean) / sqrt(var + eps * mean(|s|)^2), and the share
    var / (var + eps * mean(|s|)^2) of the scores' variance that the standardisation keeps (1 when the
    scores are all equal: z is 0 either way)."""
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    s = scores.to(torch.float64)
    centred = s - s.mean()
    variance = centred.square().mean()
    floor = eps * s.abs().mean().square()
    denominator = variance + floor
    if denominator == 0:
        return torch.zeros_like(s), 1.0
    return centred / denominator.sqrt(), (variance / denominator).item()


def presence_weights(scores: torch.Tensor, tau: float, *, eps: float = 1e-6, shuffle_seed: int | None = None,
                     base_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(weights, variance share): softmax(tau * standardise(scores, eps)), in the dtype of `scores`
    (computed in float64), and the share of the scores' variance the standardisation kept. Every weight
    PRESENCE (and its control) applies, and every weight the analyses form, comes from here.

    With `shuffle_seed` the scores are first permuted at random (`shuffle`): the information control. (z is
    permutation-equivariant, so permuting before or after standardising gives the same weights; before
    keeps the arithmetic of the committed runs.) `base_weights` (positive, summing to 1) are the weights the
    unweighted method gives each item; the result is then proportional to base_weights * exp(tau * z), so
    that tau = 0 returns them exactly. The per-sample step needs this when samples have different numbers
    of target tokens."""
    used = scores if shuffle_seed is None else shuffle(scores, shuffle_seed)
    z, share = standardise(used, eps)
    return softmax_weights(z, tau, base_weights).to(scores.dtype), share


def beyond_loss(si: torch.Tensor, loss: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Self-influence beyond the loss, float64: the residual of z(SI) after the least-squares line through
    z(loss) within the step (both standardised, so the line has no intercept and its slope is their
    correlation). presence_weights standardises it again, so that it enters the softmax on PRESENCE's scale."""
    z_si, _ = standardise(si, eps)
    z_loss, _ = standardise(loss, eps)
    spread = z_loss.square().sum()
    slope = (z_si * z_loss).sum() / spread if spread > 0 else 0.0
    return z_si - slope * z_loss


# The shaping functions of Sow et al. (ICLR 2025, "Dynamic Loss-Based Sample Reweighting for Improved Large
# Language Model Pretraining"), on losses scaled to [-delta, delta]: LinUpper min(x + delta, delta) lowers
# the weight of the easiest samples and treats every harder one alike; quadratic 1 - x^2 / delta^2 favours
# mid-range losses; "extremes" |x| favours both ends.
SHAPINGS = {"linupper": lambda x, delta: torch.clamp(x + delta, max=delta),
            "quadratic": lambda x, delta: 1 - x.square() / delta ** 2,
            "extremes": lambda x, delta: x.abs()}


def loss_peer_weights(losses: torch.Tensor, tau: float, shaping: str = "linupper", delta: float = 1.0,
                      base_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sow et al.'s sample weights, float64: the step's losses scaled to [-delta, delta] by their minimum
    and maximum, shaped, and w proportional to exp(tau * f) (their exp(f / r): tau = 1 / r; tau = 0 is
    their uniform warm-up), times `base_weights` as presence_weights does."""
    if shaping not in SHAPINGS:
        raise ValueError(f"unknown shaping {shaping!r}. Fix: use one of {', '.join(SHAPINGS)}")
    loss = losses.to(torch.float64)
    span = torch.clamp(loss.max() - loss.min(), min=1e-6)  # their floor, for a batch of equal losses
    scaled = 2 * delta * (loss - (loss.max() + loss.min()) / 2) / span
    return softmax_weights(SHAPINGS[shaping](scaled, delta), tau, base_weights)


def softmax_weights(z: torch.Tensor, tau: float, base_weights: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(tau * z), times `base_weights` and renormalised when given; float64."""
    logits = tau * z.to(torch.float64)
    if base_weights is not None:
        logits = logits + torch.log(base_weights.to(torch.float64))
    return torch.softmax(logits, dim=0)


def shuffle(scores: torch.Tensor, seed: int) -> torch.Tensor:
    """`scores` in a random order that is a pure function of `seed` (a run seeds it with its own seed and
    the step, so a resumed run draws the permutations an uninterrupted one would)."""
    generator = torch.Generator().manual_seed(seed)
    return scores[torch.randperm(scores.numel(), generator=generator).to(scores.device)]


def kish_effective_count(weights: torch.Tensor) -> float:
    """Kish's effective sample size 1 / sum(w^2) of weights summing to 1: n for uniform weights, 1 when
    one item has all the weight."""
    w = weights.to(torch.float64)
    return (w.sum().square() / w.square().sum()).item()


@dataclass(frozen=True)
class Constant:
    """Single-stage: the same tau at every step (PRESENCE-D: +1, PRESENCE-I: -1, the tau ablation)."""
    tau: float

    def tau_at(self, step: int) -> float:
        return self.tau


@dataclass(frozen=True)
class TwoStage:
    """tau1 for steps 1..switch_step, tau2 after. PRESENCE: (+1, -1); PRESENCE-I-D (reversed): (-1, +1)."""
    tau1: float
    tau2: float
    switch_step: int

    def tau_at(self, step: int) -> float:
        return self.tau1 if step <= self.switch_step else self.tau2


@dataclass(frozen=True)
class Linear:
    """tau moves linearly from tau1 at step 1 to tau2 at step total_steps (an extension: the paper asks for
    continuous schedules)."""
    tau1: float
    tau2: float
    total_steps: int

    def tau_at(self, step: int) -> float:
        return self.tau1 + (self.tau2 - self.tau1) * _progress(step, self.total_steps)


@dataclass(frozen=True)
class Cosine:
    """tau follows half a cosine from tau1 at step 1 to tau2 at step total_steps: it stays near tau1 early,
    crosses zero mid-run, and settles near tau2 (an extension, like a cosine learning-rate decay)."""
    tau1: float
    tau2: float
    total_steps: int

    def tau_at(self, step: int) -> float:
        return self.tau2 + (self.tau1 - self.tau2) * (1 + math.cos(math.pi * _progress(step, self.total_steps))) / 2


def _progress(step: int, total_steps: int) -> float:
    """0 at step 1, 1 at step total_steps (clamped outside)."""
    if total_steps <= 1:
        return 1.0
    return min(max((step - 1) / (total_steps - 1), 0.0), 1.0)


TauSchedule = Constant | TwoStage | Linear | Cosine


def group_shares(groups: np.ndarray, weights: np.ndarray, names: list[str]) -> list[dict]:
    """For each group present among the items (groups[i] indexes `names`: a row's language or source
    stream), its share of the items and its share of the weight (weights sum to 1), in the order of names."""
    groups, weights = np.asarray(groups), np.asarray(weights, dtype=float)
    return [{"stream": names[g], "batch_share": float(np.mean(groups == g)),
             "weight_share": float(weights[groups == g].sum() / weights.sum())} for g in np.unique(groups)]

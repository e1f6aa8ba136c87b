"""The pre-training methods, one record each: the only place that says what a method is.

Every consumer reads this table: the command line of 03_pretrain and its validation, the step (what it
weights and how), run naming and recipe comparison, tables (labels, the paper's rows) and figures
(colours). A method's record says:
- its tau schedule (`schedule`, from the run's knobs) and the knobs it reads (`reads`): a knob it does not
  read is neither validated against it nor part of its recipe;
- how the update is formed (`update`): "uniform" (the baseline's mean gradient), "scores" (PRESENCE's
  softmax(tau * z) of per-item scores), "clean-rows" (fixed weights: 0 on rows known to be noisy);
- where its scores come from (`scores`: self-influence) and its control (`control`: "shuffled" scores the
  same items with the scores permuted within each step, the same weights with no information), with
  `controls` naming the method it is the control of;
- the granularities it allows (`granularities`: per microbatch, the paper's, and per sample);
- what it needs (`needs`: "noise_labels", the rows of a --noise-rate copy; "scorer_run", the baseline run
  of the same seed that scores the data offline) and a data filter (`data_filter`, Sequential);
- its label and colour in tables and figures, and the paper tables it has a row in.

Adding a method is adding one record to METHODS, e.g. a half-strength PRESENCE:

    Method("presence-half", "PRESENCE (|tau| = 0.5)", "#f7b6d2", update="scores", scores=SELF_INFLUENCE,
           granularities=BOTH, reads=("tau_direct", "tau_inverse", "switch_step"),
           schedule=lambda k: TwoStage(k.tau_direct / 2, k.tau_inverse / 2, k.switch_step))

The order of METHODS is the paper's row order in its tables (baseline first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from common.presence.presence_step import StepPlan
from common.presence.reweighting import Constant, Cosine, Linear, TauSchedule, TwoStage

SELF_INFLUENCE = "self-influence"
LOSS = "loss"  # the item's own mean token loss
BEYOND_LOSS = "si-beyond-loss"  # z(SI) less its least-squares fit on z(loss) within the step
# Sow et al. (ICLR 2025): r = 1 ("kl_reg"), uniform weights for the first 5% of the steps (their 1,000 of
# 20,000 "burnout" steps), delta = 1.
PEER_R = 1.0
PEER_WARMUP_FRACTION = 0.05
BOTH = ("microbatch", "sample")
TWO_STAGE_KNOBS = ("tau_direct", "tau_inverse", "switch_step")
# Knobs a method may read: the preset's pretrain.tau_direct, tau_inverse, switch_step (I), steps, si_layers,
# and the run's own --tau.
KNOBS = ("tau_direct", "tau_inverse", "switch_step", "steps", "si_layers", "tau")


@dataclass(frozen=True)
class Knobs:
    """What a schedule may read: the preset's values and the run's --tau."""
    tau_direct: float
    tau_inverse: float
    switch_step: int
    steps: int
    tau: float | None = None


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # in tables and figures
    color: str  # in figures; unique
    update: str = "uniform"  # uniform | scores | clean-rows | replay (a paired run's weights, permuted)
    schedule: Callable[[Knobs], TauSchedule] | None = None  # tau per step; None: no temperature
    reads: tuple[str, ...] = ()  # of KNOBS
    scores: str | None = None  # where the scores come from (SELF_INFLUENCE, LOSS, BEYOND_LOSS), update "scores"
    weighting: str = "softmax-z"  # PRESENCE's softmax(tau * z), or a shaping of Sow et al. (reweighting.SHAPINGS)
    control: str | None = None  # None; "shuffled": scores permuted within the step before weighting;
    #                             "weight-matched": the paired run's weights each step, in a random order
    controls: str | None = None  # the method this one is the control of
    granularities: tuple[str, ...] = ("microbatch",)
    needs: tuple[str, ...] = ()  # "noise_labels", "scorer_run", "paired_run" (the controlled method's run)
    data_filter: str | None = None  # Sequential: "keep-lowest" / "keep-highest" share of the scored rows
    paper_tables: tuple[str, ...] = ()  # the paper's tables with a row of this method

    def tau_schedule(self, knobs: Knobs) -> TauSchedule | None:
        return None if self.schedule is None else self.schedule(knobs)


METHODS = (
    Method("baseline", "Baseline", "#4d4d4d", paper_tables=("table2", "table3", "table5")),
    Method("presence-sequential-reverse", "PRESENCE-Sequential-reverse", "#8c564b", reads=("si_layers",),
           needs=("scorer_run",), data_filter="keep-highest", paper_tables=("table2",)),
    Method("presence-sequential", "PRESENCE-Sequential", "#d62728", reads=("si_layers",), needs=("scorer_run",),
           data_filter="keep-lowest", paper_tables=("table2",)),
    Method("presence-shuffled", "PRESENCE-shuffled (control)", "#b0b0b0", update="scores", scores=SELF_INFLUENCE,
           control="shuffled", controls="presence", granularities=BOTH, reads=TWO_STAGE_KNOBS + ("si_layers",),
           schedule=lambda k: TwoStage(k.tau_direct, k.tau_inverse, k.switch_step), paper_tables=("table3", "table5")),
    Method("presence-D", "PRESENCE-D", "#ff7f0e", update="scores", scores=SELF_INFLUENCE, granularities=BOTH,
           reads=("tau_direct", "si_layers"), schedule=lambda k: Constant(k.tau_direct), paper_tables=("table5",)),
    Method("presence-I", "PRESENCE-I", "#2ca02c", update="scores", scores=SELF_INFLUENCE, granularities=BOTH,
           reads=("tau_inverse", "si_layers"), schedule=lambda k: Constant(k.tau_inverse), paper_tables=("table5",)),
    Method("presence-I-D", "PRESENCE-I-D", "#9467bd", update="scores", scores=SELF_INFLUENCE, granularities=BOTH,
           reads=TWO_STAGE_KNOBS + ("si_layers",), schedule=lambda k: TwoStage(k.tau_inverse, k.tau_direct, k.switch_step),
           paper_tables=("table5",)),
    Method("presence", "PRESENCE", "#1f77b4", update="scores", scores=SELF_INFLUENCE, granularities=BOTH,
           reads=TWO_STAGE_KNOBS + ("si_layers",), schedule=lambda k: TwoStage(k.tau_direct, k.tau_inverse, k.switch_step),
           paper_tables=("table3", "table5")),
    # The paper's single-stage tau ablation (Figure 5): one constant temperature, given with --tau.
    Method("presence-single", "PRESENCE (single-stage tau)", "#c49c94", update="scores", scores=SELF_INFLUENCE,
           granularities=BOTH, reads=("tau", "si_layers"), schedule=lambda k: Constant(k.tau)),
    # Continuous schedules from tau1 to tau2 over the run (the paper names them as an open question).
    Method("presence-linear", "PRESENCE-linear", "#e377c2", update="scores", scores=SELF_INFLUENCE,
           granularities=BOTH, reads=("tau_direct", "tau_inverse", "steps", "si_layers"),
           schedule=lambda k: Linear(k.tau_direct, k.tau_inverse, k.steps)),
    Method("presence-cosine", "PRESENCE-cosine", "#17becf", update="scores", scores=SELF_INFLUENCE,
           granularities=BOTH, reads=("tau_direct", "tau_inverse", "steps", "si_layers"),
           schedule=lambda k: Cosine(k.tau_direct, k.tau_inverse, k.steps)),
    # The weight-matched control: each step, the weight vector the paired PRESENCE run (same seed and recipe)
    # applied, given to the items in a random order: the same multiset of weights, no information.
    Method("presence-matched", "PRESENCE-matched (control)", "#7f7f7f", update="replay", control="weight-matched",
           controls="presence", granularities=BOTH, needs=("paired_run",), reads=("si_layers",)),
    # Is self-influence more than the loss? PRESENCE's schedule and weights on the loss, and on the part of
    # SI the loss does not explain, each with its shuffled control.
    Method("presence-loss", "loss score", "#8c6d31", update="scores", scores=LOSS, granularities=BOTH,
           reads=TWO_STAGE_KNOBS, schedule=lambda k: TwoStage(k.tau_direct, k.tau_inverse, k.switch_step)),
    Method("presence-loss-shuffled", "loss score, shuffled (control)", "#d6c39a", update="scores", scores=LOSS,
           control="shuffled", controls="presence-loss", granularities=BOTH, reads=TWO_STAGE_KNOBS,
           schedule=lambda k: TwoStage(k.tau_direct, k.tau_inverse, k.switch_step)),
    Method("presence-beyond-loss", "SI beyond the loss", "#393b79", update="scores", scores=BEYOND_LOSS,
           granularities=BOTH, reads=TWO_STAGE_KNOBS + ("si_layers",),
           schedule=lambda k: TwoStage(k.tau_direct, k.tau_inverse, k.switch_step)),
    Method("presence-beyond-loss-shuffled", "SI beyond the loss, shuffled (control)", "#9c9ede", update="scores",
           scores=BEYOND_LOSS, control="shuffled", controls="presence-beyond-loss", granularities=BOTH,
           reads=TWO_STAGE_KNOBS + ("si_layers",),
           schedule=lambda k: TwoStage(k.tau_direct, k.tau_inverse, k.switch_step)),
    # The published loss-reweighting peer (Sow et al., ICLR 2025), per sample as they run it: losses of the
    # global batch min-max scaled to [-1, 1], shaped, w proportional to exp(f / r), uniform during a warm-up.
    *(Method(f"sow-{shaping}", f"loss reweighting, {shaping} (Sow et al. 2025)", color, update="scores",
             scores=LOSS, weighting=shaping, granularities=("sample",), reads=("steps",),
             schedule=lambda k: TwoStage(0.0, 1 / PEER_R, round(PEER_WARMUP_FRACTION * k.steps)))
      for shaping, color in (("linupper", "#843c39"), ("quadratic", "#ad494a"), ("extremes", "#e7969c"))),
    # Weight 0 on the rows known to be noisy, uniform on the others: what a perfect detector could gain.
    Method("noise-oracle", "noise oracle", "#98df8a", update="clean-rows", needs=("noise_labels",),
           reads=("si_layers",)),
)
BY_NAME = {method.name: method for method in METHODS}
NAMES = tuple(BY_NAME)
BASELINE = BY_NAME["baseline"]  # the reference of every comparison
PRESENCE = BY_NAME["presence"]  # the paper's method
ORACLE = BY_NAME["noise-oracle"]
MATCHED = BY_NAME["presence-matched"]  # PRESENCE's weight-matched control
LOSS_SCORE, LOSS_CONTROL = BY_NAME["presence-loss"], BY_NAME["presence-loss-shuffled"]
BEYOND, BEYOND_CONTROL = BY_NAME["presence-beyond-loss"], BY_NAME["presence-beyond-loss-shuffled"]
PEER = BY_NAME["sow-linupper"]  # the published loss-reweighting peer with its default shaping
SEQUENTIAL = BY_NAME["presence-sequential"]
SEQUENTIAL_REVERSE = BY_NAME["presence-sequential-reverse"]


@dataclass(frozen=True)
class Recipe:
    """A method as one run applies it: its record, granularity ("microbatch" or "sample"), the run's seed and
    its tau schedule (None without a temperature)."""
    method: Method
    per: str
    seed: int
    schedule: TauSchedule | None
    replayed: np.ndarray | None = None  # update "replay": the paired run's weights, one row per step
    measure_scores: bool = False  # uniform updates too form SI and losses (pretrain.log_si_loss)

    @classmethod
    def of(cls, method: Method, per: str, seed: int, knobs: Knobs, replayed: np.ndarray | None = None,
           measure_scores: bool = False) -> "Recipe":
        return cls(method, per, seed, method.tau_schedule(knobs), replayed, measure_scores)

    def plan(self, step: int, noise_labels: np.ndarray | None = None) -> StepPlan:
        """How step `step` (1-based) forms its update; `noise_labels` (one per row of the global batch, 0
        clean) are read by methods that need them."""
        tau = None if self.schedule is None else self.schedule.tau_at(step)
        if self.method.update == "uniform":  # tau = 0 weighs every microbatch alike: the same update
            return StepPlan("scores", self.per, 0.0) if self.measure_scores else StepPlan("uniform", self.per, tau)
        if self.method.update == "clean-rows":
            clean = noise_labels == 0
            if not clean.any():
                raise ValueError(f"step {step}: every row of the batch is noisy; {self.method.name} has nothing "
                                 "to keep. Fix: lower the noise rate or raise pretrain.batch_size")
            return StepPlan("fixed", self.per, tau, sample_weights=torch.from_numpy(clean / clean.sum()))
        if self.method.update == "replay":  # a permutation that is a pure function of (seed, step)
            order = np.random.default_rng(np.random.SeedSequence([self.seed, 11, step])).permutation(
                self.replayed.shape[1])
            weights = torch.from_numpy(self.replayed[step - 1][order].copy())
            return StepPlan("fixed", self.per, tau, **{"sample_weights" if self.per == "sample" else
                                                      "microbatch_weights": weights})
        shuffle_seed = None
        if self.method.control == "shuffled":  # a pure function of (seed, step): a resume draws the same
            shuffle_seed = int(np.random.SeedSequence([self.seed, 7, step]).generate_state(1)[0])
        return StepPlan("scores", self.per, tau, shuffle_seed=shuffle_seed, scores=self.method.scores,
                        weighting=self.method.weighting)


def get_method(name: str) -> Method:
    if name not in BY_NAME:
        raise ValueError(f"unknown method {name!r}. Fix: use one of {', '.join(NAMES)}")
    return BY_NAME[name]


def controls_of(name: str) -> tuple[Method, ...]:
    """The information controls of method `name` (shuffled, weight-matched), in table order."""
    return tuple(m for m in METHODS if m.controls == name)


CONTROL = BY_NAME["presence-shuffled"]  # PRESENCE's information control (it has a weight-matched one too)


def label(name: str) -> str:
    """The method's label in tables; a name that is not a method is returned as it is."""
    return BY_NAME[name].label if name in BY_NAME else name


def paper_rows(table: str) -> tuple[str, ...]:
    """The methods with a row in the paper's `table` ("table2", ...), in the paper's row order."""
    return tuple(m.name for m in METHODS if table in m.paper_tables)


def single_stage_taus() -> dict[str, float]:
    """The methods with one temperature throughout that is not the run's own --tau, with that temperature at
    the paper's tau1 = +1, tau2 = -1: the baseline (0, uniform weights), PRESENCE-D (+1), PRESENCE-I (-1)."""
    knobs = Knobs(tau_direct=1.0, tau_inverse=-1.0, switch_step=0, steps=1)
    taus = {BASELINE.name: 0.0}
    for method in METHODS:
        schedule = method.tau_schedule(knobs) if "tau" not in method.reads and method.control is None else None
        if isinstance(schedule, Constant):
            taus[method.name] = schedule.tau
    return taus


def reads(name: str, knob: str) -> bool:
    """Whether method `name` reads `knob` (a name that is not a method reads nothing)."""
    return name in BY_NAME and knob in BY_NAME[name].reads

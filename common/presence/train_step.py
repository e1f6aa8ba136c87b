"""One pre-training step, as 03_pretrain/pretrain.py runs it and 03_pretrain/bench_train.py times it:
the update direction (common/presence/presence_step.py, as the step's plan says), a guard
against a non-finite loss, update direction or starting point before anything is applied, optional
gradient clipping, then the optimizer and learning-rate steps.

A finite direction can still give a non-finite update (a huge learning rate): the parameters it leaves are
then caught by the next step's guard, before anything else is applied, and by common/checkpoint.py, which
refuses to save them."""
from __future__ import annotations

import math

import torch
from torch import nn

from common.presence.influence import Layers
from common.presence.presence_step import StepPlan, StepStats, update_direction


def train_step(model: nn.Module, microbatches: list[dict], plan: StepPlan, optimizer, scheduler, *,
               layers: Layers = "first", autocast_dtype: torch.dtype | None = None,
               grad_clip: float = 0.0, chunks: int = 1) -> tuple[StepStats, float]:
    """Returns the step's statistics and the learning rate it used; `plan` says how the update direction is
    formed. Raises FloatingPointError, with the parameters and optimizer state untouched, when the loss,
    the update direction or the parameters the step starts from are not finite."""
    stats = update_direction(model, microbatches, plan, layers, autocast_dtype, chunks)
    if not (math.isfinite(stats.loss) and stats.finite):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss is {stats.loss}" if stats.finite else
                                 f"the update direction or the parameters are not finite (loss {stats.loss})")
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, lr

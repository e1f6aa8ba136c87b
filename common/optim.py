"""Optimizer and learning-rate schedule. The paper trains with T5X defaults: Adafactor (decay rate
0.8, update clipping 1.0, parameter-scaled steps, factored second moments) and the inverse-square-root
schedule 1/sqrt(max(step, 10k)), i.e. a constant 0.01 for 10k steps, then decaying. Adafactor is
common.adafactor: Hugging Face's update rule with the per-parameter loop batched."""
from __future__ import annotations

import math

import torch

from common.adafactor import Adafactor
from common.config import PretrainConfig


def inverse_sqrt_lr(step: int, peak_lr: float, warmup_steps: int) -> float:
    """Learning rate after `step` completed optimizer steps: peak_lr * sqrt(warmup / max(step, warmup))."""
    return peak_lr * math.sqrt(warmup_steps / max(step, warmup_steps))


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig):
    """Returns (optimizer, scheduler); the scheduler steps once per optimizer step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adafactor":
        # HF's decay_rate=-0.8 is T5X's decay_rate=0.8: beta2_t = 1 - t^-0.8.
        optimizer = Adafactor(params, lr=cfg.peak_lr, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                              weight_decay=cfg.weight_decay, scale_parameter=True)
    else:
        fused = all(p.is_cuda for p in params)
        optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: inverse_sqrt_lr(step, 1.0, cfg.warmup_steps))
    return optimizer, scheduler


def apply_schedule(optimizer, scheduler, peak_lr: float) -> None:
    """After load_checkpoint, make the schedule the current config's from the next step on. A checkpoint
    stores the peak learning rate it was trained with (the scheduler's base_lrs, the groups' lr); the warm-up
    comes from the lambda build_optimizer made from the config. Unchanged, the learning rate is the loaded
    one bit for bit (the same product LambdaLR forms); a changed peak_lr or warmup_steps takes effect."""
    scheduler.base_lrs = [peak_lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = peak_lr
        group["lr"] = peak_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports

"""Adafactor with few kernel launches: the update of Hugging Face's `transformers.optimization.Adafactor`
(fairseq's port of T5X / Mesh TensorFlow Adafactor), re-implemented for the settings T5X trains with.

The rule, per parameter p with gradient g at its step t (t counts the steps p had a gradient):
  beta2_t = 1 - t^decay_rate                       (decay_rate -0.8 is T5X's 0.8)
  v_t = beta2_t v_{t-1} + (1 - beta2_t) (g^2 + eps[0])
        factored for >= 2 dims: v is kept as its means over the last dim (row) and the second-to-last
        dim (col), and read back as row / mean(row) * col
  u = g / sqrt(v_t), divided by max(1, RMS(u) / clip_threshold)
  lr_p = lr * max(eps[1], RMS(p))                  (RMS of p before this step; lr * 1 without scale_parameter)
  p <- p - lr_p * weight_decay * p - lr_p * u
with float32 arithmetic for bf16/fp16 parameters, which are rounded once at the end. lr is read from the
param group each step, so LR schedulers work. Not supported: relative_step, warmup_init, beta1.

Why: HF loops over the parameters in Python, about twenty small ops each, so a T5 step launches thousands
of kernels (and waits for the GPU once per parameter, to compare RMS(p) with eps[1] on the host). Here the
parameters of each param group are grouped by (shape, dtype, device, step count); each group's gradients
and second moments are stacked into (k, *shape) tensors (in chunks of at most STACK_ELEMENTS elements) and
updated in a few dozen ops, and the parameters are written with one foreach op. Per-parameter state keeps
HF's keys (step, exp_avg_sq_row, exp_avg_sq_col or exp_avg_sq, RMS) as views into the stacked tensors, so
state_dict, load_state_dict and checkpoints work as before, and HF's optimizer states load into this one.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
# The most elements stacked into one tensor, per device type. On a GPU big stacks save launches and cost
# only memory (two stacks, 512 MB in float32; HF's peak is two copies of the largest parameter). On a CPU,
# stacks beyond a few MB fall out of cache and are page-faulted afresh every step (glibc returns big blocks
# to the OS): the small preset's model (77M parameters) steps 1.7x faster with 4 MB stacks than whole.
STACK_ELEMENTS = {"cpu": 2**20, "cuda": 2**26}


class Adafactor(torch.optim.Optimizer):
    """transformers' Adafactor(relative_step=False, warmup_init=False, beta1=None), batched (see above)."""

    def __init__(self, params, lr: float, eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, weight_decay: float = 0.0, scale_parameter: bool = True,
                 relative_step: bool = False, warmup_init: bool = False, beta1: float | None = None):
        if relative_step or warmup_init:
            raise ValueError("Adafactor: relative_step and warmup_init (the time-dependent internal learning rate) "
                             "are not supported. Fix: pass lr and shape it with an LR scheduler, or use "
                             "transformers.optimization.Adafactor")
        if beta1 is not None:
            raise ValueError(f"Adafactor: beta1={beta1} (a first moment) is not supported. Fix: leave beta1=None "
                             "as T5X does, or use transformers.optimization.Adafactor")
        defaults = {"lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "weight_decay": weight_decay, "scale_parameter": scale_parameter}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # A parameter that missed a step (no gradient) has its own step count, hence beta2_t.
            buckets = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                buckets[p.shape, p.dtype, p.device, state["step"]].append(p)
            for (shape, dtype, device, step), params in buckets.items():
                k = max(1, STACK_ELEMENTS.get(device.type, STACK_ELEMENTS["cuda"]) // shape.numel())
                for start in range(0, len(params), k):
                    self._update(group, params[start:start + k], step,
                                 torch.float32 if dtype in LOW_PRECISION else dtype)
        return loss

    def _update(self, group, params: list[torch.Tensor], step: int, dtype: torch.dtype) -> None:
        """One step for k parameters of one shape, dtype, device and step count."""
        shape, states = params[0].shape, [self.state[p] for p in params]
        per_slice = lambda v: v.view(-1, *(1,) * len(shape))  # noqa: E731  (k,) -> broadcastable to (k, *shape)
        grad = torch.stack([p.grad for p in params]).to(dtype)
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        update = grad.square().add_(group["eps"][0])  # g^2 + eps; the buffer then takes the update
        if len(shape) >= 2:
            row = _ema(states, "exp_avg_sq_row", update.mean(-1), beta2t, step)
            col = _ema(states, "exp_avg_sq_col", update.mean(-2), beta2t, step)
            torch.mul((row / row.mean(-1, keepdim=True)).rsqrt_().unsqueeze(-1), col.unsqueeze(-2).rsqrt(), out=update)
        else:
            torch.rsqrt(_ema(states, "exp_avg_sq", update, beta2t, step), out=update)
        update.mul_(grad)
        root_n = shape.numel() ** 0.5
        clip = (update.reshape(len(params), -1).norm(dim=1) / root_n / group["clip_threshold"]).clamp_(min=1.0)

        rms = torch.stack(torch._foreach_norm(params, 2, dtype)) / root_n
        for state, value in zip(states, rms.unbind(0)):
            state["RMS"] = value
        scale = rms.clamp(min=group["eps"][1]) if group["scale_parameter"] else torch.ones_like(rms)
        lr = scale * group["lr"]
        update.mul_(per_slice(lr / clip))  # HF divides by clip, then multiplies by lr: one pass fewer here
        if group["weight_decay"] != 0:
            update.add_(torch.stack(params).to(dtype) * per_slice(lr), alpha=group["weight_decay"])
        # In-place ops compute in the promoted dtype: a bf16 parameter gets float32 p - update, rounded once.
        torch._foreach_sub_(params, update.unbind(0))


def _ema(states: list[dict], key: str, value: torch.Tensor, beta2t: float, step: int) -> torch.Tensor:
    """Moving average of stacked second moments (zeros before step 1); the states become views of it."""
    avg = torch.zeros_like(value) if step == 1 else torch.stack([s[key] for s in states]).to(value.dtype)
    avg.mul_(beta2t).add_(value, alpha=1.0 - beta2t)
    for state, view in zip(states, avg.unbind(0)):
        state[key] = view
    return avg

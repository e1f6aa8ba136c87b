"""The gradient of one optimizer step: the baseline (gradient accumulation) and PRESENCE.

PRESENCE, per microbatch (the paper's method): g_i = gradient of microbatch i's loss, s_i = ||g_i on the
layer set K||^2, w = softmax(tau * standardised s) over the n microbatches of the (global) batch, and the
update direction is G = sum_i w_i g_i. With tau = 0, w_i = 1/n and G is the baseline's accumulated mean.
Since the weights are known only after all n backward passes, every g_i is kept: each microbatch's backward
writes into its own row of an (n, P) buffer whose columns put K first, so s = squared norms of one column
slice and G = w @ buffer is a single matrix-vector product written straight into the parameters' .grad
(views into one flat tensor).

PRESENCE, per sample (an extension; the paper writes the method per sample but ran it per microbatch):
the same with the B samples of the batch, G = sum_j w_j grad loss_j, where loss_j is sample j's own mean
token loss and s_j its self-influence. No per-sample gradient is formed: each microbatch runs one forward
and one backward pass to the module outputs (common/presence/per_sample_grads.py), giving the per-sample scores; once
all scores are in, every parameter's weighted gradient is formed from the recorded activations and output
gradients, one matmul per layer. That needs the activations and output gradients of all microbatches until
the end of the step (about the memory of one forward over the whole batch).
Normalisation: the baseline weighs sample j by b_j = N_j / (n * N_i), with N_j its target tokens and N_i
those of its microbatch i (the mean over microbatch means), so the per-sample weights are
w_j proportional to b_j * exp(tau * z_j); tau = 0 then reproduces the baseline exactly, whatever the token
counts. With packed span corruption every sample has the same number of targets and b_j = 1/B.

Both steps leave the update direction in p.grad for every trainable parameter; the caller clips, steps and
zeroes. The baseline and per="microbatch" run the model as given (torch.compile'd or not); per="sample"
runs the eager model behind a compiled one, since its forward hooks do not run inside a compiled graph.

Data parallel: each rank passes its own microbatches (every rank the same number, of the same
sizes); the scores are all-gathered so the softmax runs over the global batch, each rank forms its share of
G and the shares are all-reduced (summed), so every rank holds the single-process G of the global batch.
The model is not wrapped in DistributedDataParallel: DDP would all-reduce every microbatch gradient
(PRESENCE needs them unreduced and weighted first) and its bucketing would be idle. Call
common.distributed.broadcast_parameters(model) once so that all ranks start from the same parameters.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from common.distributed import all_gather_cat, all_reduce_sum_, is_distributed, is_sharded, rank, world_size
from common.modeling import IGNORE_INDEX, all_finite
from common.presence.influence import (Layers, eager, forward_logits, layer_set, self_influence, targets,
                                       token_losses)
from common.presence.per_sample_grads import GradTape
from common.presence.reweighting import SHAPINGS, beyond_loss, loss_peer_weights, presence_weights, shuffle


@dataclass
class StepStats:
    """Plain floats / CPU tensors, global over ranks."""
    loss: float  # mean of the microbatch losses (the same quantity for every method)
    scores: torch.Tensor | None  # the n (or B) raw self-influence scores, in item order (also when shuffled)
    weights: torch.Tensor | None  # the weights applied, in item order
    item_losses: torch.Tensor | None = None  # the n (or B) items' own mean token losses, in item order
    variance_share: float | None = None  # share of the scores' variance the standardisation kept
    finite: bool = True  # the parameters the step started from and the update direction are all finite


@dataclass(frozen=True)
class StepPlan:
    """How one step forms its update direction; a run's method (common/presence/methods.py) makes one per
    step. update: "uniform" (the baseline), "scores" (weights at temperature `tau` from the items' scores, of
    microbatches or samples as `per` says) or "fixed" (given weights: `sample_weights`, one per row of the
    global batch, or `microbatch_weights`, one per microbatch).

    For "scores": `scores` is where they come from ("self-influence", "loss": the item's mean token loss, or
    "si-beyond-loss", common.presence.reweighting.beyond_loss), `weighting` how they become weights
    ("softmax-z": PRESENCE's softmax(tau * z); or one of Sow et al.'s shapings, reweighting.loss_peer_weights), and
    `shuffle_seed` permutes them first (the information control)."""
    update: str = "uniform"
    per: str = "microbatch"
    tau: float | None = None
    shuffle_seed: int | None = None
    sample_weights: torch.Tensor | None = None
    scores: str = "self-influence"
    weighting: str = "softmax-z"
    microbatch_weights: torch.Tensor | None = None


def update_direction(model: nn.Module, microbatches: list[dict], plan: StepPlan, layers: Layers = "first",
                     autocast_dtype: torch.dtype | None = None, chunks: int = 1) -> StepStats:
    """p.grad = the update direction `plan` asks for (see the module docstring); the step's statistics.
    Each microbatch runs as `chunks` forward and backward passes over contiguous parts of its rows
    (`microbatch_backward`): the same update to float rounding, with a chunk's activations in memory. A
    model sharded by FSDP2 takes the sharded steps (common/presence/sharded_step.py)."""
    if is_sharded(model):
        return _sharded(model, microbatches, plan, layers, autocast_dtype, chunks)
    if plan.update == "uniform":
        return baseline_step(model, microbatches, autocast_dtype, chunks=chunks)
    if plan.update == "fixed" and plan.microbatch_weights is not None:
        return baseline_step(model, microbatches, autocast_dtype, plan.microbatch_weights, chunks)
    if plan.update == "fixed":
        return fixed_weights_step(model, microbatches, plan.sample_weights, autocast_dtype, chunks)
    if plan.update == "scores":
        return presence_step(model, microbatches, plan.tau, layers, plan.per, autocast_dtype,
                             shuffle_seed=plan.shuffle_seed, scores=plan.scores, weighting=plan.weighting,
                             chunks=chunks)
    raise ValueError(f"unknown update {plan.update!r}; use uniform, scores or fixed")


def baseline_step(model: nn.Module, microbatches: list[dict], autocast_dtype: torch.dtype | None = None,
                  microbatch_weights: torch.Tensor | None = None, chunks: int = 1) -> StepStats:
    """Gradient accumulation: p.grad = mean over the (global) microbatches of their loss gradients, or,
    with `microbatch_weights` (one per microbatch of the global batch, summing to 1), their weighted sum
    (the weight-matched control replays a PRESENCE run's weights so)."""
    if is_sharded(model):
        plan = StepPlan() if microbatch_weights is None else StepPlan("fixed", microbatch_weights=microbatch_weights)
        return _sharded(model, microbatches, plan, autocast_dtype=autocast_dtype, chunks=chunks)
    params = trainable(model)
    n_global = len(microbatches) * world_size()
    local = None if microbatch_weights is None else \
        microbatch_weights[rank() * len(microbatches):(rank() + 1) * len(microbatches)]
    for p in params:
        p.grad = None
    losses = []
    for i, microbatch in enumerate(microbatches):
        scaled = (lambda loss: loss / n_global) if local is None else (lambda loss, w=local[i]: loss * w.to(loss.dtype))
        losses.append(microbatch_backward(model, microbatch, autocast_dtype, chunks, scaled))
    if is_distributed():
        _all_reduce_grads(params)
    loss, finite = _mean_loss(losses, n_global, params)
    weights = None if microbatch_weights is None else microbatch_weights.detach().cpu()
    return StepStats(loss=loss, scores=None, weights=weights, finite=finite)


def presence_step(model: nn.Module, microbatches: list[dict], tau: float, layers: Layers = "first",
                  per: str = "microbatch", autocast_dtype: torch.dtype | None = None,
                  eps: float = 1e-6, shuffle_seed: int | None = None, scores: str = "self-influence",
                  weighting: str = "softmax-z", chunks: int = 1) -> StepStats:
    """PRESENCE: p.grad = sum_i w_i g_i over the (global) microbatches (per="microbatch") or samples
    (per="sample"), w = presence_weights(self-influence on `layers`, tau, eps). With `shuffle_seed` the
    scores are permuted at random (seeded) before the weights are formed: the information control.
    `scores` and `weighting` choose another score source and rule (StepPlan); self-influence and the
    items' losses are formed either way, so every step can log how they relate."""
    if per not in ("microbatch", "sample"):
        raise ValueError(f"per must be 'microbatch' or 'sample', got {per!r}")
    if scores not in SOURCES or (weighting != "softmax-z" and weighting not in SHAPINGS):
        raise ValueError(f"unknown scores {scores!r} or weighting {weighting!r}")
    if is_sharded(model):
        if eps != 1e-6:
            raise ValueError("the sharded step standardises with eps = 1e-6 only")
        plan = StepPlan("scores", per, tau, shuffle_seed, scores=scores, weighting=weighting)
        return _sharded(model, microbatches, plan, layers, autocast_dtype, chunks)
    run = _presence_per_microbatch if per == "microbatch" else _presence_per_sample
    weighting = Weighting(tau, eps, shuffle_seed, scores, weighting)
    return run(model, microbatches, layers, autocast_dtype, weighting, chunks)


def fixed_weights_step(model: nn.Module, microbatches: list[dict], sample_weights: torch.Tensor,
                       autocast_dtype: torch.dtype | None = None, chunks: int = 1) -> StepStats:
    """p.grad = sum_j w_j grad loss_j over the samples of the (global) batch, for given weights (summing
    to 1; loss_j is sample j's mean token loss): one backward pass of the weighted loss per microbatch,
    since the gradient is linear in the loss. The noise oracle gives noisy rows weight 0."""
    if is_sharded(model):
        return _sharded(model, microbatches, StepPlan("fixed", sample_weights=sample_weights),
                        autocast_dtype=autocast_dtype, chunks=chunks)
    params = trainable(model)
    for p in params:
        p.grad = None
    n_global = len(microbatches) * world_size()
    local = sample_weights[rank() * (sample_weights.numel() // world_size()):]
    losses = []
    for microbatch in microbatches:
        microbatch_tokens = (targets(model, microbatch) != IGNORE_INDEX).sum().clamp(min=1)
        loss_sum = 0.0
        for chunk in split_rows(microbatch, chunks):
            labels = targets(model, chunk)  # a causal LM's are shifted
            with autocast_context(model, autocast_dtype):
                logits = forward_logits(model, chunk)
            per_token = token_losses(logits, labels).sum(1)
            counts = (labels != IGNORE_INDEX).sum(1).to(per_token.dtype)
            size = labels.shape[0]
            weights = local[:size].to(device=per_token.device, dtype=per_token.dtype)
            local = local[size:]
            (weights * per_token / counts.clamp(min=1)).sum().backward()
            loss_sum = loss_sum + per_token.detach().sum()
        losses.append(loss_sum / microbatch_tokens)
    if is_distributed():
        _all_reduce_grads(params)
    loss, finite = _mean_loss(losses, n_global, params)
    return StepStats(loss=loss, scores=None, weights=sample_weights.detach().cpu(), finite=finite)


def _sharded(model, microbatches, plan, layers="first", autocast_dtype=None, chunks=1) -> StepStats:
    """The step of a model sharded by FSDP2: common/presence/sharded_step.py (imported here, since it builds
    on this module)."""
    from common.presence.sharded_step import sharded_update_direction

    return sharded_update_direction(model, microbatches, plan, layers, autocast_dtype, chunks)


def release_buffers(model: nn.Module) -> None:
    """Free the gradient buffers the steps keep between calls for `model` (n x P floats per microbatch
    configuration), e.g. before evaluation or when switching to another method for good."""
    _BUFFERS.pop(eager(model), None)


def _presence_per_microbatch(model, microbatches, layers, autocast_dtype, weighting, chunks) -> StepStats:
    n = len(microbatches)
    flat = _flat_grads(model, layers, n)
    flat.rows.zero_()
    losses = []
    for row_views, microbatch in zip(flat.row_views, microbatches):
        flat.point_grads(row_views)  # this microbatch's backward passes accumulate into row i
        losses.append(microbatch_backward(model, microbatch, autocast_dtype, chunks))
    scores = all_gather_cat(self_influence(flat, flat.params[:flat.k_count]))
    item_losses = all_gather_cat(torch.stack(losses).to(torch.float64))
    weights, share = weighting(scores, item_losses)
    torch.mv(flat.rows.t(), weights[rank() * n:(rank() + 1) * n].to(flat.rows.dtype), out=flat.grad)
    all_reduce_sum_(flat.grad)
    flat.point_grads(flat.grad_views)
    return _stats(losses, n * world_size(), flat.params, scores, weights, share, item_losses)


def _presence_per_sample(model, microbatches, layers, autocast_dtype, weighting, chunks) -> StepStats:
    model = eager(model)  # hooks do not run inside a compiled graph
    flat = _flat_grads(model, layers, 0)
    k_params = flat.params[:flat.k_count]
    n_global = len(microbatches) * world_size()
    tapes, scores, base_weights, losses, sample_losses = [], [], [], [], []
    for microbatch in microbatches:
        microbatch_tokens = (targets(model, microbatch) != IGNORE_INDEX).sum().clamp(min=1)
        loss_sum = 0.0
        for chunk in split_rows(microbatch, chunks):  # the tapes keep every chunk's factors until the end
            labels = targets(model, chunk)  # a causal LM's are shifted
            with GradTape(model, flat.params, labels.shape[0]) as tape, autocast_context(model, autocast_dtype):
                logits = forward_logits(model, chunk)
            per_token = token_losses(logits, labels).sum(1)
            del logits  # B x T x vocabulary floats that the backward does not need
            counts = (labels != IGNORE_INDEX).sum(1).to(per_token.dtype)
            own_losses = per_token / counts.clamp(min=1)
            tape.backward(own_losses.sum())
            sample_losses.append(own_losses.detach().to(torch.float64))
            tapes.append(tape)
            scores.append(self_influence(tape, k_params))
            base_weights.append(counts / (microbatch_tokens.to(counts.dtype) * n_global))
            loss_sum = loss_sum + per_token.detach().sum()
        losses.append(loss_sum / microbatch_tokens)
    scores = all_gather_cat(torch.cat(scores))
    item_losses = all_gather_cat(torch.cat(sample_losses))
    weights, share = weighting(scores, item_losses, base_weights=all_gather_cat(torch.cat(base_weights)))
    local = weights[rank() * (weights.numel() // world_size()):]
    flat.grad.zero_()
    grads = dict(zip(flat.params, flat.grad_views))
    for tape in tapes:
        tape.add_weighted_grads(local[:tape.batch_size], grads)
        local = local[tape.batch_size:]
    all_reduce_sum_(flat.grad)
    flat.point_grads(flat.grad_views)
    return _stats(losses, n_global, flat.params, scores, weights, share, item_losses)


# ---- helpers --------------------------------------------------------------------------------------------

def split_rows(microbatch: dict, chunks: int) -> list[dict]:
    """`chunks` contiguous, equal parts of the microbatch's rows (chunks must divide its size)."""
    size = microbatch["input_ids"].shape[0]
    if chunks < 1 or size % chunks:
        raise ValueError(f"{chunks} accumulation chunks cannot split a microbatch of {size} rows. Fix: use a "
                         "chunk count that divides the microbatch size (pretrain.microbatch_chunks)")
    if chunks == 1:
        return [microbatch]
    rows = size // chunks
    return [{k: v[c * rows:(c + 1) * rows] for k, v in microbatch.items()} for c in range(chunks)]


def microbatch_backward(model: nn.Module, microbatch: dict, autocast_dtype: torch.dtype | None, chunks: int = 1,
                        scaled=lambda loss: loss) -> torch.Tensor:
    """Backpropagate scaled(the microbatch's loss), its mean token loss over all of its target tokens,
    into the parameters' .grad, in `chunks` passes over contiguous parts of its rows, and return the
    loss (detached). The microbatch's loss is sum_c (N_c / N) loss_c over the chunks' target tokens N_c,
    so the gradient accumulated over the chunks is the whole microbatch's, and its self-influence (the
    squared norm of that sum, not a sum of the chunks' norms) is too. One chunk is today's single pass."""
    if chunks == 1:
        with autocast_context(model, autocast_dtype):
            loss = model(**microbatch).loss
        scaled(loss).backward()
        return loss.detach()
    total_tokens = (targets(model, microbatch) != IGNORE_INDEX).sum().clamp(min=1)
    loss_sum = 0.0
    for chunk in split_rows(microbatch, chunks):
        tokens = (targets(model, chunk) != IGNORE_INDEX).sum()
        if tokens == 0:  # nothing to learn from, and Hugging Face's mean would be 0 / 0
            continue
        with autocast_context(model, autocast_dtype):
            loss = model(**chunk).loss
            part = loss * (tokens.to(loss.dtype) / total_tokens.to(loss.dtype))
        scaled(part).backward()
        loss_sum = loss_sum + part.detach()
    return loss_sum if torch.is_tensor(loss_sum) else torch.zeros((), device=microbatch["labels"].device)

# Where a step's scores come from, given the items' self-influence and losses.
SOURCES = {"self-influence": lambda si, loss, eps: si, "loss": lambda si, loss, eps: loss,
            "si-beyond-loss": lambda si, loss, eps: beyond_loss(si, loss, eps)}


@dataclass(frozen=True)
class Weighting:
    """The step's scores to its weights at temperature tau: PRESENCE's rule (presence_weights) or one of
    Sow et al.'s (loss_peer_weights), on the scores of the chosen source, shuffled for a control."""
    tau: float
    eps: float
    shuffle_seed: int | None
    scores: str = "self-influence"
    weighting: str = "softmax-z"

    def __call__(self, si: torch.Tensor, losses: torch.Tensor, base_weights: torch.Tensor | None = None):
        used = SOURCES[self.scores](si, losses, self.eps)
        if self.weighting == "softmax-z":
            weights, share = presence_weights(used, self.tau, eps=self.eps, shuffle_seed=self.shuffle_seed,
                                              base_weights=base_weights)
            return weights.to(si.dtype), share
        used = used if self.shuffle_seed is None else shuffle(used, self.shuffle_seed)
        return loss_peer_weights(used, self.tau, self.weighting, base_weights=base_weights).to(si.dtype), None


# Columns summed at a time in float64: bounded extra memory, and a sum of millions of float32 squares
# exact to float64 rounding (a float32 norm of a 2.4M-element row is off by ~1e-4 relative).
_NORM_CHUNK = 1 << 20


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in eager(model).parameters() if p.requires_grad]


def autocast_context(model: nn.Module, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype)


def _mean_loss(losses: list[torch.Tensor], n_global: int, params: list[nn.Parameter]) -> tuple[float, bool]:
    """The mean microbatch loss over all ranks, and whether the parameters and their gradients (the update
    direction) are all finite: both read in the one host sync the loss needs anyway."""
    total = torch.stack(losses).sum()
    finite = all_finite(params + [p.grad for p in params if p.grad is not None]).to(total.dtype)
    total, finite = all_reduce_sum_(torch.stack([total, finite])).tolist()
    return total / n_global, finite == world_size()


def _stats(losses, n_global, params, scores, weights, variance_share, item_losses=None) -> StepStats:
    scores, weights = scores.detach().cpu(), weights.detach().cpu()
    item_losses = None if item_losses is None else item_losses.detach().cpu()
    loss, finite = _mean_loss(losses, n_global, params)
    if not torch.isfinite(scores).all():
        raise FloatingPointError(f"non-finite self-influence scores {scores.tolist()} (loss {loss}): the "
                                 "gradients overflowed")
    return StepStats(loss=loss, scores=scores, weights=weights, variance_share=variance_share, finite=finite,
                     item_losses=item_losses)


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum_(torch.cat([g.flatten() for g in grads]))
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        p.grad = chunk.view_as(p)


class _FlatGrads:
    """The trainable parameters laid out in one flat vector, the layer set K first: `rows` (n, P) holds
    one gradient per microbatch, `grad` (P,) the update; *_views are per-parameter views into them."""

    def __init__(self, params: list[nn.Parameter], k_params: list[nn.Parameter], n_rows: int):
        k_set = set(k_params)
        self.params = k_params + [p for p in params if p not in k_set]
        self.k_count = len(k_params)
        self.k_numel = sum(p.numel() for p in k_params)
        first = self.params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in self.params):
            raise ValueError("all trainable parameters must share one dtype and device")
        total = sum(p.numel() for p in self.params)
        self.rows = torch.zeros(n_rows, total, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros(total, dtype=first.dtype, device=first.device)
        self.row_views = [self._views(row) for row in self.rows]
        self.grad_views = self._views(self.grad)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [chunk.view_as(p) for p, chunk in zip(self.params, flat.split([p.numel() for p in self.params]))]

    def point_grads(self, views: list[torch.Tensor]) -> None:
        for p, view in zip(self.params, views):
            p.grad = view

    def squared_norms(self, params, group_size: int = 1) -> torch.Tensor:
        """Each row's squared norm on `params`, which must be the layer set K the columns start with,
        accumulated in float64 (common.presence.influence.ItemGradients)."""
        params = list(params)
        k_params = self.params[:self.k_count]
        if group_size != 1 or len(params) != len(k_params) or any(a is not b for a, b in zip(params, k_params)):
            raise ValueError("microbatch-gradient rows give the squared norms of whole rows on their layer set K")
        total = torch.zeros(self.rows.shape[0], dtype=torch.float64, device=self.rows.device)
        for chunk in self.rows[:, :self.k_numel].split(_NORM_CHUNK, dim=1):
            total += chunk.to(torch.float64).square().sum(1)
        return total


# Buffers per model, kept between steps: allocating (and, on the CPU, page-faulting) n x P floats every
# step would cost more than using them. A few configurations are kept (the benchmark alternates methods);
# a training run uses one.
_BUFFERS: "weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, _FlatGrads]]" = weakref.WeakKeyDictionary()
_BUFFERS_PER_MODEL = 4


def _flat_grads(model: nn.Module, layers: Layers, n_rows: int) -> _FlatGrads:
    params = trainable(model)
    k_params = layer_set(model, layers)
    key = (tuple(map(id, params)), tuple(map(id, k_params)), n_rows,
           tuple((p.dtype, p.device) for p in params[:1]))
    cache = _BUFFERS.setdefault(eager(model), OrderedDict())
    if key not in cache:
        while len(cache) >= _BUFFERS_PER_MODEL:
            cache.popitem(last=False)  # free the least recently used before allocating
        cache[key] = _FlatGrads(params, k_params, n_rows)
    cache.move_to_end(key)
    return cache[key]

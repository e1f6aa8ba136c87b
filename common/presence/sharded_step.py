"""The update direction on a model sharded by PyTorch FSDP2 (common.distributed.shard_model; the `fsdp`
strategy of 03_pretrain): every rank holds one dim-0 shard of each parameter, of its gradient and of the
optimizer state, and the steps are those of common/presence/presence_step.py, formed on the shards.

Every microbatch of the global batch is shared by all ranks: rank r runs the r-th contiguous part of its
rows (common.distributed.rank_rows), and the backward's reduce-scatter sums the ranks' parts into each
rank's shard of the microbatch's gradient g_i. Per microbatch, PRESENCE copies that shard into row i of an
(n, P_r) buffer (P_r: the elements of this rank's shards, the layer set K first), so that the n rows are
sharded like the parameters; the self-influence s_i = ||g_i on K||^2 is the all-reduced sum of the ranks'
squared norms over their shards of K (float64), every rank forms the same weights, and the update's shard
is the weighted sum of the rows' shards (G = w @ rows on each rank: the reduce-scatter of the update
happened microbatch by microbatch). The baseline and the weight-matched control let FSDP2 accumulate the
reduce-scattered gradients of loss_i / n (or w_i loss_i).

A microbatch's loss is the mean over all of its target tokens: each rank's part contributes the sum of its
token losses / N_i, N_i the microbatch's target tokens over all ranks (one all-reduce per step), so the
parts sum to the one-process loss and gradient whatever the split of tokens. FSDP2 averages in its
reduce-scatter (gloo has no pre-multiplied sum for a divide factor of 1), so each part's loss is multiplied
by the world size first. Every rank runs every forward and backward, also over rows without targets, since
each one is a collective.

Per sample, every sample lies on one rank, so its self-influence on K is formed there alone: a first pass
runs each part under the per-sample engine's tape (common/presence/per_sample_grads.py), which records only
K's modules and backpropagates to their outputs, leaving .grad untouched; the scores, losses and token
counts of all samples are gathered in the global order (microbatch, then row), and every rank forms the
same weights. A second pass backpropagates each part's weighted loss, sum_j w_j loss_j over its samples,
and FSDP2 reduce-scatters the update as it does the baseline's. That costs one forward and backward more
than the one-process step, which forms the update from the tape itself: the tape's per-layer gradients
are whole, and reduce-scattering them by hand would need a copy of every layer's gradient at once. Given
per-sample weights (the noise oracle, a per-sample weight-matched control) take the second pass alone.
Under FSDP2 the tape cannot refuse a tracked parameter's use outside its module (it tells the gathered
stand-ins FSDP2 uses in the forward from nothing else); the model is the same as the one process's, where
that check runs.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from common.distributed import all_gather_cat, all_reduce_sum_, local_part, rank_rows, reshard, world_size
from common.modeling import IGNORE_INDEX, all_finite
from common.presence.influence import (Layers, eager, forward_logits, layer_set, self_influence, targets,
                                       token_losses)
from common.presence.per_sample_grads import GradTape
from common.presence.presence_step import (SOURCES, StepPlan, StepStats, Weighting, autocast_context,
                                           split_rows, trainable)
from common.presence.reweighting import SHAPINGS

def sharded_update_direction(model: nn.Module, microbatches: list[dict], plan: StepPlan, layers: Layers = "first",
                             autocast_dtype: torch.dtype | None = None, chunks: int = 1) -> StepStats:
    """p.grad (a DTensor shard) = this rank's shard of the update direction `plan` asks for; `microbatches`
    are this rank's parts of all n microbatches of the global batch. The step's statistics are global."""
    if plan.update not in ("uniform", "fixed", "scores"):
        raise ValueError(f"unknown update {plan.update!r}; use uniform, scores or fixed")
    if plan.scores not in SOURCES or (plan.weighting != "softmax-z" and plan.weighting not in SHAPINGS):
        raise ValueError(f"unknown scores {plan.scores!r} or weighting {plan.weighting!r}")
    reshard(model)  # after an evaluation, model.parameters() would be the root's gathered stand-ins
    params = trainable(model)
    n = len(microbatches)
    tokens = all_reduce_sum_(torch.stack([(targets(model, mb) != IGNORE_INDEX).sum() for mb in microbatches]))
    if (plan.update == "scores" and plan.per == "sample") or (plan.update == "fixed" and
                                                               plan.microbatch_weights is None):
        return _per_sample_direction(model, microbatches, plan, layers, autocast_dtype, chunks, tokens)
    scale = torch.full((n,), 1.0 / n) if plan.update == "uniform" else plan.microbatch_weights
    rows = _shard_rows(model, layers, n) if plan.update == "scores" else None
    for p in params:
        p.grad = None
    losses = []
    for i, microbatch in enumerate(microbatches):
        weight = 1.0 if rows is not None else scale[i].item()
        losses.append(_part_backward(model, microbatch, tokens[i], chunks, autocast_dtype, weight))
        if rows is not None:
            rows.take(i, params)
    losses = all_reduce_sum_(torch.stack(losses).to(torch.float64))
    if rows is None:
        loss, finite = _loss_and_finite(losses, params)
        weights = None if plan.update == "uniform" else plan.microbatch_weights.detach().cpu()
        return StepStats(loss=loss, scores=None, weights=weights, finite=finite)
    scores = all_reduce_sum_(rows.squared_norms_on_k())
    weights, share = Weighting(plan.tau, 1e-6, plan.shuffle_seed, plan.scores, plan.weighting)(scores, losses)
    rows.point_update(weights, params)
    loss, finite = _loss_and_finite(losses, params)
    scores, weights = scores.detach().cpu(), weights.detach().cpu()
    if not torch.isfinite(scores).all():
        raise FloatingPointError(f"non-finite self-influence scores {scores.tolist()} (loss {loss}): the "
                                 "gradients overflowed")
    return StepStats(loss=loss, scores=scores, weights=weights, item_losses=losses.detach().cpu(),
                     variance_share=share, finite=finite)


def _per_sample_direction(model: nn.Module, microbatches: list[dict], plan: StepPlan, layers: Layers,
                          autocast_dtype: torch.dtype | None, chunks: int, tokens: torch.Tensor) -> StepStats:
    """Per-sample weights: scored in a first pass (plan.update == "scores") or given (plan.sample_weights,
    one per row of the global batch, microbatch by microbatch), then one weighted backward per part."""
    params = trainable(model)
    for p in params:
        p.grad = None
    n = len(microbatches)
    scores = item_losses = share = None
    if plan.update == "scores":
        si, sample_losses, counts = _sample_scores(model, microbatches, layer_set(model, layers), autocast_dtype,
                                                   chunks)
        scores, item_losses, counts = (_in_global_order(t) for t in (si, sample_losses, counts))
        row_tokens = tokens.to(torch.float64).clamp(min=1).repeat_interleave(counts.numel() // n)
        weighting = Weighting(plan.tau, 1e-6, plan.shuffle_seed, plan.scores, plan.weighting)
        weights, share = weighting(scores, item_losses, base_weights=counts / (row_tokens * n))
    else:
        weights = plan.sample_weights.to(torch.float64)
    mine = weights.view(n, -1)[:, rank_rows(weights.numel() // n)]  # this rank's rows of each microbatch
    losses = [_weighted_part_backward(model, mb, tokens[i], mine[i], chunks, autocast_dtype)
              for i, mb in enumerate(microbatches)]
    losses = all_reduce_sum_(torch.stack(losses).to(torch.float64))
    loss, finite = _loss_and_finite(losses, params)
    if scores is not None and not torch.isfinite(scores).all():
        raise FloatingPointError(f"non-finite self-influence scores {scores.tolist()} (loss {loss}): the "
                                 "gradients overflowed")
    return StepStats(loss=loss, scores=None if scores is None else scores.cpu(), weights=weights.detach().cpu(),
                     item_losses=None if item_losses is None else item_losses.cpu(), variance_share=share,
                     finite=finite)


def _sample_scores(model: nn.Module, microbatches: list[dict], k_params: list[nn.Parameter],
                   autocast_dtype: torch.dtype | None, chunks: int) -> tuple[torch.Tensor, ...]:
    """This rank's samples' self-influence on K, mean token losses and target-token counts, each (n, rows)
    float64: one taped forward and backward per chunk, down to K's module outputs only."""
    model = eager(model)  # hooks do not run inside a compiled graph
    si, sample_losses, counts = [], [], []
    for microbatch in microbatches:
        for chunk in split_rows(microbatch, chunks):
            labels = targets(model, chunk)  # a causal LM's are shifted
            with GradTape(model, k_params, labels.shape[0]) as tape, autocast_context(model, autocast_dtype):
                logits = forward_logits(model, chunk)
            per_token = token_losses(logits, labels).sum(1)
            del logits
            count = (labels != IGNORE_INDEX).sum(1).to(per_token.dtype)
            own = per_token / count.clamp(min=1)
            tape.backward(own.sum())
            si.append(self_influence(tape, k_params))
            sample_losses.append(own.detach().to(torch.float64))
            counts.append(count.to(torch.float64))
    return tuple(torch.cat(t).view(len(microbatches), -1) for t in (si, sample_losses, counts))


def _in_global_order(mine: torch.Tensor) -> torch.Tensor:
    """(n, rows) of this rank -> the global batch's n * rows * world values, microbatch by microbatch and
    within one in row order (rank r holds the r-th contiguous part of each microbatch's rows)."""
    gathered = all_gather_cat(mine)  # (world * n, rows), rank by rank
    return gathered.view(world_size(), *mine.shape).transpose(0, 1).reshape(-1)


def _weighted_part_backward(model: nn.Module, part: dict, tokens: torch.Tensor, weights: torch.Tensor,
                            chunks: int, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Backpropagate world * sum_j weights[j] loss_j over this rank's rows of the microbatch (loss_j: row
    j's mean token loss; FSDP2's reduce-scatter averages over the ranks), in `chunks` passes; returns the
    part's share of the microbatch's loss (detached)."""
    total = tokens.clamp(min=1).to(torch.float64)
    share = 0.0
    for chunk, chunk_weights in zip(split_rows(part, chunks), weights.chunk(chunks)):
        labels = targets(model, chunk)
        with autocast_context(model, autocast_dtype):
            logits = forward_logits(model, chunk)
        per_token = token_losses(logits, labels).sum(1)
        del logits
        own = per_token / (labels != IGNORE_INDEX).sum(1).clamp(min=1).to(per_token.dtype)
        ((chunk_weights.to(own.dtype) * own).sum() * world_size()).backward()
        share = share + per_token.detach().sum().to(torch.float64) / total
    return share


def _part_backward(model: nn.Module, part: dict, tokens: torch.Tensor, chunks: int,
                   autocast_dtype: torch.dtype | None, weight: float) -> torch.Tensor:
    """Backpropagate weight * world * (this rank's token losses of the microbatch) / `tokens` (the
    microbatch's target tokens on all ranks), in `chunks` passes; returns the part's share of the
    microbatch's loss (detached)."""
    total = tokens.clamp(min=1).to(torch.float64)
    share = 0.0
    for chunk in split_rows(part, chunks):
        labels = targets(model, chunk)  # a causal LM's are shifted
        with autocast_context(model, autocast_dtype):
            logits = forward_logits(model, chunk)
        loss_sum = token_losses(logits, labels).sum()
        del logits
        (loss_sum * (weight * world_size() / total.item())).backward()
        share = share + loss_sum.detach().to(torch.float64) / total
    return share


def _loss_and_finite(losses: torch.Tensor, params: list[nn.Parameter]) -> tuple[float, bool]:
    """The mean microbatch loss, and whether every rank's shards of the parameters and of the update
    direction are finite (one all-reduce of a flag)."""
    shards = [local_part(p) for p in params] + [local_part(p.grad) for p in params if p.grad is not None]
    finite = all_reduce_sum_(all_finite(shards).to(torch.float64).reshape(1)).item()
    return losses.mean().item(), finite == world_size()


class _ShardRows:
    """This rank's shards of the n microbatch gradients, (n, P_r), the layer set K's shards first, and the
    update's shard (P_r,); *_views are per-parameter views shaped like the local shards."""

    def __init__(self, params: list[nn.Parameter], k_params: list[nn.Parameter], n_rows: int):
        k_set = set(k_params)
        self.params = k_params + [p for p in params if p not in k_set]
        self.k_numel = sum(local_part(p).numel() for p in k_params)
        local = [local_part(p) for p in self.params]
        sizes = [t.numel() for t in local]
        self.rows = torch.zeros(n_rows, sum(sizes), dtype=local[0].dtype, device=local[0].device)
        self.grad = torch.zeros(sum(sizes), dtype=local[0].dtype, device=local[0].device)
        self.row_views = [[c.view_as(t) for c, t in zip(row.split(sizes), local)] for row in self.rows]
        self.grad_views = [c.view_as(t) for c, t in zip(self.grad.split(sizes), local)]

    def take(self, i: int, params: list[nn.Parameter]) -> None:
        """Row i = the gradients' shards the microbatch's backward left in .grad, which are cleared."""
        for p, view in zip(self.params, self.row_views[i]):
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(local_part(p.grad))
        for p in params:
            p.grad = None

    def squared_norms_on_k(self) -> torch.Tensor:
        """Each row's squared norm over this rank's shards of K, in float64 (to be all-reduced)."""
        total = torch.zeros(self.rows.shape[0], dtype=torch.float64, device=self.rows.device)
        for chunk in self.rows[:, :self.k_numel].split(1 << 20, dim=1):
            total += chunk.to(torch.float64).square().sum(1)
        return total

    def point_update(self, weights: torch.Tensor, params: list[nn.Parameter]) -> None:
        """p.grad = a DTensor over this rank's shard of sum_i w_i g_i (a view of `grad`)."""
        torch.mv(self.rows.t(), weights.to(self.rows.dtype), out=self.grad)
        for p, view in zip(self.params, self.grad_views):
            p.grad = DTensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride())


# One buffer per model and row count, kept between steps (as presence_step's): allocating n x P_r floats
# every step would cost more than filling them.
_ROWS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, _ShardRows]]" = weakref.WeakKeyDictionary()


def _shard_rows(model: nn.Module, layers: Layers, n_rows: int) -> _ShardRows:
    cache = _ROWS.setdefault(eager(model), {})
    key = (n_rows, layers if isinstance(layers, str) else tuple(layers))
    if key not in cache:
        cache.clear()  # a run uses one configuration: free the old one before allocating
        cache[key] = _ShardRows(trainable(model), layer_set(model, layers), n_rows)
    return cache[key]

"""Per-sample gradient norms and per-sample-weighted gradients of a T5 / mT5, without ever forming a
per-sample gradient.

During one forward pass a `GradTape` records, for every call of a module that owns a tracked
parameter, the two factors that parameter's gradient is made of: what went into the module (activations,
token ids, relative-position buckets) and the module's output. One `torch.autograd.grad` call with those
outputs as its inputs then yields the gradient arriving at each output, sample by sample (samples never
interact in T5, so row j of it comes from sample j's loss alone). From the two factors:

- `sq_norms`: the squared norm of each sample's (or each contiguous group of samples') gradient, exactly.
  Linear weight: the per-sample matrix d^T a, or the Gram form sum_{t,t'} <a_t, a_t'> <d_t, d_t'>
  ("ghost norm") when T^2 (d_in + d_out) < T d_in d_out. Embedding: a segment sum of the output gradients
  over equal token ids. RMS layer norm: sum_t d_t * x_hat_t. Relative attention bias: the gradient of the
  bias *expanded over the batch* (see `_expand_relative_bias`), scattered onto its buckets.
  A parameter used several times (the shared embedding: encoder and decoder inputs, and the output layer
  when tied) gets the norm of the sum of its uses, cross terms included.
- `add_weighted_grads`: the gradient of sum_j w_j loss_j, by the usual weight-gradient formulas with
  each sample's output gradient scaled by w_j (backpropagation is linear in the loss).

Only the module kinds of T5 are supported (nn.Linear, nn.Embedding, T5/mT5 RMS layer norm, T5/mT5
relative attention bias); a tracked parameter owned by anything else is refused with a clear error.
The relative attention bias relies on transformers' T5Attention.compute_bias (checked against brute force
in tests/test_influence.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call


@dataclass(eq=False)
class _Use:
    """One call of a module that owns a tracked parameter, batch-first."""
    kind: str  # "linear" | "embedding" | "rms_norm" | "relative_bias"
    module: nn.Module
    inputs: torch.Tensor  # activations (B, T, d_in) | token ids (B, T) | buckets (Tq, Tk)
    output: torch.Tensor  # (B, T, d_out) | (B, T, d) | (B, H, Tq, Tk): what the backward differentiates against
    grad: torch.Tensor | None = None  # d loss / d output, filled by GradTape.backward


def _is_rms_norm(module: nn.Module) -> bool:
    # T5LayerNorm and MT5LayerNorm: weight * x / rms(x), no bias, no mean subtraction.
    return type(module).__name__.endswith("LayerNorm") and hasattr(module, "variance_epsilon")


def _has_relative_bias(module: nn.Module) -> bool:
    return bool(getattr(module, "has_relative_attention_bias", False)) and hasattr(module, "compute_bias")


class GradTape:
    """Context manager: inside it, forward passes of `model` record the uses of `params`.

    >>> with GradTape(model, params, batch_size=B) as tape:
    ...     logits = model(...).logits
    >>> tape.backward(per_sample_losses.sum())
    >>> tape.sq_norms(params)            # (B,) exact per-sample squared gradient norms
    """

    def __init__(self, model: nn.Module, params: Iterable[nn.Parameter], batch_size: int):
        self.model = model
        self.params = list(dict.fromkeys(params))
        self.batch_size = batch_size
        self.uses: dict[nn.Parameter, list[_Use]] = {p: [] for p in self.params}
        self._handles: list = []
        self._patched: list[nn.Module] = []

    # ---- recording ---------------------------------------------------------------------------------
    def __enter__(self) -> "GradTape":
        tracked = set(self.params)
        names = {p: n for n, p in self.model.named_parameters(remove_duplicate=False)}
        bias_tables = set()
        for module in self.model.modules():
            if _has_relative_bias(module) and module.relative_attention_bias.weight in tracked:
                bias_tables.add(module.relative_attention_bias)
                self._expand_relative_bias(module)
        for name, module in self.model.named_modules(remove_duplicate=False):
            own = [p for p in module.parameters(recurse=False) if p in tracked]
            if not own or module in bias_tables:
                continue
            if isinstance(module, nn.Linear):
                kind = "linear"
            elif isinstance(module, nn.Embedding):
                if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
                    raise NotImplementedError(f"{name}: embeddings with max_norm, scale_grad_by_freq or sparse "
                                              "gradients are not supported by the per-sample engine")
                kind = "embedding"
            elif _is_rms_norm(module):
                kind = "rms_norm"
            else:
                raise NotImplementedError(
                    f"{name} ({type(module).__name__}) owns {[names.get(p, '?') for p in own]}, which the "
                    "per-sample engine cannot handle (it knows Linear, Embedding, T5 RMS norm, T5 relative "
                    "attention bias). Fix: leave these parameters out of the layer set")
            if any(p.requires_grad is False for p in own):
                raise ValueError(f"{name}: its parameters do not require grad; self-influence needs them to")
            self._handles.append(module.register_forward_hook(self._recorder(kind)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for attention in self._patched:
            del attention.compute_bias  # back to the class method
        self._handles, self._patched = [], []

    def _recorder(self, kind: str):
        def hook(module, args, output):
            use = _Use(kind, module, args[0], output)
            for p in module.parameters(recurse=False):
                if p in self.uses:
                    self.uses[p].append(use)  # a Linear's weight and bias share one record
        return hook

    def _expand_relative_bias(self, attention: nn.Module) -> None:
        """The stack computes the position bias once, shape (1, H, Tq, Tk), and adds it to the scores of
        every layer and every sample. Returning it expanded to (B, H, Tq, Tk) changes no value, but makes
        the gradient arriving at it per sample (summed over the layers that use it, as it should be)."""
        table = attention.relative_attention_bias
        class_compute_bias = type(attention).compute_bias
        buckets: list[torch.Tensor] = []
        bucket_hook = table.register_forward_pre_hook(lambda module, args: buckets.append(args[0]))

        def compute_bias(query_length, key_length, device=None, past_seen_tokens=0):
            values = class_compute_bias(attention, query_length, key_length, device=device,
                                        past_seen_tokens=past_seen_tokens)
            expanded = values.expand(self.batch_size, -1, -1, -1)
            self.uses[table.weight].append(_Use("relative_bias", table, buckets.pop(), expanded))
            return expanded

        attention.compute_bias = compute_bias
        self._handles.append(bucket_hook)
        self._patched.append(attention)

    # ---- backward ----------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """One backward pass down to the recorded outputs; parameter .grad fields are not touched, and
        weight-gradient matmuls are skipped (autograd computes only what the recorded outputs need)."""
        uses = list({id(u): u for p in self.params for u in self.uses[p]}.values())
        if not uses:
            raise RuntimeError("GradTape recorded no use of the tracked parameters; run the forward inside it")
        grads = torch.autograd.grad(loss, [u.output for u in uses], allow_unused=True)
        for use, grad in zip(uses, grads):
            use.grad = torch.zeros_like(use.output) if grad is None else grad

    # ---- per-sample squared norms ------------------------------------------------------------------
    def sq_norms(self, params: Iterable[nn.Parameter] | None = None, group_size: int = 1) -> torch.Tensor:
        """Squared gradient norm restricted to `params` (default: all tracked), per contiguous group of
        `group_size` samples: shape (batch_size // group_size,)."""
        if self.batch_size % group_size:
            raise ValueError(f"group size {group_size} does not divide the batch size {self.batch_size}")
        n_groups = self.batch_size // group_size
        total = None
        for p in (self.params if params is None else params):
            norms = _param_sq_norms(p, self.uses[p], n_groups)
            total = norms if total is None else total + norms
        if total is None:
            raise ValueError("no parameters to take the norm over")
        return total

    # ---- weighted gradients ------------------------------------------------------------------------
    def add_weighted_grads(self, weights: torch.Tensor, grads: dict[nn.Parameter, torch.Tensor]) -> None:
        """grads[p] += d/dp sum_j weights[j] * loss_j for every tracked parameter p (weights: (batch_size,))."""
        for p in self.params:
            for use in self.uses[p]:
                _add_weighted_grad(p, use, weights, grads[p])


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _grouped(t: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(B, T, d) -> (G, (B/G) T, d): the tokens of each contiguous group of samples side by side."""
    return t.reshape(n_groups, -1, t.shape[-1])


def _linear_factors(use: _Use, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    grad = use.grad
    acts = use.inputs.to(grad.dtype)  # what the matmul saw (autocast casts the input to its dtype)
    dtype = _acc_dtype(grad)
    return _grouped(acts, n_groups).to(dtype), _grouped(grad, n_groups).to(dtype)


def _rms_norm_factor(use: _Use) -> torch.Tensor:
    """x_hat of the layer norm, recomputed by the module itself with a unit weight, so that it is
    bit-identical to what the forward multiplied the weight with."""
    module = use.module
    with torch.no_grad():
        return functional_call(module, {"weight": torch.ones_like(module.weight)}, (use.inputs,))


def _relative_bias_tables(use: _Use, n_groups: int) -> torch.Tensor:
    """Per-group gradient of the bias table: (G, buckets, heads)."""
    grad = use.grad.to(_acc_dtype(use.grad))
    grad = grad.reshape(n_groups, -1, *grad.shape[1:]).sum(1)  # (G, H, Tq, Tk)
    n_buckets = use.module.weight.shape[0]
    flat = grad.flatten(2).transpose(1, 2)  # (G, Tq*Tk, H)
    tables = flat.new_zeros(n_groups, n_buckets, flat.shape[-1])
    return tables.index_add_(1, use.inputs.flatten().to(flat.device), flat)


def _param_sq_norms(p: nn.Parameter, uses: list[_Use], n_groups: int) -> torch.Tensor:
    if not uses:
        return torch.zeros(n_groups, device=p.device, dtype=_acc_dtype(p))
    kinds = {u.kind for u in uses}
    if kinds == {"rms_norm"}:
        summed = sum(_grouped(u.grad.to(_acc_dtype(u.grad)) * _rms_norm_factor(u), n_groups).sum(1) for u in uses)
        return summed.square().sum(1)
    if kinds == {"relative_bias"}:
        return sum(_relative_bias_tables(u, n_groups) for u in uses).square().sum((1, 2))
    if kinds == {"linear"} and p is uses[0].module.bias:
        return torch.cat([_linear_factors(u, n_groups)[1] for u in uses], 1).sum(1).square().sum(1)
    if not kinds <= {"linear", "embedding"}:
        raise NotImplementedError(f"a parameter used as {sorted(kinds)} at once is not supported")
    # Uses of the same kind concatenate along the token axis; an embedding tied to the output layer
    # adds the cross term 2 <embedding part, output-layer part>.
    linear = [_linear_factors(u, n_groups) for u in uses if u.kind == "linear"]
    embedding = [u for u in uses if u.kind == "embedding"]
    total = torch.zeros(n_groups, device=p.device, dtype=_acc_dtype(p))
    if linear:
        acts = torch.cat([a for a, _ in linear], 1)
        linear_grads = torch.cat([g for _, g in linear], 1)
        total = total + _linear_sq_norms(acts, linear_grads)
    if embedding:
        ids = torch.cat([u.inputs.reshape(n_groups, -1) for u in embedding], 1)
        embedding_grads = torch.cat([_grouped(_masked_embedding_grad(u), n_groups).to(_acc_dtype(u.grad))
                                     for u in embedding], 1)
        total = total + _embedding_sq_norms(ids, embedding_grads, p.shape[0])
    if linear and embedding:
        total = total + 2 * _embedding_linear_cross(ids, embedding_grads, acts, linear_grads)
    return total


def _linear_sq_norms(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """||sum_t grads_t acts_t^T||^2 per group; acts (G, T, d_in), grads (G, T, d_out)."""
    tokens, d_in, d_out = acts.shape[1], acts.shape[2], grads.shape[2]
    if tokens * (d_in + d_out) < d_in * d_out:
        gram_acts = torch.bmm(acts, acts.transpose(1, 2))
        gram_grads = torch.bmm(grads, grads.transpose(1, 2))
        return (gram_acts * gram_grads).sum((1, 2))
    return torch.bmm(grads.transpose(1, 2), acts).square().sum((1, 2))


def _masked_embedding_grad(use: _Use) -> torch.Tensor:
    padding_idx = use.module.padding_idx
    if padding_idx is None:
        return use.grad
    return use.grad.masked_fill((use.inputs == padding_idx).unsqueeze(-1), 0)  # nn.Embedding never updates it


def _embedding_sq_norms(ids: torch.Tensor, grads: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """sum_v ||sum_{t: id_t = v} grads_t||^2 per group, by segment sums over (group, id) keys."""
    n_groups = ids.shape[0]
    keys = ids + vocab_size * torch.arange(n_groups, device=ids.device).unsqueeze(1)
    unique_keys, inverse = torch.unique(keys.flatten(), return_inverse=True)
    rows = grads.new_zeros(unique_keys.numel(), grads.shape[-1]).index_add_(0, inverse, grads.flatten(0, 1))
    return grads.new_zeros(n_groups).index_add_(0, unique_keys // vocab_size, rows.square().sum(1))


def _embedding_linear_cross(ids, emb_grads, acts, lin_grads) -> torch.Tensor:
    """<E, L> per group for a weight used both as an embedding (E = sum_t e_{id_t} emb_grads_t^T) and as
    a Linear (L = sum_s lin_grads_s acts_s^T, rows = vocabulary): sum_{t,s} lin_grads[s, id_t] <emb_grads_t, acts_s>."""
    dots = torch.bmm(emb_grads, acts.transpose(1, 2))  # (G, T_emb, T_lin)
    picked = torch.gather(lin_grads, 2, ids.unsqueeze(1).expand(-1, lin_grads.shape[1], -1))  # (G, T_lin, T_emb)
    return (dots * picked.transpose(1, 2)).sum((1, 2))


def _add_weighted_grad(p: nn.Parameter, use: _Use, weights: torch.Tensor, out: torch.Tensor) -> None:
    grad = use.grad
    if use.kind == "relative_bias":
        summed = torch.einsum("b,bhqk->qkh", weights.to(grad.dtype), grad).reshape(-1, grad.shape[1])
        out.index_add_(0, use.inputs.flatten(), summed.to(out.dtype))
        return
    scaled = grad * weights.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
    if use.kind == "linear":
        scaled = scaled.flatten(0, -2)
        if p is use.module.bias:
            out.add_(scaled.sum(0).to(out.dtype))
        else:
            acts = use.inputs.to(grad.dtype).flatten(0, -2)
            if out.dtype == grad.dtype:
                out.addmm_(scaled.t(), acts)
            else:
                out.add_(torch.mm(scaled.t(), acts).to(out.dtype))
    elif use.kind == "embedding":
        if use.module.padding_idx is not None:
            scaled = scaled.masked_fill((use.inputs == use.module.padding_idx).unsqueeze(-1), 0)
        out.index_add_(0, use.inputs.flatten(), scaled.flatten(0, -2).to(out.dtype))
    else:  # rms_norm
        out.add_((scaled.to(_acc_dtype(scaled)) * _rms_norm_factor(use)).flatten(0, -2).sum(0).to(out.dtype))

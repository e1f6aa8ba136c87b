"""Per-sample gradient norms and per-sample-weighted gradients of a T5 / mT5 from one backward pass,
without forming per-sample gradients of the whole model.

During one forward pass a `GradTape` records, for every call of a module that owns a tracked
parameter, the two factors that parameter's gradient is made of: what went into the module (activations,
token ids, relative-position buckets) and the module's output. One `torch.autograd.grad` call with those
outputs as its inputs then yields the gradient arriving at each output, sample by sample (samples never
interact in T5, so row j of it comes from sample j's loss alone). The tape keeps each output's place in the
graph (its gradient edge), not the output itself, which autograd may not need to keep.

Inside the tape no parameter of the model requires grad, so that autograd keeps only what the gradients
of activations need (a Linear's input, an RMS norm's normalised input are needed only for weight
gradients, which the tape forms from its own records); a tracked module whose inputs do not require grad
(the first of the set, fed by frozen layers) returns its output as a leaf that does, and the graph starts
there. requires_grad is restored on leaving the tape, also on error. From the two factors:

- `squared_norms`: the squared norm of each sample's (or each contiguous group of samples') gradient, exactly, in
  float64. Long float32 sums (a norm over a per-sample weight matrix, a bias-table entry over every
  query/key pair of its bucket) are float32 partial sums over short runs, added in float64.
  Linear weight: the per-sample matrix d^T a, or the Gram form sum_{t,t'} <a_t, a_t'> <d_t, d_t'>
  ("ghost norm") when that is cheaper, T (d_in + d_out) < d_in d_out. Embedding: a segment sum of the output gradients
  over equal token ids. RMS layer norm: sum_t d_t * x_hat_t. Relative attention bias: the gradient of the
  bias *expanded over the batch* (see `_expand_relative_bias`), scattered onto its buckets.
  A parameter used several times (the shared embedding: encoder and decoder inputs, and the output layer
  when tied) gets the norm of the sum of its uses, cross terms included.
- `add_weighted_grads`: the gradient of sum_j w_j loss_j, by the usual weight-gradient formulas with
  each sample's output gradient scaled by w_j (backpropagation is linear in the loss), or as w @ the
  per-sample gradients where `squared_norms` formed them anyway.

Only the module kinds of T5 are supported (nn.Linear, nn.Embedding, T5/mT5 RMS layer norm, T5/mT5
relative attention bias); a tracked parameter owned by anything else is refused with a clear error.
The relative attention bias relies on transformers' T5Attention.compute_bias (checked against brute force
in tests/test_influence.py).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge


@dataclass(eq=False)
class _Use:
    """One call of a module that owns a tracked parameter, batch-first."""
    kind: str  # "linear" | "embedding" | "rms_norm" | "relative_bias"
    module: nn.Module
    inputs: torch.Tensor | None  # activations (B, T, d_in) | token ids (B, T) | buckets (Tq, Tk)
    output: GradientEdge | None  # where the output enters the graph: what the backward differentiates against
    output_like: torch.Tensor  # a meta tensor, the output's shape and dtype: (B, T, d_out) | (B, T, d) | (B, H, Tq, Tk)
    grad: torch.Tensor | None = None  # d loss / d output, filled by GradTape.backward
    cache: dict = field(default_factory=dict)  # quantities derived from the above, computed once


def _in_graph(output: torch.Tensor) -> torch.Tensor:
    """The output itself, or, when nothing it came from requires grad, the same values as a leaf that does."""
    return output if output.requires_grad else output.detach().requires_grad_()


def _record(kind: str, module: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> _Use:
    like = torch.empty(output.shape, dtype=output.dtype, device="meta")
    return _Use(kind, module, inputs, get_gradient_edge(output), like)


def _is_rms_norm(module: nn.Module) -> bool:
    # T5LayerNorm and MT5LayerNorm: weight * x / rms(x), no bias, no mean subtraction.
    return type(module).__name__.endswith("LayerNorm") and hasattr(module, "variance_epsilon")


def _has_relative_bias(module: nn.Module) -> bool:
    return bool(getattr(module, "has_relative_attention_bias", False)) and hasattr(module, "compute_bias")


# Which modules to hook for a model and parameter set, found once (walking the model every microbatch
# costs milliseconds); a few parameter sets per model (e.g. the training step's and a scoring layer set).
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_PLANS_PER_MODEL = 4


def _recording_plan(model: nn.Module, params: list[nn.Parameter]):
    """(attention modules whose relative bias is tracked, [(module, kind, its tracked parameters)])."""
    key = tuple(map(id, params))
    plans = _PLANS.setdefault(model, {})
    if key not in plans:
        if len(plans) >= _PLANS_PER_MODEL:
            plans.pop(next(iter(plans)))
        plans[key] = _find_uses(model, set(params))
    return plans[key]


def _find_uses(model: nn.Module, tracked: set):
    names = {p: n for n, p in model.named_parameters(remove_duplicate=False)}
    attentions = [m for m in model.modules() if _has_relative_bias(m) and m.relative_attention_bias.weight in tracked]
    bias_tables = {m.relative_attention_bias for m in attentions}
    recorded = []
    for name, module in model.named_modules(remove_duplicate=False):
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
        if not all(p.requires_grad for p in own):
            raise ValueError(f"{name}: its parameters do not require grad; self-influence needs them to")
        recorded.append((module, kind, own))
    return attentions, recorded


class GradTape:
    """Context manager: inside it, forward passes of `model` record the uses of `params`.

    >>> with GradTape(model, params, batch_size=B) as tape:
    ...     logits = model(...).logits
    >>> tape.backward(per_sample_losses.sum())
    >>> tape.squared_norms(params)      # (B,) exact per-sample squared gradient norms
    """

    def __init__(self, model: nn.Module, params: Iterable[nn.Parameter], batch_size: int):
        self.model = model
        self.params = list(dict.fromkeys(params))
        self.batch_size = batch_size
        self.uses: dict[nn.Parameter, list[_Use]] = {p: [] for p in self.params}
        self.per_sample: dict[nn.Parameter, torch.Tensor] = {}  # per-sample gradients formed by squared_norms
        self._handles: list = []
        self._patched: list[nn.Module] = []
        self._frozen: list[nn.Parameter] = []

    # ---- recording ---------------------------------------------------------------------------------
    def __enter__(self) -> "GradTape":
        attentions, recorded = _recording_plan(self.model, self.params)
        for attention in attentions:
            self._expand_relative_bias(attention)
        for module, kind, owned in recorded:
            self._handles.append(module.register_forward_hook(self._recorder(kind, owned)))
        self._frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in self._frozen:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        for p in self._frozen:
            p.requires_grad_(True)
        for handle in self._handles:
            handle.remove()
        for attention in self._patched:
            del attention.compute_bias  # back to the class method
        self._handles, self._patched, self._frozen = [], [], []

    def _recorder(self, kind: str, owned: list[nn.Parameter]):
        lists = [self.uses[p] for p in owned]  # a Linear's weight and bias share one record

        def hook(module, args, output):
            output = _in_graph(output)
            use = _record(kind, module, args[0], output)
            for uses in lists:
                uses.append(use)
            return output
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
            values = _in_graph(class_compute_bias(attention, query_length, key_length, device=device,
                                                  past_seen_tokens=past_seen_tokens))
            expanded = values.expand(self.batch_size, -1, -1, -1)
            self.uses[table.weight].append(_record("relative_bias", table, buckets.pop(), expanded))
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
            use.grad = torch.zeros_like(use.output_like, device=loss.device) if grad is None else grad
            use.output = None  # the graph is gone; the step holds every microbatch's tape until the end

    # ---- per-sample squared norms ------------------------------------------------------------------
    def squared_norms(self, params: Iterable[nn.Parameter] | None = None, group_size: int = 1) -> torch.Tensor:
        """Squared gradient norm restricted to `params` (default: all tracked), per contiguous group of
        `group_size` samples: shape (batch_size // group_size,), float64. Per-sample gradients that this forms on
        the way (small layers: norms, biases, Linear weights when cheaper than the Gram form) are kept
        for add_weighted_grads."""
        if self.batch_size % group_size:
            raise ValueError(f"group size {group_size} does not divide the batch size {self.batch_size}")
        n_groups = self.batch_size // group_size
        total = None
        for p in (self.params if params is None else params):
            if p in self.per_sample:
                norms = sq_norm_per_group(self.per_sample[p].reshape(n_groups, group_size, -1).sum(1))
            else:
                norms, per_group = _param_sq_norms(p, self.uses[p], n_groups)
                if group_size == 1 and per_group is not None:
                    self.per_sample[p] = per_group
                    self._release(p)
            total = norms if total is None else total + norms
        if total is None:
            raise ValueError("no parameters to take the norm over")
        return total

    def _release(self, p: nn.Parameter) -> None:
        """Drop the recorded factors of p, now summarised by its per-sample gradients (a step keeps every
        microbatch's tape until all scores are in), unless another parameter of the module needs them."""
        for use in self.uses[p]:
            if sum(1 for _ in use.module.parameters(recurse=False)) == 1:
                use.inputs = use.grad = None
                use.cache.clear()

    # ---- weighted gradients ------------------------------------------------------------------------
    @torch.no_grad()
    def add_weighted_grads(self, weights: torch.Tensor, grads: dict[nn.Parameter, torch.Tensor]) -> None:
        """grads[p] += d/dp sum_j weights[j] * loss_j for every tracked parameter p (weights: (batch_size,))."""
        for p in self.params:
            out = grads[p]
            if p in self.per_sample:
                per_sample = self.per_sample[p]
                out.add_(torch.mv(per_sample.flatten(1).t(), weights.to(per_sample.dtype)).view_as(out).to(out.dtype))
                continue
            for use in self.uses[p]:
                _add_weighted_grad(p, use, weights, out)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


# Float32 sums over at most this many terms, added in float64: about as fast as one float32 pass and exact
# to ~1e-8 relative, where one float32 norm over a 262k-entry per-sample gradient is ~5e-6 off.
_PARTIAL = 128
# Query/key pairs per float32 partial table of a relative-attention bias gradient (memory: one
# (G*H, buckets) table per run).
_BIAS_RUN = 1024


def _partial_runs(x: torch.Tensor) -> torch.Tensor:
    """x (G, ...) viewed as (G, runs, c): c is the largest power of two <= _PARTIAL dividing the entries per group."""
    flat = x.reshape(x.shape[0], -1)
    return flat.view(flat.shape[0], -1, math.gcd(flat.shape[1], _PARTIAL))


def _sum_per_group(x: torch.Tensor) -> torch.Tensor:
    """The sum of each x[g], float64."""
    return _partial_runs(x).sum(2).double().sum(1)


def sq_norm_per_group(x: torch.Tensor) -> torch.Tensor:
    """The squared norm of each x[g], float64 (vector_norm: no squared copy of x)."""
    return torch.linalg.vector_norm(_partial_runs(x), dim=2).double().square().sum(1)


def _grouped(t: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(B, T, d) -> (G, (B/G) T, d): the tokens of each contiguous group of samples side by side."""
    return t.reshape(n_groups, -1, t.shape[-1])


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _linear_factors(use: _Use, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations, output gradients) grouped, in at least float32; the activations as the matmul saw
    them (autocast casts the input to the output's dtype)."""
    grad = use.grad
    dtype = _acc_dtype(grad)
    return _grouped(use.inputs.to(grad.dtype), n_groups).to(dtype), _grouped(grad, n_groups).to(dtype)


def _rms_norm_factor(use: _Use) -> torch.Tensor:
    """x_hat = the layer norm's output for a unit weight, computed by the module's own forward (so it is
    bit-identical to what the weight was multiplied with); cached on the use."""
    if "x_hat" not in use.cache:
        module = use.module
        weight = module._parameters["weight"]
        module._parameters["weight"] = torch.ones_like(weight)
        try:
            with torch.no_grad():
                use.cache["x_hat"] = module.forward(use.inputs)  # .forward: no hooks, nothing recorded
        finally:
            module._parameters["weight"] = weight
    return use.cache["x_hat"]


def _param_sq_norms(p: nn.Parameter, uses: list[_Use], n_groups: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-group squared norms, per-group gradients of shape (G, *p.shape) when they were formed)."""
    if not uses:
        return torch.zeros(n_groups, device=p.device, dtype=torch.float64), None
    kinds = {u.kind for u in uses}
    if kinds == {"rms_norm"}:
        per_group = sum((u.grad.to(_acc_dtype(u.grad)) * _rms_norm_factor(u)).reshape(n_groups, -1, p.shape[0]).sum(1)
                        for u in uses)
        return sq_norm_per_group(per_group), per_group
    if kinds == {"relative_bias"}:
        per_group = sum(_relative_bias_tables(u, n_groups) for u in uses)
        return per_group.square().sum((1, 2)), per_group
    if kinds == {"linear"} and p is uses[0].module.bias:
        per_group = _cat([_linear_factors(u, n_groups)[1] for u in uses], 1).sum(1)
        return sq_norm_per_group(per_group), per_group
    if not kinds <= {"linear", "embedding"}:
        raise NotImplementedError(f"a parameter used as {sorted(kinds)} at once is not supported")
    # Uses of the same kind concatenate along the token axis; an embedding tied to the output layer
    # adds the cross term 2 <embedding part, output-layer part>.
    linear = [_linear_factors(u, n_groups) for u in uses if u.kind == "linear"]
    embedding = [u for u in uses if u.kind == "embedding"]
    if linear and not embedding:
        return _linear_sq_norms(_cat([a for a, _ in linear], 1), _cat([g for _, g in linear], 1))
    ids = _cat([u.inputs.reshape(n_groups, -1) for u in embedding], 1)
    embedding_grads = _cat([_grouped(_masked_embedding_grad(u), n_groups).to(_acc_dtype(u.grad))
                            for u in embedding], 1)
    total = _embedding_sq_norms(ids, embedding_grads, p.shape[0])
    if linear:
        acts, linear_grads = _cat([a for a, _ in linear], 1), _cat([g for _, g in linear], 1)
        total = total + _linear_sq_norms(acts, linear_grads)[0]
        total = total + 2 * _embedding_linear_cross(ids, embedding_grads, acts, linear_grads)
    return total, None


def _linear_sq_norms(acts: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """||sum_t grads_t acts_t^T||^2 per group (float64); acts (G, T, d_in), grads (G, T, d_out). The Gram
    form costs T^2 (d_in + d_out) per group, the per-group matrices T d_in d_out: take the cheaper."""
    tokens, d_in, d_out = acts.shape[1], acts.shape[2], grads.shape[2]
    if tokens * (d_in + d_out) < d_in * d_out:
        gram = torch.bmm(acts, acts.transpose(1, 2))
        return _sum_per_group(gram.mul_(torch.bmm(grads, grads.transpose(1, 2)))), None
    per_group = torch.bmm(grads.transpose(1, 2), acts)
    return sq_norm_per_group(per_group), per_group


def _relative_bias_tables(use: _Use, n_groups: int) -> torch.Tensor:
    """Per-group gradient of the bias table, (G, buckets, heads), float64: the position-bias gradient
    summed over the query/key pairs of each bucket. A bucket far from the diagonal collects ~T^2/2 pairs,
    so each run of _BIAS_RUN pairs is scattered into its own float32 table and the tables are added in
    float64; the scatter reads each (group, head) row of the gradient in order, without a transposed copy."""
    grad = use.grad.to(_acc_dtype(use.grad))
    if n_groups != grad.shape[0]:
        grad = grad.reshape(n_groups, -1, *grad.shape[1:]).sum(1)
    heads, n_buckets = grad.shape[1], use.module.weight.shape[0]
    rows = grad.reshape(n_groups * heads, -1)  # (G*H, Tq*Tk)
    pairs = rows.shape[1]
    runs = -(-pairs // _BIAS_RUN)
    keys = use.inputs.flatten() + n_buckets * (torch.arange(pairs, device=rows.device) // _BIAS_RUN)
    partial = rows.new_zeros(rows.shape[0], runs * n_buckets).scatter_add_(1, keys.expand_as(rows), rows)
    tables = partial.view(-1, runs, n_buckets).double().sum(1)
    return tables.view(n_groups, heads, n_buckets).transpose(1, 2)


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
    per_key = rows.square().sum(1).double()
    return per_key.new_zeros(n_groups).index_add_(0, unique_keys // vocab_size, per_key)


def _embedding_linear_cross(ids, emb_grads, acts, lin_grads) -> torch.Tensor:
    """<E, L> per group for a weight used both as an embedding (E = sum_t e_{id_t} emb_grads_t^T) and as
    a Linear (L = sum_s lin_grads_s acts_s^T, rows = vocabulary): sum_{t,s} lin_grads[s, id_t] <emb_grads_t, acts_s>."""
    dots = torch.bmm(emb_grads, acts.transpose(1, 2))  # (G, T_emb, T_lin)
    picked = torch.gather(lin_grads, 2, ids.unsqueeze(1).expand(-1, lin_grads.shape[1], -1))  # (G, T_lin, T_emb)
    return _sum_per_group(dots.mul_(picked.transpose(1, 2)))


def _add_weighted_grad(p: nn.Parameter, use: _Use, weights: torch.Tensor, out: torch.Tensor) -> None:
    """out += the gradient of sum_j weights[j] loss_j that flows through this one use of p."""
    grad = use.grad
    weights = weights.to(grad.dtype)
    if use.kind == "relative_bias":
        rows = torch.einsum("b,bhqk->qkh", weights, grad).reshape(-1, grad.shape[1])  # (Tq*Tk, H)
        out.index_add_(0, use.inputs.flatten(), rows.to(out.dtype))
        return
    per_token = weights.view(-1, *([1] * (grad.dim() - 1)))
    if use.kind == "embedding":
        scaled = _masked_embedding_grad(use) * per_token
        out.index_add_(0, use.inputs.flatten(), scaled.flatten(0, -2).to(out.dtype))
    elif use.kind == "rms_norm":
        out.add_((grad * per_token * _rms_norm_factor(use)).flatten(0, -2).sum(0).to(out.dtype))
    elif p is use.module.bias:
        out.add_((grad * per_token).flatten(0, -2).sum(0).to(out.dtype))
    else:  # Linear weight: (weighted output gradients)^T @ activations, scaling the narrower factor
        acts = use.inputs.to(grad.dtype)
        if grad.shape[-1] <= acts.shape[-1]:
            grad = grad * per_token
        else:
            acts = acts * per_token
        if out.dtype == grad.dtype:
            out.addmm_(grad.flatten(0, -2).t(), acts.flatten(0, -2))
        else:
            out.add_(torch.mm(grad.flatten(0, -2).t(), acts.flatten(0, -2)).to(out.dtype))

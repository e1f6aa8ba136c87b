"""Per-sample gradient norms and per-sample-weighted gradients of a Hugging Face transformer (T5 / mT5,
GPT-2, Llama, BERT, ...) from one backward pass, without forming per-sample gradients of the whole model.

During one forward pass a `GradTape` records, for every call of a module that owns a tracked
parameter, the two factors that parameter's gradient is made of: what went into the module (activations,
token ids, relative-position buckets) and the module's output. One `torch.autograd.grad` call with those
outputs as its inputs then yields the gradient arriving at each output, sample by sample (samples never
interact in these models, so row j of it comes from sample j's loss alone). The tape keeps each output's
place in the graph (its gradient edge), not the output itself, which autograd may not need to keep.

Inside the tape no parameter of the model requires grad, so that autograd keeps only what the gradients
of activations need (a Linear's input, a norm's normalised input are needed only for weight
gradients, which the tape forms from its own records); a tracked module whose inputs do not require grad
(the first of the set, fed by frozen layers) returns its output as a leaf that does, and the graph starts
there. requires_grad is restored on leaving the tape, also on error. From the two factors:

- `squared_norms`: the squared norm of each sample's (or each contiguous group of samples') gradient, exactly, in
  float64. Long float32 sums (a norm over a per-sample weight matrix, a bias-table entry over every
  query/key pair of its bucket) are float32 partial sums over short runs, added in float64.
  Linear weight (and transformers' Conv1D, the same map with the weight stored transposed): the per-sample
  matrix d^T a, or the Gram form sum_{t,t'} <a_t, a_t'> <d_t, d_t'> ("ghost norm") when that is cheaper,
  T (d_in + d_out) < d_in d_out. Embedding: a segment sum of the output gradients over equal token ids.
  Norm (LayerNorm, RMS norm): sum_t d_t * x_hat_t, x_hat the output for a unit weight and zero bias. Bias:
  sum_t d_t. Relative attention bias: the gradient of the bias *expanded over the batch* (see
  `_expand_relative_bias`), scattered onto its buckets. A parameter used several times (a tied embedding:
  T5's encoder and decoder inputs, the output layer of GPT-2, BERT or a tied T5) gets the norm of the sum
  of its uses, cross terms included.
- `add_weighted_grads`: the gradient of sum_j w_j loss_j, by the usual weight-gradient formulas with
  each sample's output gradient scaled by w_j (backpropagation is linear in the loss), or as w @ the
  per-sample gradients where `squared_norms` formed them anyway.

Module kinds: nn.Linear, transformers' Conv1D, nn.Embedding, norms (any module whose only parameters are a
1-D weight and perhaps a bias of its size, and whose output is weight * f(input) + bias: nn.LayerNorm with
or without bias, T5LayerNorm, LlamaRMSNorm, nn.RMSNorm, ...), T5/mT5 relative attention bias (relying on
transformers' T5Attention.compute_bias, checked against brute force in tests/test_influence.py). What the
records model is checked, so that nothing is scored wrongly without an error:
- a tracked parameter owned by no module of these kinds is refused as soon as anything uses it (one that
  nothing uses, as BERT's prediction-head bias when the output layer is untied, has gradient 0 and is
  fine; so is one also owned by another module, as that bias is when tied, if only the recorded module
  uses it);
- on its first call within a plan, each recorded module's output is compared with the kind's formula
  computed from its recorded input (a Linear subclass that computes something else, a norm whose output is
  (1 + weight) * x_hat, an output changed by another hook are refused);
- inputs must be batch-first: leading dimension the batch size, or 1 for a tensor every sample shares
  (learned position ids (1, T)), which is expanded to the batch with the module's output, so that each
  sample gets its own gradient; that output may then only be broadcast by arithmetic (added to the token
  embeddings), since expanding is what broadcasting does but not what, say, indexing it does;
- a tracked parameter read by any torch function outside the forward of a recorded module that owns it
  (e.g. logits = h @ embedding.weight.T) is refused, since that use is missing from the records;
- a model with gradient checkpointing on is refused (its backward runs the forward again, unrecorded).
Not detectable, so not supported: a module whose input mixes samples along the batch axis (batch norm),
or whose batch axis is not the first.

On a model sharded by FSDP2 the tape works on the parameters as registered (the shards): the records are
bound to them when the tape is entered, since during the forward FSDP2 puts gathered stand-ins at the
modules' attributes. The check of a use outside the owning module cannot see those stand-ins, so there it
rests on the same model's check in one process.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode
from transformers.pytorch_utils import Conv1D


@dataclass(eq=False)
class _Use:
    """One call of a module that owns a tracked parameter, batch-first."""
    kind: str  # "linear" | "conv1d" | "embedding" | "norm" | "relative_bias"
    module: nn.Module
    inputs: torch.Tensor | None  # activations (B, T, d_in) | token ids (B, T) | buckets (Tq, Tk)
    output: GradientEdge | None  # where the output enters the graph: what the backward differentiates against
    output_like: torch.Tensor  # a meta tensor, the output's shape and dtype: (B, T, d_out) | (B, T, d) | (B, H, Tq, Tk)
    autocast: torch.dtype | None = None  # the autocast dtype the call ran under (a norm's x_hat is recomputed so)
    grad: torch.Tensor | None = None  # d loss / d output, filled by GradTape.backward
    bias: nn.Parameter | None = None  # the tracked parameter that is the module's bias, as planned
    cache: dict = field(default_factory=dict)  # quantities derived from the above, computed once


def _in_graph(output: torch.Tensor) -> torch.Tensor:
    """The output itself, or, when nothing it came from requires grad, the same values as a leaf that does."""
    return output if output.requires_grad else output.detach().requires_grad_()


def _record(kind: str, module: nn.Module, inputs: torch.Tensor, output: torch.Tensor,
            bias: nn.Parameter | None = None) -> _Use:
    like = torch.empty(output.shape, dtype=output.dtype, device="meta")
    device = output.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return _Use(kind, module, inputs, get_gradient_edge(output), like, autocast, bias=bias)


def _is_norm(module: nn.Module) -> bool:
    """A candidate norm: a leaf module owning a 1-D weight and at most a bias of the same shape. Whether it
    computes weight * f(input) + bias is checked on its first call (_check_modelled), not read from its class."""
    own = dict(module.named_parameters(recurse=False))
    weight, bias = own.pop("weight", None), own.pop("bias", None)
    return (not own and weight is not None and weight.dim() == 1 and next(module.children(), None) is None
            and (bias is None or bias.shape == weight.shape))


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if _is_norm(module):
        return "norm"
    return None


def _has_relative_bias(module: nn.Module) -> bool:
    return bool(getattr(module, "has_relative_attention_bias", False)) and hasattr(module, "compute_bias")


@dataclass
class _Plan:
    """What a tape hooks for one model and parameter set."""
    attentions: list[nn.Module]  # attention modules whose relative bias table is tracked
    recorded: list[tuple[str, nn.Module, str, list[nn.Parameter]]]  # (name, module, kind, its tracked parameters)
    owners: dict[int, tuple[set, str, str | None]]  # id(p) -> (modules allowed to use p, p's name, unknown owner)
    checked: set = field(default_factory=set)  # modules whose output was checked against their kind's formula


# Which modules to hook for a model and parameter set, found once (walking the model every microbatch
# costs milliseconds); a few parameter sets per model (e.g. the training step's and a scoring layer set).
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_PLANS_PER_MODEL = 4


def _recording_plan(model: nn.Module, params: list[nn.Parameter]) -> _Plan:
    key = tuple(map(id, params))
    plans = _PLANS.setdefault(model, {})
    if key not in plans:
        if len(plans) >= _PLANS_PER_MODEL:
            plans.pop(next(iter(plans)))
        plans[key] = _find_uses(model, set(params))
    return plans[key]


def _find_uses(model: nn.Module, tracked: set) -> _Plan:
    names = {p: n for n, p in model.named_parameters(remove_duplicate=False)}
    attentions = [m for m in model.modules() if _has_relative_bias(m) and m.relative_attention_bias.weight in tracked]
    bias_tables = {m.relative_attention_bias for m in attentions}
    owners = {id(table.weight): ({table}, names[table.weight], None) for table in bias_tables}
    recorded, unknown = [], []
    for name, module in model.named_modules():  # each module once, also when it sits at several names
        own = [p for p in module.parameters(recurse=False) if p in tracked]
        if not own or module in bias_tables:
            continue
        kind = _kind(module)
        if kind is None:
            unknown.append((name, module, own))
            continue
        if kind == "embedding" and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
            raise NotImplementedError(f"{name}: embeddings with max_norm, scale_grad_by_freq or sparse "
                                      "gradients are not supported by the per-sample engine. Fix: leave its "
                                      "parameters out of the layer set")
        if not all(p.requires_grad for p in own):
            raise ValueError(f"{name}: its parameters do not require grad; self-influence needs them to")
        recorded.append((name, module, kind, own))
        for p in own:
            owners.setdefault(id(p), (set(), names[p], None))[0].add(module)
    for name, module, own in unknown:
        # Whether such a module uses the parameter is known only when it runs: BERT's prediction head holds
        # an output bias it never uses itself (its decoder does when tied; nothing does when untied). The
        # guard refuses any use other than by a recorded owner; with none, any use at all.
        for p in own:
            owners.setdefault(id(p), (set(), names[p], f"{name} ({type(module).__name__})"))
    return _Plan(attentions, recorded, owners)


# What may be done with an output expanded over the batch (`GradTape._recorder`): broadcasting arithmetic,
# which is what gave each sample the same rows, and moving it, which keeps its shape.
_BROADCASTING = frozenset({"__add__", "__radd__", "__iadd__", "add", "add_", "__sub__", "__rsub__", "sub",
                           "__mul__", "__rmul__", "mul", "to"})


class _OwnUsesOnly(TorchFunctionMode):
    """Refuses any use of a tracked parameter by a torch function outside the forward of a recorded module
    that owns it: the tape sees a parameter only through its modules' inputs and outputs, so such a use
    would be missing from its gradient. Reading metadata (dtype, shape, device) is no use: only calls that
    return a tensor count. Also refuses any use other than broadcasting arithmetic of a shared output the
    tape expanded over the batch (`self.shared`): what it assumed of such an output (e.g. out[0], a sum
    over the batch axis, would make sample 0's row collect every sample's gradient)."""

    def __init__(self, owners: dict[int, tuple[set, str, str | None]]):
        super().__init__()
        self.owners = owners
        self.running: list[nn.Module] = []  # the recorded modules whose forward is under way, innermost last
        self.shared: dict[int, tuple[torch.Tensor, str]] = {}  # id -> (expanded output, its module's name)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list))
                                             and any(isinstance(o, torch.Tensor) for o in out)):
            for arg in (*args, *kwargs.values()):
                for x in (arg if isinstance(arg, (tuple, list)) else (arg,)):
                    if isinstance(x, torch.Tensor):
                        self._check(func, x)
        return out

    def _check(self, func, x: torch.Tensor) -> None:
        func_name = getattr(func, "__name__", str(func))
        entry = self.owners.get(id(x))
        if entry is not None and not (self.running and self.running[-1] in entry[0]):
            allowed, param_name, unknown_owner = entry
            if not allowed:
                raise NotImplementedError(
                    f"{unknown_owner} owns {param_name}, used by {func_name}, and is a module the per-sample "
                    "engine cannot handle (it knows Linear, transformers' Conv1D, Embedding, LayerNorm / RMS "
                    "norms and T5's relative attention bias). Fix: leave its parameters out of the layer set")
            where = type(self.running[-1]).__name__ if self.running else "no recorded module"
            raise NotImplementedError(
                f"{param_name} is used by {func_name} outside the forward of the module that owns it (inside "
                f"{where}), which the per-sample engine does not model. Fix: leave this parameter out of the "
                "layer set, or use it through its module")
        shared = self.shared.get(id(x))
        if shared is not None and func_name not in _BROADCASTING:
            raise NotImplementedError(
                f"the output of {shared[1]}, computed once for the whole batch (leading dimension 1), is passed "
                f"to {func_name}; the per-sample engine models such an output only as broadcast over the batch "
                "by arithmetic. Fix: leave its parameters out of the layer set")


def _sole_input(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    inputs = [*args, *kwargs.values()]
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        raise NotImplementedError(f"{name} is called with {len(inputs)} arguments; the per-sample engine models "
                                  "a module of its kind called on one tensor. Fix: leave its parameters out of the "
                                  "layer set")
    return inputs[0]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to rounding: ||actual - expected|| <= sqrt(eps) ||expected|| (float32: 3e-4, bfloat16: 0.09),
    far below any difference a mis-modelled computation makes."""
    tolerance = torch.finfo(actual.dtype).eps ** 0.5 if actual.is_floating_point() else 0.0
    actual, expected = actual.double(), expected.double()
    return actual.shape == expected.shape and bool((actual - expected).norm() <= tolerance * expected.norm())


def _check_modelled(name: str, use: _Use, output: torch.Tensor) -> None:
    """Refuses a module whose output is not its kind's formula applied to its recorded input."""
    module, x = use.module, use.inputs
    with torch.no_grad():
        if use.kind == "linear":
            ok = _close(output, F.linear(x, module.weight, module.bias))
        elif use.kind == "conv1d":
            expected = x @ module.weight
            ok = _close(output, expected if module.bias is None else expected + module.bias)
        elif use.kind == "embedding":
            ok = _close(output, F.embedding(x, module.weight, module.padding_idx))
        else:
            x_hat = _norm_factor(use)
            bias = getattr(module, "bias", None)
            expected = module.weight * x_hat if bias is None else module.weight * x_hat + bias
            ok = (output.shape == x.shape and x.shape[-1] == module.weight.shape[0] and _close(output, expected)
                  and not _with_unit_weight(module, x, 0.0).any())
    if not ok:
        formula = {"linear": "x W^T + b", "conv1d": "x W + b", "embedding": "W[ids]",
                   "norm": "weight * f(x) + bias"}[use.kind]
        raise NotImplementedError(f"{name} ({type(module).__name__}): its output is not {formula} of its input, "
                                  f"which is what the per-sample engine models for a {use.kind}. Fix: leave its "
                                  "parameters out of the layer set")


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
        self._guard: _OwnUsesOnly | None = None

    # ---- recording ---------------------------------------------------------------------------------
    def __enter__(self) -> "GradTape":
        if getattr(self.model, "is_gradient_checkpointing", False):
            raise NotImplementedError("gradient checkpointing runs the forward again inside the backward, where "
                                      "the tape records nothing. Fix: model.gradient_checkpointing_disable() "
                                      "for the per-sample pass")
        plan = _recording_plan(self.model, self.params)
        self._guard = _OwnUsesOnly(plan.owners)
        for attention in plan.attentions:
            self._expand_relative_bias(attention)
        for name, module, kind, owned in plan.recorded:
            self._handles.append(module.register_forward_pre_hook(self._enter_module))
            recorder = self._recorder(plan, name, module, kind, owned)
            self._handles.append(module.register_forward_hook(recorder, with_kwargs=True))
        self._frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in self._frozen:
            p.requires_grad_(False)
        self._guard.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._guard is not None:
            self._guard.__exit__(None, None, None)
        for p in self._frozen:
            p.requires_grad_(True)
        for handle in self._handles:
            handle.remove()
        for attention in self._patched:
            del attention.compute_bias  # back to the class method
        self._handles, self._patched, self._frozen, self._guard = [], [], [], None

    def _enter_module(self, module, args) -> None:
        self._guard.running.append(module)

    def _recorder(self, plan: _Plan, name: str, module: nn.Module, kind: str, owned: list[nn.Parameter]):
        lists = [self.uses[p] for p in owned]  # a Linear's weight and bias share one record
        batch_size = self.batch_size
        # Which tracked parameter is the bias is fixed now, by identity: during the forward, FSDP2 puts
        # gathered stand-ins at the module's attributes, so `module.bias is p` would not hold then.
        bias = next((p for p in owned if p is getattr(module, "bias", None)), None)

        def hook(module, args, kwargs, output):
            try:
                inputs = _sole_input(name, args, kwargs)
                if inputs.dim() < 2 or inputs.shape[0] not in (batch_size, 1) or output.shape[0] != inputs.shape[0]:
                    raise NotImplementedError(
                        f"{name} is called on a tensor of shape {tuple(inputs.shape)}: the per-sample engine needs "
                        f"the batch ({batch_size}) first, or 1 for a tensor every sample shares. Fix: leave its "
                        "parameters out of the layer set")
                output = _in_graph(output)
                shared = inputs.shape[0] != batch_size
                if shared:  # by every sample (position ids (1, T)): one row each
                    inputs = inputs.expand(batch_size, *inputs.shape[1:])
                    output = output.expand(batch_size, *output.shape[1:])
                use = _record(kind, module, inputs, output, bias)
                if module not in plan.checked:
                    _check_modelled(name, use, output)
                    plan.checked.add(module)
                for uses in lists:
                    uses.append(use)
                if shared:
                    self._guard.shared[id(output)] = (output, name)
                return output
            finally:
                self._guard.running.pop()
        return hook

    def _expand_relative_bias(self, attention: nn.Module) -> None:
        """The stack computes the position bias once, shape (1, H, Tq, Tk), and adds it to the scores of
        every layer and every sample. Returning it expanded to (B, H, Tq, Tk) changes no value, but makes
        the gradient arriving at it per sample (summed over the layers that use it, as it should be)."""
        table = attention.relative_attention_bias
        class_compute_bias = type(attention).compute_bias
        buckets: list[torch.Tensor] = []
        uses = self.uses[table.weight]  # bound now: FSDP2 swaps the table's weight during the forward

        def enter_table(module, args) -> None:
            buckets.append(args[0])
            self._guard.running.append(module)

        def leave_table(module, args, output) -> None:
            self._guard.running.pop()

        def compute_bias(query_length, key_length, device=None, past_seen_tokens=0):
            values = _in_graph(class_compute_bias(attention, query_length, key_length, device=device,
                                                  past_seen_tokens=past_seen_tokens))
            expanded = values.expand(self.batch_size, -1, -1, -1)
            uses.append(_record("relative_bias", table, buckets.pop(), expanded))
            return expanded

        attention.compute_bias = compute_bias
        self._handles.append(table.register_forward_pre_hook(enter_table))
        self._handles.append(table.register_forward_hook(leave_table))
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


def _with_unit_weight(module: nn.Module, x: torch.Tensor, weight_value: float = 1.0) -> torch.Tensor:
    """The module's own forward on x with its weight set to `weight_value` everywhere and its bias to 0
    (.forward: no hooks, nothing recorded)."""
    saved = dict(module._parameters)
    # plain tensors of the parameters' full shape, also where they are FSDP2's sharded DTensors
    weight = saved["weight"]
    module._parameters["weight"] = torch.full(weight.shape, weight_value, dtype=weight.dtype, device=x.device)
    if saved.get("bias") is not None:
        module._parameters["bias"] = torch.zeros(weight.shape, dtype=saved["bias"].dtype, device=x.device)
    try:
        with torch.no_grad():
            return module.forward(x)
    finally:
        module._parameters.update(saved)


def _norm_factor(use: _Use) -> torch.Tensor:
    """x_hat, what a norm's weight multiplies: its output for a unit weight and zero bias, by the module's own
    forward under the autocast the call ran under (so it is what the weight was multiplied with); cached."""
    if "x_hat" not in use.cache:
        x = use.inputs
        if use.autocast is None:
            use.cache["x_hat"] = _with_unit_weight(use.module, x)
        else:
            with torch.autocast(x.device.type, dtype=use.autocast):
                use.cache["x_hat"] = _with_unit_weight(use.module, x)
    return use.cache["x_hat"]


def _is_bias(p: nn.Parameter, use: _Use) -> bool:
    return use.kind in ("linear", "conv1d", "norm") and p is use.bias


def _param_sq_norms(p: nn.Parameter, uses: list[_Use], n_groups: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-group squared norms, per-group gradients of shape (G, *p.shape) when they were formed)."""
    if not uses:
        return torch.zeros(n_groups, device=p.device, dtype=torch.float64), None
    kinds = {u.kind for u in uses}
    biases = {_is_bias(p, u) for u in uses}
    if len(biases) > 1:
        raise NotImplementedError("a parameter used both as a bias and as a weight is not supported")
    if biases == {True}:
        per_group = _cat([_grouped(u.grad, n_groups).to(_acc_dtype(u.grad)) for u in uses], 1).sum(1)
        return sq_norm_per_group(per_group), per_group
    if kinds == {"norm"}:
        per_group = sum((u.grad.to(_acc_dtype(u.grad)) * _norm_factor(u)).reshape(n_groups, -1, p.shape[0]).sum(1)
                        for u in uses)
        return sq_norm_per_group(per_group), per_group
    if kinds == {"relative_bias"}:
        per_group = sum(_relative_bias_tables(u, n_groups) for u in uses)
        return per_group.square().sum((1, 2)), per_group
    if kinds == {"conv1d"}:  # weight (d_in, d_out): the Linear formulas with the two factors swapped
        conv = [_linear_factors(u, n_groups) for u in uses]
        return _linear_sq_norms(_cat([g for _, g in conv], 1), _cat([a for a, _ in conv], 1))
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
    elif _is_bias(p, use):
        out.add_((grad * per_token).flatten(0, -2).sum(0).to(out.dtype))
    elif use.kind == "norm":
        out.add_((grad * per_token * _norm_factor(use)).flatten(0, -2).sum(0).to(out.dtype))
    else:  # weight: (weighted output gradients)^T @ activations (Conv1D: its transpose), scaling the narrower factor
        acts = use.inputs.to(grad.dtype)
        if grad.shape[-1] <= acts.shape[-1]:
            grad = grad * per_token
        else:
            acts = acts * per_token
        left, right = (grad, acts) if use.kind == "linear" else (acts, grad)
        if out.dtype == grad.dtype:
            out.addmm_(left.flatten(0, -2).t(), right.flatten(0, -2))
        else:
            out.add_(torch.mm(left.flatten(0, -2).t(), right.flatten(0, -2)).to(out.dtype))

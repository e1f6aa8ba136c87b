"""Per-sample self-influence: this repository's engine beside the libraries a user would otherwise pick,
on the same model, batch and seed, for a model of any family (the preset's model.family: T5 by default;
presets/variants/tiny_gpt2.yaml, tiny_llama.yaml, tiny_bert.yaml for the others).

Every method scores each sample j of one batch with s_j = ||grad_P loss_j||^2 (loss_j: sample j's mean
target-token loss, P a set of parameters):
  ours                common.presence.influence.batch_self_influence: one forward and one backward pass down to
                      the outputs of P's modules; norms from their inputs and output gradients
  torch.func          vmap of grad over the samples (functional_call of the model)
  opacus-gsm          Opacus GradSampleModule: per-sample gradients in backward hooks, then their norms
  opacus-ghost        Opacus GradSampleModuleFastGradientClipping: per-sample norms (ghost norms for the
                      Linear layers), i.e. the first of ghost clipping's two backward passes
  backpack-batchgrad  BackPACK's BatchGrad: per-sample gradients, then their norms
  backpack-batchl2    BackPACK's BatchL2Grad: per-sample squared norms
and, as the yardstick, no per-sample method at all:
  plain-gradient      loss.backward() of the summed losses with only P requiring grad: the ordinary
                      gradient over P, what a training step's backward costs (`ratio_to_plain`)
P (column `params`) is the layer set K (--layers, default first) or the part of K a library handles:
  K-no-bias-tables    T5: Opacus reads the relative-attention bias's (query, key) bucket input as a batch,
                      so its per-sample gradients of the bias tables have the query length as batch size
  K-linear            BackPACK has no rule for layer norms (T5LayerNorm, LayerNorm, LlamaRMSNorm) nor
                      for GPT-2's Conv1D, and misreads T5's bucket input as Opacus does
On GPT-2, Llama and BERT, Opacus and torch.func run on K, BackPACK on K-linear (empty on GPT-2, whose
matmuls are all Conv1D: a row that says so). Each library is also run once on the whole of K;
`on_whole_k` says what goes wrong there. Ours runs on
every P, and `ratio_to_ours` is a method's time over ours on the same P (above 1: ours is faster), taken
round by round (both ran within seconds, under the same load of the machine): the median over rounds,
with the quartiles in `ratio_to_ours_q1` and `ratio_to_ours_q3`; `ratio_to_plain` likewise against the
plain gradient. A
library gets its own copy of the model frozen outside P (how these libraries are restricted); ours gets
a fully trainable copy, as in training, and freezes outside P itself. Every method's scores are checked
against a per-sample loop (one autograd pass per sample, float32 gradients, squares summed in float64):
`max_rel_err`. Norms of per-sample gradients are formed with ours' exact float64 helper for every method.
Timing: round-robin, `time_ms` the median over rounds (common.benchmark). Peak memory: above the model, the batch and a library's
wrapper, in a fresh process per method (CPU: peak resident size; CUDA: the allocator's peak). fp32.

The libraries are an optional extra: `make peers` installs the pinned `peers` list of pyproject.toml
with pip's --no-deps (BackPACK requires torchvision, which would replace the pinned torch). A library
that is not installed is skipped, with the reason in `note`.

    python 03_pretrain/bench_si_peers.py --preset tiny                   # CPU, ~3 min
    python 03_pretrain/bench_si_peers.py --preset tiny --threads 2 --set model.d_model=256 \\
        --set model.d_ff=1024 --set model.d_kv=64 --set model.num_layers=4 --set model.num_decoder_layers=4 \\
        --set data.input_length=256 --out results/tiny/bench/si_peers_medium.csv   # the medium shape, ~15 min
    python 03_pretrain/bench_si_peers.py --preset presets/variants/tiny_gpt2.yaml --no-memory   # GPT-2
    python 03_pretrain/bench_si_peers.py --preset small --device cuda --batch-size 64
Writes results/<preset>/bench/si_peers.csv (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import importlib.util
import json
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from common.benchmark import (benchmark_parser, can_measure_cpu_memory, fresh_process_json, median_ms,
                              paired_ratio_quartiles, peak_memory_mb, round_robin_seconds, write_benchmark_csv)
from common.cli import exit_on_known_errors
from common.config import load_preset
from common.data.span_corruption import compute_input_and_target_lengths
from common.families import get_family
from common.modeling import build_model, random_batch, random_microbatches
from common.presence.influence import batch_self_influence, group_losses, layer_set, token_losses
from common.presence.per_sample_grads import sq_norm_per_group
from common.seeding import seed_everything

WRONG = 1e-4  # a score this far from the loop's, relative, is wrong (float32 gradients agree to ~1e-6)
COLUMNS = ["method", "params", "n_params", "time_ms", "ratio_to_ours", "ratio_to_ours_q1", "ratio_to_ours_q3",
           "ratio_to_plain", "peak_mem_mb", "max_rel_err", "on_whole_k",
           "note", "library", "cpu_time_ms", "device", "preset", "layers", "batch_size", "input_length",
           "target_length", "d_model", "num_layers", "num_decoder_layers", "vocab_size", "precision", "repeats",
           "threads", "seed"]
# Which parameters of K each set keeps, by the module that owns them (its name, the module)
PARAM_SETS = {
    "K": lambda name, module: True,
    "K-no-bias-tables": lambda name, module: not name.endswith("relative_attention_bias"),
    "K-linear": lambda name, module: isinstance(module, nn.Linear),
}


class Unsupported(Exception):
    """What a library gets wrong on T5, found by running it."""


# ---- the methods: each setup takes (model, {name: parameter}, inputs, labels) and returns a function
# ---- that scores the batch, a (B,) float64 tensor

def setup_ours(model, params, inputs, labels):
    if "decoder_input_ids" not in inputs:  # one stack: Hugging Face's labels sit under their own tokens
        labels = nn.functional.pad(labels, (inputs["input_ids"].shape[1] - labels.shape[1], 0), value=-100)
    batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}
    return lambda: batch_self_influence(model, batch, layers=list(params))


def setup_plain(model, params, inputs, labels):
    def ordinary_gradient():
        sample_losses(model, inputs, labels).sum().backward()
        for p in params.values():
            p.grad = None
    return ordinary_gradient


def setup_torch_func(model, params, inputs, labels):
    from torch.func import functional_call, grad, vmap
    mask = inputs["attention_mask"]
    if not torch.equal(mask, mask[:1].expand_as(mask)):
        raise Unsupported("transformers' attention-mask builder branches on the mask's values, which vmap "
                          "cannot trace: every row must share one mask")
    rows = {k: v for k, v in inputs.items() if k != "attention_mask"}  # input ids (and T5's decoder inputs)

    def sample_loss(values, row, sample_labels):
        one = {**{k: v[None] for k, v in row.items()}, "attention_mask": mask[:1]}
        return sample_losses(lambda **kwargs: functional_call(model, values, args=(), kwargs=kwargs), one,
                             sample_labels[None])[0]

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    values = {name: p.detach() for name, p in params.items()}
    return lambda: summed(per_sample_grads(values, rows, labels), labels.shape[0], sq_norm_per_group)


def setup_opacus(ghost: bool):
    def setup(model, params, inputs, labels):
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        if ghost:
            wrapped = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", strict=False,
                                                           use_ghost_clipping=True)
            field, to_sq_norms = "_norm_sample", lambda norms: norms.double().square()
        else:
            wrapped = GradSampleModule(model, loss_reduction="sum", strict=False)
            field, to_sq_norms = "grad_sample", sq_norm_per_group
        return lambda: backward_and_sum(wrapped, params, inputs, labels, field, to_sq_norms)
    return setup


def setup_backpack(extension_name: str):
    def setup(model, params, inputs, labels):
        from backpack import backpack, extend, extensions
        extend(model)
        extension = getattr(extensions, extension_name)()
        to_sq_norms = sq_norm_per_group if extension.savefield == "grad_batch" else (lambda sq: sq.double())
        return lambda: backward_and_sum(model, params, inputs, labels, extension.savefield, to_sq_norms,
                                        context=lambda: backpack(extension))
    return setup


def backward_and_sum(model, params, inputs, labels, field: str, to_sq_norms,
                     context=contextlib.nullcontext) -> torch.Tensor:
    """loss.backward() of the summed per-sample losses, then the per-sample results the library left in
    `field` of each parameter, summed into scores; the fields and .grad are cleared for the next call."""
    loss = sample_losses(model, inputs, labels).sum()
    with context():
        loss.backward()
    results = {name: getattr(p, field, None) for name, p in params.items()}
    for p in params.values():
        setattr(p, field, None)
        p.grad = None
    return summed(results, labels.shape[0], to_sq_norms)


def summed(per_param: dict, batch_size: int, to_sq_norms: Callable) -> torch.Tensor:
    """Sum over parameters of each sample's squared norm, from what a library returned per parameter."""
    missing = [name for name, value in per_param.items() if value is None]
    problems = [f"no per-sample result for {', '.join(missing)}"] if missing else []
    problems += [f"{name}: per-sample result of shape {tuple(value.shape)} for a batch of {batch_size}"
                 for name, value in per_param.items() if value is not None and value.shape[0] != batch_size]
    if problems:
        raise Unsupported("; ".join(problems))
    return sum(to_sq_norms(value) for value in per_param.values())


@dataclass(frozen=True)
class Method:
    name: str
    params: str  # a key of PARAM_SETS
    library: str  # the distribution it needs, "" for none beyond this repository's
    module: str  # its import name
    setup: Callable

    @property
    def key(self) -> str:
        return f"{self.name}@{self.params}"


PLAIN = "plain-gradient"
METHODS = [  # T5's
    Method(PLAIN, "K", "", "", setup_plain),
    Method("ours", "K", "", "", setup_ours),
    Method("torch.func", "K", "", "", setup_torch_func),
    Method(PLAIN, "K-no-bias-tables", "", "", setup_plain),
    Method("ours", "K-no-bias-tables", "", "", setup_ours),
    Method("opacus-gsm", "K-no-bias-tables", "opacus", "opacus", setup_opacus(ghost=False)),
    Method("opacus-ghost", "K-no-bias-tables", "opacus", "opacus", setup_opacus(ghost=True)),
    Method(PLAIN, "K-linear", "", "", setup_plain),
    Method("ours", "K-linear", "", "", setup_ours),
    Method("backpack-batchgrad", "K-linear", "backpack-for-pytorch", "backpack", setup_backpack("BatchGrad")),
    Method("backpack-batchl2", "K-linear", "backpack-for-pytorch", "backpack", setup_backpack("BatchL2Grad")),
]
# GPT-2, Llama, BERT: no bias tables, so Opacus is run on K
ONE_STACK_METHODS = [m if m.params != "K-no-bias-tables" else Method(m.name, "K", m.library, m.module, m.setup)
                     for m in METHODS if not (m.params == "K-no-bias-tables" and m.name in (PLAIN, "ours"))]


def methods_of(family: str) -> list[Method]:
    return METHODS if family == "t5" else ONE_STACK_METHODS


# ---- shared pieces ----------------------------------------------------------------------------------

def sample_losses(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's mean target-token loss, (B,); `inputs` hold T5's decoder inputs, so that a library's
    wrapper (which hides the model's own methods) can be called as the model. `labels` are the targets
    aligned with the logits' first positions (a causal LM's: labels[:, 1:], predicted by every position
    but the last, whose logits are dropped; the other families': every position's)."""
    logits = model(**inputs).logits[:, :labels.shape[1]]
    return group_losses(token_losses(logits, labels), labels)


def chosen_params(model: nn.Module, layers: str, subset: str) -> dict[str, nn.Parameter]:
    """The parameters of `subset` (a key of PARAM_SETS) of layer set `layers`, by name, in model order."""
    k_params, keep = set(layer_set(model, layers)), PARAM_SETS[subset]
    return {f"{module_name}.{name}": p for module_name, module in model.named_modules()
            for name, p in module.named_parameters(recurse=False) if p in k_params and keep(module_name, module)}


def prepare(method: Method, model: nn.Module, layers: str, inputs: dict, labels: torch.Tensor,
            subset: str | None = None) -> Callable[[], torch.Tensor]:
    """The method's scoring function on its own copy of the model, on `subset` (default: its own)."""
    model = copy.deepcopy(model)
    params = chosen_params(model, layers, subset or method.params)
    if method.name != "ours":
        for p in model.parameters():
            p.requires_grad_(p in set(params.values()))
    return method.setup(model, params, inputs, labels)


def loop_sq_norms(model: nn.Module, params: dict[str, nn.Parameter], inputs: dict, labels: torch.Tensor) -> dict:
    """The reference: per parameter, each sample's squared gradient norm from its own autograd pass."""
    rows = []
    for j in range(labels.shape[0]):
        one = {k: v[j:j + 1] for k, v in inputs.items()}
        grads = torch.autograd.grad(sample_losses(model, one, labels[j:j + 1])[0], list(params.values()))
        rows.append(torch.stack([g.double().square().sum() for g in grads]))
    return dict(zip(params, torch.stack(rows).t()))


def ratio_columns(to_ours: tuple | None, to_plain: tuple | None) -> dict:
    """The per-round ratios' median and quartiles against ours, and median against the plain gradient."""
    columns = dict.fromkeys(["ratio_to_ours", "ratio_to_ours_q1", "ratio_to_ours_q3", "ratio_to_plain"], "")
    if to_ours:
        columns["ratio_to_ours_q1"], columns["ratio_to_ours"], columns["ratio_to_ours_q3"] = (round(r, 3) for r in to_ours)
    if to_plain:
        columns["ratio_to_plain"] = round(to_plain[1], 3)
    return columns


def max_rel_err(scores: torch.Tensor, reference: torch.Tensor) -> float:
    return ((scores - reference).abs() / reference).max().item()


def failure(why: Exception) -> str:
    if isinstance(why, Unsupported):
        return f"fails: {why}"
    return f"error: {type(why).__name__}: {str(why).splitlines()[0][:300]}"


def outcome(fn: Callable[[], torch.Tensor], reference: torch.Tensor) -> tuple[float | None, str]:
    """(max relative error against the loop, or None; what went wrong, or "")."""
    try:
        err = max_rel_err(fn(), reference)
    except Exception as why:  # a library's own error on a model is a result here
        return None, failure(why)
    return err, ("" if err <= WRONG else f"wrong scores: max relative error {err:.2g}")


def installed(method: Method) -> bool:
    return not method.module or importlib.util.find_spec(method.module) is not None


def library_version(method: Method) -> str:
    name = method.library or ("torch" if method.name in ("torch.func", PLAIN) else "")
    if not name:
        return "this repository"
    return f"{name} {importlib.metadata.version(name)}" if installed(method) else name


def quiet_libraries() -> None:
    # Expected on T5: BackPACK hooks every module and warns for containers, which need no extension and
    # return no tensor; a full backward hook on the first module sees no input that requires grad.
    warnings.filterwarnings("ignore", message=".*does not have an extension for Module")
    warnings.filterwarnings("ignore", message="For backward hooks to be called, module output should be a Tensor")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")


# ---- main -------------------------------------------------------------------------------------------

def main(preset_name: str = "tiny", overrides: list[str] | None = None, device: str | None = None,
         batch_size: int | None = None, layers: str = "first", methods: list[str] | None = None, repeats: int = 5,
         warmup: int = 1, seed: int = 0, threads: int | None = None, measure_memory: bool = True,
         memory_only: str | None = None, out: str | None = None) -> dict:
    preset = load_preset(preset_name, overrides)
    family = preset.model.family
    known = [m.key for m in methods_of(family)]
    if unknown := set(methods or []) - set(known):
        raise ValueError(f"unknown methods {sorted(unknown)}. Fix: choose from {known}")
    chosen = [m for m in methods_of(family) if not methods or m.key in methods]
    if threads:
        torch.set_num_threads(threads)
    if preset.model.dropout_rate:
        raise ValueError(f"model.dropout_rate is {preset.model.dropout_rate}: with dropout no two methods see the "
                         "same network. Fix: --set model.dropout_rate=0")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = batch_size or preset.pretrain.batch_size
    vocab_size, input_length = preset.data.tokenizer.vocab_size, preset.data.input_length
    target_length = compute_input_and_target_lengths(input_length, preset.data.noise_density,
                                                     preset.data.mean_noise_span_length)[1]
    seed_everything(seed)
    if family == "t5":
        model = build_model(preset.model, vocab_size).to(device).train()  # train: Opacus records only then
        batch = random_microbatches(batch_size, 1, input_length, target_length, vocab_size, device)[0]
        labels = batch["labels"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels)}
    else:  # rows of the raw length span corruption shortens to input_length, as pre-training reads them
        input_length = compute_input_and_target_lengths(input_length, preset.data.noise_density,
                                                        preset.data.mean_noise_span_length)[0]
        target_length = input_length - (get_family(family).objective == "next-token")
        model = build_model(preset.model, vocab_size, positions=input_length).to(device).train()
        batch = random_batch(family, batch_size, input_length, 0, vocab_size, device)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"][:, input_length - target_length:]  # the targets: a causal LM's shifted
    if memory_only:  # inside the fresh process of one method, started below
        method = next(m for m in methods_of(family) if m.key == memory_only)
        peak = peak_memory_mb(prepare(method, model, layers, inputs, labels), device, reset=gc.collect)
        print(json.dumps({memory_only: peak}))
        return {memory_only: peak}
    print(f"{preset_name} ({family}) on {device}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"batch {batch_size} x {input_length} -> {target_length} tokens, layer set {layers}, "
          f"{torch.get_num_threads()} threads")

    reference = loop_sq_norms(model, chosen_params(model, layers, "K"), inputs, labels)
    fns, errors, on_whole_k, notes = {}, {}, {}, {}
    for method in chosen:
        if not installed(method):
            notes[method.key] = f"skipped: {method.library} is not installed (make peers)"
            print(f"{method.key}: {notes[method.key]}")
            continue
        if method.name != PLAIN and method.params != "K":
            whole = lambda: prepare(method, model, layers, inputs, labels, subset="K")()  # noqa: E731
            on_whole_k[method.key] = outcome(whole, sum(reference.values()))[1] or "ok"
        if not chosen_params(model, layers, method.params):  # GPT-2's K-linear: its matmuls are Conv1D
            notes[method.key] = f"skipped: no parameter of K is in {method.params} on {family}"
            print(f"{method.key}: {notes[method.key]}; on the whole of K: {on_whole_k.get(method.key, '')}")
            continue
        if method.name == PLAIN:  # no per-sample result to check
            fns[method.key] = prepare(method, model, layers, inputs, labels)
            continue
        expected = sum(reference[name] for name in chosen_params(model, layers, method.params))
        try:
            fns[method.key] = prepare(method, model, layers, inputs, labels)
        except Exception as why:  # e.g. BackPACK's extend() on BERT
            notes[method.key] = failure(why)
            continue
        errors[method.key], notes[method.key] = outcome(fns[method.key], expected)
        if method.params == "K":
            on_whole_k[method.key] = notes[method.key] or "ok"
        print(f"{method.key}: max relative error {errors[method.key]}; on the whole of K: {on_whole_k[method.key]}")
        if errors[method.key] is None:
            del fns[method.key]
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall_s, cpu_s = round_robin_seconds(fns, repeats, device)
    time_ms, cpu_ms = median_ms(wall_s), median_ms(cpu_s)
    ratio = lambda key, other: paired_ratio_quartiles(wall_s[key], wall_s[other])  # noqa: E731
    peak = {}
    if measure_memory and (device == "cuda" or can_measure_cpu_memory()):
        argv = ["--preset", preset_name, "--device", device, "--batch-size", str(batch_size), "--layers", layers,
                "--seed", str(seed), "--threads", str(torch.get_num_threads())]
        argv += [f"--set={o}" for o in overrides or []]
        for key in fns:
            print(f"peak memory of {key} in a fresh process ...")
            peak.update(fresh_process_json(__file__, argv + ["--memory-only", key]))

    rows = []
    for method in chosen:
        key, ours, plain = method.key, f"ours@{method.params}", f"{PLAIN}@{method.params}"
        measured = key in time_ms
        rows.append({
            "method": method.name, "params": method.params,
            "n_params": sum(p.numel() for p in chosen_params(model, layers, method.params).values()),
            "time_ms": round(time_ms[key], 2) if measured else "",
            **ratio_columns(ratio(key, ours) if measured and ours in time_ms else None,
                            ratio(key, plain) if measured and plain in time_ms else None),
            "peak_mem_mb": round(peak[key], 1) if key in peak else "",
            "max_rel_err": f"{errors[key]:.2g}" if errors.get(key) is not None else "",
            "on_whole_k": on_whole_k.get(key, ""), "note": notes.get(key, ""),
            "library": library_version(method),
            "cpu_time_ms": round(cpu_ms[key], 2) if measured and device == "cpu" else "", "device": device,
            "preset": preset_name, "layers": layers, "batch_size": batch_size, "input_length": input_length,
            "target_length": target_length, "d_model": preset.model.d_model, "num_layers": preset.model.num_layers,
            "num_decoder_layers": preset.model.num_decoder_layers, "vocab_size": vocab_size, "precision": "fp32",
            "repeats": repeats, "threads": torch.get_num_threads(), "seed": seed})
    print(f"{'method':<20}{'params':<18}{'ms':>10}{'÷ ours':>8}{'÷ plain':>8}{'peak MB':>9}{'rel err':>9}  "
          "on the whole of K")
    for r in rows:
        print(f"{r['method']:<20}{r['params']:<18}{r['time_ms']:>10}{r['ratio_to_ours']:>8}{r['ratio_to_plain']:>8}"
              f"{r['peak_mem_mb']:>9}{r['max_rel_err']:>9}  {r['on_whole_k'] or r['note']}")
    path = write_benchmark_csv(rows, COLUMNS, out, preset_name, "si_peers.csv")
    return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
    parser = benchmark_parser(__doc__, "si_peers.csv", repeats=5)
    parser.add_argument("--batch-size", type=int, default=None, help="samples scored at once (default: the "
                        "preset's pretrain.batch_size)")
    parser.add_argument("--layers", default="first", help="the layer set K (first, embeddings, all)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME@PARAMS",
                        help=f"a subset of {[m.key for m in METHODS]} (default: all)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after the checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", dest="measure_memory", action="store_false",
                        help="skip the peak-memory measurement (one fresh process per method)")
    parser.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)  # internal: the fresh process
    args = parser.parse_args()
    quiet_libraries()
    with exit_on_known_errors():
        main(args.preset, args.overrides, args.device, args.batch_size, args.layers, args.methods, args.repeats,
             args.warmup, args.seed, args.threads, args.measure_memory, args.memory_only, args.out)

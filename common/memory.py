"""Will a pre-training run fit on this machine? Its peak memory is estimated from the preset before anything
starts and compared with what the machine has; a run that cannot fit, or that asks for a GPU the machine
lacks (bf16 autocast, torch.compile: both GPU-only in 03_pretrain), is refused with the estimate and the
override (pretrain.memory_check=false).

The estimate, in bytes, of one process (rank) training a model of P parameters with n microbatches per rank of
b sequences each (inputs of L_e tokens, targets of L_d), weights and gradients in float32:

    peak = RUNTIME + 4 P (weights) + 4 P (gradients) + 4 n P (PRESENCE per microbatch only: one gradient row
           per microbatch, all kept until the weights are known) + optimizer state
           + ACTIVATION_FACTOR * a * b * A (one microbatch's forward and backward)
           + 4 n b (R + K) (per-sample PRESENCE: the tapes of every microbatch, kept until the weights are known)

with optimizer state 4 (r + c) bytes per r x c matrix and 4 m per vector of m (Adafactor, factored second
moments, no first moment, as T5X) or 8 P (AdamW), a = 4 bytes per activation (2 under bf16 autocast), and A the
floats autograd keeps per sequence for the backward pass of a T5 v1.1 of d_model d, d_ff f, h heads of d_kv k,
N_e + N_d layers and a vocabulary of V:

    A = N_e L_e (4 d + 4 h k + h L_e + 4 f)                     encoder: layer norms, q k v and attention
                                                                 output, attention probabilities, gated FFN
      + N_d L_d (6 d + 5 h k + h (L_d + L_e) + 4 f)             decoder: the same with self- and cross-attention
      + 2 N_d L_e h k                                            cross-attention keys and values of the inputs
      + 3 L_d V                                                  logits, their log-softmax and its gradient
      + h L_e (L_e + L_d)                                        relative position biases

Per-sample PRESENCE's tape (common/presence/per_sample_grads.py) keeps, per sequence, R floats of records
for every module outside the layer set K (each Linear's and norm's input, once where several share it,
and the gradient at its output: 8 d + 4 h k + 3 f per encoder token and layer, 12 d + 6 h k + 3 f per
decoder token and layer plus 2 h k per input token for its cross-attention keys and values, and the
embeddings, final norms and output layer, d + V per target token) and K floats for K itself: each matrix
d_in x d_out over T tokens as its per-sample gradient (d_in d_out) or, where the Gram form is cheaper
(T (d_in + d_out) < d_in d_out), its records. Under fsdp the tape records K only and lives for one
pass, which adds 4 b K instead (the update is a second pass).

The plan of a run (`plan_memory`, printed by `03_pretrain/pretrain.py --plan-memory` without building the
model) also takes the strategy, the process count W, the accumulation chunks c and activation checkpointing
into account:
- fsdp shards the weights, gradients, gradient rows and optimizer state over the W ranks (each term / W) and
  adds what FSDP2 gathers: the root's parameters (embeddings, output layer, final norms) and two blocks
  (the one running and the next, prefetched) unsharded, and the unsharded gradients of the root and one
  block before their reduce-scatter; every microbatch is shared by the ranks, so one pass runs b / (W c)
  sequences (replicate: b / c);
- activation checkpointing keeps each block's input (d floats per token and layer) and one block's
  activations at a time, plus the logits;
- a one-stack family (GPT-2, Llama, BERT) counts its parameters on a model built on the meta device (no
  memory) and its activations as the encoder term over its row length L, plus the logits (3 L V).

How close it is, against peak resident set sizes (getrusage, one CPU thread; the constants were fitted on
these): whole `pretrain.py --preset tiny` runs of 60 steps (evaluation and checkpoints included), 0.73 and
0.75 GB estimated for the baseline and PRESENCE against 0.68 and 0.79 measured (+7%, -5%). Two optimizer steps
of random microbatches at the small preset's dimensions, by a script holding 0.47 GB after its imports (in
place of RUNTIME): the baseline with 2 and 8 sequences per microbatch 1.89 and 4.30 GB against 2.13 and 4.54
(-11%, -5%), PRESENCE with 2 microbatches of 8 4.91 against 4.78 (+3%). Per-sample PRESENCE, the model terms
against tests/measure_step_memory.py's peak beyond its start: 4 microbatches of 2 at the small dimensions 3.08
GB against 3.45 (-11%); 4 of 4 and 4 of 16 at d_model 256 and 4 + 4 layers 0.50 and 1.71 GB against 0.63 and
2.23 (-20%, -23%); the tapes are R and K as counted above, nothing fitted. Under fsdp (2 gloo processes,
PRESENCE per microbatch) a rank's fixed costs outweigh the model at such shapes (0.47 GB measured against
0.23), but what it adds with twice the layers or four times the rows is within a third of the estimate's
increase (+237 MB against +164, +181 against +167; tests/test_memory.py). Per sample under fsdp it is not:
four times the rows add 466 MB measured against 193 estimated, and a per-sample fsdp plan says so. The small
preset itself (8 microbatches of 64 in fp32, as on a CPU) comes out at 29.5 GB: on a 24 GB machine it was
killed at 24 GB resident.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, Preset, preset_argument
from common.data.span_corruption import compute_input_and_target_lengths
from common.presence.methods import get_method

GB = 1e9
# What a pretrain.py process holds besides the terms below: the interpreter with torch, transformers, scipy
# imported (0.47 GB measured), the data, the evaluation batches, the model writes and the allocator's slack.
# Whole tiny runs peak at 0.68 (baseline) and 0.79 GB (PRESENCE), of which the terms below are 0.03 and 0.05.
RUNTIME_BYTES = 0.7 * GB
# Measured peak activations over the formula's count (A above): the backward pass's transient gradients of the
# activations and the allocator's slack. Fitted on the small dimensions: 401 MB per sequence measured, A
# counts 287 MB.
ACTIVATION_FACTOR = 1.4
# The share of the available memory a run may plan to fill: the estimate is not exact, and the machine runs
# other things too.
HEADROOM = 0.9
MEMINFO = Path("/proc/meminfo")
# The dimensions of the hub configs the paper trains (google/mt5-base, google/mt5-large on the hub), for a plan
# on a machine that has not downloaded them.
HUB_DIMENSIONS = {
    "google/mt5-base": {"d": 768, "f": 2048, "n_enc": 12, "n_dec": 12, "h": 12, "k": 64, "V": 250112, "buckets": 32},
    "google/mt5-large": {"d": 1024, "f": 2816, "n_enc": 24, "n_dec": 24, "h": 16, "k": 64, "V": 250112,
                         "buckets": 32},
}
# The parts of a plan, as printed and written (bytes of one device).
PLAN_PARTS = ("weights", "gradients", "gradient_rows", "optimizer", "activations", "gathered", "runtime")


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts of the estimate in bytes of one device (see the module's docstring), and their sum."""
    runtime: float
    weights: float
    gradients: float
    gradient_rows: float
    optimizer: float
    activations: float
    gathered: float = 0.0  # fsdp: the unsharded parameters and gradients FSDP2 holds at a time

    @property
    def total(self) -> float:
        return (self.runtime + self.weights + self.gradients + self.gradient_rows + self.optimizer
                + self.activations + self.gathered)


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs of a model: P, the weight matrices' shapes and the vectors' entries (for
    Adafactor's factored state), the parameters of its largest block and of its root (all but the blocks)."""
    parameters: int
    matrices: list[tuple[int, int]]
    vectors: int
    block: int
    root: int


def model_dimensions(preset: Preset) -> dict[str, int] | None:
    """d_model, d_ff, layers, heads, d_kv, vocabulary and relative-position buckets of the preset's model, and
    whether the output layer is tied. A model named by its hub config (the paper preset) takes them from the
    config in the local cache; None when it is not there (nothing to estimate from before the download).
    A one-stack family (GPT-2, Llama, BERT) is estimated as a T5 of the same dimensions: a rough bound,
    not fitted to measurements."""
    m = preset.model
    dims = {"d": m.d_model, "f": m.d_ff, "n_enc": m.num_layers, "n_dec": m.num_decoder_layers, "h": m.num_heads,
            "k": m.d_kv, "V": preset.data.tokenizer.vocab_size, "buckets": m.relative_attention_num_buckets,
            "tied": int(m.tie_word_embeddings)}
    if m.hub_config:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(m.hub_config, local_files_only=True)
        except OSError:
            known = HUB_DIMENSIONS.get(m.hub_config)
            return None if known is None else {**dims, **known, "V": max(dims["V"], known["V"]), "tied": 0}
        dims.update(d=config.d_model, f=config.d_ff, n_enc=config.num_layers, n_dec=config.num_decoder_layers,
                    h=config.num_heads, k=config.d_kv, V=max(dims["V"], config.vocab_size),
                    buckets=config.relative_attention_num_buckets)
    return dims


def parameter_count(dims: dict[str, int]) -> tuple[int, list[tuple[int, int]], int]:
    """(P, the shapes of the weight matrices, the entries of the vectors) of a T5 v1.1 with a gated FFN:
    embedding and (untied) output layer V x d; per encoder block 4 attention matrices, 3 FFN
    matrices, 2 layer norms; per decoder block 8, 3 and 3; relative-position buckets x h in the first block
    of each stack; 2 final layer norms."""
    d, f, h, k, V = dims["d"], dims["f"], dims["h"], dims["k"], dims["V"]
    attention = [(d, h * k)] * 3 + [(h * k, d)]
    ffn = [(d, f), (d, f), (f, d)]
    embeddings = [(V, d)] if dims["tied"] else [(V, d), (d, V)]
    matrices = embeddings + (attention + ffn) * dims["n_enc"] + (attention * 2 + ffn) * dims["n_dec"]
    matrices += [(dims["buckets"], h)] * 2
    vectors = d * (2 * dims["n_enc"] + 3 * dims["n_dec"] + 2)
    return sum(r * c for r, c in matrices) + vectors, matrices, vectors


def model_shapes(preset: Preset, dims: dict[str, int]) -> Shapes:
    """The Shapes of the preset's model: T5 from its dimensions (parameter_count); a one-stack family from
    a model built on the meta device (shapes only)."""
    if preset.model.family == "t5":
        parameters, matrices, vectors = parameter_count(dims)
        d, f, hk = dims["d"], dims["f"], dims["h"] * dims["k"]
        encoder, decoder = 4 * d * hk + 3 * d * f + 2 * d, 8 * d * hk + 3 * d * f + 3 * d
        blocks = dims["n_enc"] * encoder + dims["n_dec"] * decoder
        return Shapes(parameters, matrices, vectors, max(encoder, decoder), parameters - blocks)
    import torch

    from common.families import get_family
    from common.modeling import build_model

    _, raw_length = lengths(preset)
    with torch.device("meta"):
        model = build_model(preset.model, dims["V"], raw_length)
    params = dict(model.named_parameters())  # tied parameters once
    first = get_family(preset.model.family).first_blocks[0]
    block = sum(p.numel() for name, p in params.items() if name.startswith(first + "."))
    total = sum(p.numel() for p in params.values())
    return Shapes(total, [tuple(p.shape) for p in params.values() if p.dim() == 2],
                  sum(p.numel() for p in params.values() if p.dim() == 1), block,
                  total - block * preset.model.num_layers)


def lengths(preset: Preset) -> tuple[int, int]:
    """(tokens per row a model reads, its targets): T5's inputs and span-corruption targets; a one-stack
    family reads the raw row (inputs plus targets before corruption) and predicts over it."""
    data = preset.data
    raw_length, target_length = compute_input_and_target_lengths(data.input_length, data.noise_density,
                                                                  data.mean_noise_span_length)
    if preset.model.family == "t5":
        return data.input_length, target_length
    return raw_length, raw_length


def activation_floats(dims: dict[str, int], input_length: int, target_length: int, one_stack: bool = False,
                      checkpointed: bool = False) -> int:
    """A of the module's docstring: the floats one sequence's forward pass keeps for its backward pass (a
    one-stack family: the encoder term over its row and the logits; with activation checkpointing: every
    block's input, one block's activations and the logits)."""
    d, f, h, k, V = dims["d"], dims["f"], dims["h"], dims["k"], dims["V"]
    le, ld = input_length, target_length
    encoder_block = le * (4 * d + 4 * h * k + h * le + 4 * f)
    decoder_block = 0 if one_stack else ld * (6 * d + 5 * h * k + h * (ld + le) + 4 * f)
    n_dec = 0 if one_stack else dims["n_dec"]
    logits = 3 * ld * V
    if checkpointed:
        return (dims["n_enc"] * le + n_dec * ld) * d + max(encoder_block, decoder_block) + logits
    if one_stack:
        return dims["n_enc"] * encoder_block + logits
    return (dims["n_enc"] * encoder_block + n_dec * decoder_block + 2 * n_dec * le * h * k + logits
            + h * le * (le + ld))


def tape_floats(dims: dict[str, int], input_length: int, target_length: int,
                one_stack: bool = False) -> tuple[int, int]:
    """(R, K) of the module's docstring: the floats per sequence of a per-sample tape's records outside the
    layer set "first" (the first block of each stack), and of what it holds for that layer set. A
    one-stack family counts as its encoder, as in activation_floats."""
    d, f, hk, V = dims["d"], dims["f"], dims["h"] * dims["k"], dims["V"]
    le, ld = input_length, target_length
    n_dec = 0 if one_stack else dims["n_dec"]
    encoder_layer = le * (8 * d + 4 * hk + 3 * f)
    decoder_layer = ld * (12 * d + 6 * hk + 3 * f) + 2 * le * hk
    tokens, targets = (le, le) if one_stack else (le + ld, ld)
    # embedding gradients and the final norms' inputs and gradients, the output layer's input and
    # gradient; the encoder's output, read by every cross-attention
    root = 3 * tokens * d + targets * (d + V) + (0 if one_stack else le * d)
    records = (dims["n_enc"] - 1) * encoder_layer + max(n_dec - 1, 0) * decoder_layer + root

    def held(matrices: list[tuple[int, int, int]]) -> int:  # (d_in, d_out, tokens) each
        return sum(a * b if t * (a + b) >= a * b else t * (a + b) for a, b, t in matrices)

    attention = lambda t: [(d, hk, t)] * 3 + [(hk, d, t)]  # noqa: E731
    ffn = lambda t: [(d, f, t), (d, f, t), (f, d, t)]  # noqa: E731
    first = held(attention(le) + ffn(le)) + 2 * d
    if not one_stack:
        cross = [(d, hk, ld), (d, hk, le), (d, hk, le), (hk, d, ld)]
        first += held(attention(ld) + cross + ffn(ld)) + 3 * d
    return records, first


def estimate_peak(preset: Preset, method: str, per: str = "microbatch", world_size: int = 1,
                  gpu: bool = False) -> MemoryEstimate | None:
    """The peak memory of one rank of `method` at `preset` (see the module's docstring), with its strategy
    (distributed.strategy), accumulation chunks and activation checkpointing; None when the model's
    dimensions are unknown (model_dimensions)."""
    cfg = preset.pretrain
    dims = model_dimensions(preset)
    if dims is None:
        return None
    shapes = model_shapes(preset, dims)
    parameters, matrices, vectors = shapes.parameters, shapes.matrices, shapes.vectors
    sharded = preset.distributed.strategy == "fsdp"
    share = world_size if sharded else 1  # what one rank holds of each sharded term
    microbatches = cfg.num_microbatches if sharded else cfg.num_microbatches // world_size
    sequences = cfg.batch_size // cfg.num_microbatches / share / cfg.microbatch_chunks  # per forward pass
    input_length, target_length = lengths(preset)
    bytes_per_activation = 2 if gpu and cfg.precision == "bf16" else 4
    # Only score-weighted steps keep gradient rows (per microbatch) or every microbatch's tape (per sample):
    # the baseline, Sequential, the oracle and the weight-matched control accumulate one gradient.
    scored = get_method(method).update == "scores"
    rows = microbatches if scored and per == "microbatch" else 0
    one_stack = preset.model.family != "t5"
    tapes = 0.0
    if scored and per == "sample":
        records, k_floats = tape_floats(dims, input_length, target_length, one_stack)
        tapes = 4 * sequences * (k_floats if sharded else cfg.microbatch_chunks * microbatches * (records + k_floats))
    optimizer = 4 * (sum(r + c for r, c in matrices) + vectors) if cfg.optimizer == "adafactor" else 8 * parameters
    activations = (ACTIVATION_FACTOR * bytes_per_activation * sequences
                   * activation_floats(dims, input_length, target_length, one_stack,
                                       cfg.activation_checkpointing) + tapes)
    gathered = 4 * (2 * shapes.root + 3 * shapes.block) if sharded else 0.0
    return MemoryEstimate(runtime=RUNTIME_BYTES, weights=4 * parameters / share, gradients=4 * parameters / share,
                          gradient_rows=4 * rows * parameters / share, optimizer=optimizer / share,
                          activations=activations, gathered=gathered)


def available_memory(gpu: bool) -> tuple[float | None, str]:
    """(bytes this run may use, the device in words): the GPU's free memory (this rank's, LOCAL_RANK), else
    the machine's MemAvailable (/proc/meminfo; None where there is no such file, e.g. macOS)."""
    if gpu:
        import torch

        index = int(os.environ.get("LOCAL_RANK", "0"))
        free, _ = torch.cuda.mem_get_info(index)
        return float(free), f"cuda:{index}, {torch.cuda.get_device_name(index)}"
    if not MEMINFO.is_file():
        return None, "cpu"
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024, "cpu"
    return None, "cpu"


def check_resources(preset: Preset, method: str, per: str = "microbatch", gpu: bool | None = None,
                    available: float | None = None) -> MemoryEstimate | None:
    """Refuse (ConfigError) a run that needs a GPU this machine lacks or more memory than it has, unless
    pretrain.memory_check is false. `gpu` and `available` default to the machine's (torch.cuda, and
    available_memory); ranks on one machine share its memory on a CPU (LOCAL_WORLD_SIZE of torchrun)."""
    cfg = preset.pretrain
    if not cfg.memory_check:
        return None
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    here = 1 if gpu else int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    name = preset_argument(preset.name)
    override = "or pass --set pretrain.memory_check=false to try anyway"
    needs_gpu = [setting for setting, on in (("precision bf16", cfg.precision == "bf16"), ("compile", cfg.compile))
                 if on]
    if needs_gpu and not gpu:
        raise ConfigError(f"preset {name}: pretrain.{' and pretrain.'.join(needs_gpu)} need a GPU, and torch finds "
                          f"none on this machine. Fix: use a GPU, or a preset for the CPU (tiny), {override} (on a "
                          "CPU in float32 and eager)")
    estimate = estimate_peak(preset, method, per, world, gpu)
    device = "cuda" if gpu else "cpu"
    if available is None:
        available, device = available_memory(gpu)
    if estimate is not None and available is not None and here * estimate.total > HEADROOM * available:
        processes = f" for {here} processes" if here > 1 else ""
        raise ConfigError(f"preset {name}: estimated peak memory {here * estimate.total / GB:.1f} GB{processes} > "
                          f"{HEADROOM * available / GB:.1f} GB available on this machine ({device}: {HEADROOM:.0%} of "
                          f"its {available / GB:.1f} GB free). Fix: use a GPU / a smaller preset, {override}")
    return estimate


def check_process_count(preset: Preset, world_size: int) -> None:
    """Refuse (ConfigError) a process count the strategy cannot share the batch by: replicate gives each
    rank whole microbatches, fsdp each rank its rows of every microbatch, in the accumulation chunks."""
    cfg = preset.pretrain
    rows, chunks = cfg.batch_size // cfg.num_microbatches, cfg.microbatch_chunks
    if preset.distributed.strategy == "fsdp" and rows % (world_size * chunks):
        raise ConfigError(f"distributed.strategy: fsdp shares every microbatch of {rows} rows among the {world_size} "
                          f"processes, in {chunks} chunks each. Fix: use a process count times "
                          "pretrain.microbatch_chunks that divides the microbatch size")
    if preset.distributed.strategy == "replicate" and cfg.num_microbatches % world_size:
        raise ConfigError(f"pretrain.num_microbatches: {cfg.num_microbatches} microbatches cannot be shared by "
                          f"{world_size} processes. Fix: use a process count that divides it, or --set "
                          "distributed.strategy=fsdp, which shares every microbatch among them")


PER_SAMPLE_CAUTION = ("  caution: per sample under fsdp the activations run low (2 processes, 4 microbatches "
                      "of 16 rows against 4 of 4: 466 MB more measured, 193 MB estimated); leave room beyond the "
                      "total")


def plan_memory(preset: Preset, method: str, per: str, world_size: int, device_bytes: float,
                gpu: bool = True) -> tuple[MemoryEstimate, str]:
    """(the estimate of one device, the plan in words: one line per part and the total against the device);
    ConfigError when it exceeds HEADROOM of `device_bytes`, naming the knobs that would make it fit."""
    check_process_count(preset, world_size)
    estimate = estimate_peak(preset, method, per, world_size, gpu)
    if estimate is None:
        raise ConfigError(f"model.hub_config: the dimensions of {preset.model.hub_config} are not in the local "
                          "cache. Fix: download its config once (transformers.AutoConfig.from_pretrained)")
    cfg = preset.pretrain
    lines = [f"memory plan of {method} (per {per}) at preset {preset_argument(preset.name)}: {world_size} "
             f"processes, strategy {preset.distributed.strategy}, {cfg.microbatch_chunks} chunks per microbatch, "
             f"activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}; GB per device"]
    lines += [f"  {part:<14}{getattr(estimate, part) / GB:8.2f}" for part in PLAN_PARTS]
    lines.append(f"  {'total':<14}{estimate.total / GB:8.2f} of {HEADROOM:.0%} of {device_bytes / GB:.0f} GB")
    if per == "sample" and preset.distributed.strategy == "fsdp":
        lines.append(PER_SAMPLE_CAUTION)
    if estimate.total > HEADROOM * device_bytes:
        raise ConfigError(f"preset {preset_argument(preset.name)}: the plan needs {estimate.total / GB:.1f} GB per "
                          f"device > {HEADROOM * device_bytes / GB:.1f} GB. Fix: "
                          f"{fitting_change(preset, method, per, world_size, device_bytes, gpu)}")
    return estimate, "\n".join(lines)


def fitting_change(preset: Preset, method: str, per: str, world_size: int, device_bytes: float,
                   gpu: bool = True) -> str:
    """The first knob setting that makes the plan fit, in the order that costs least: more accumulation
    chunks, activation checkpointing (per microbatch), the fsdp strategy (with chunks); else more devices."""
    cfg = preset.pretrain
    rows = cfg.batch_size // cfg.num_microbatches
    changes = [{"microbatch_chunks": c} for c in _powers_of_two(rows)]
    if per == "microbatch":
        changes += [{"activation_checkpointing": True, "microbatch_chunks": c} for c in _powers_of_two(rows)]
    if preset.distributed.strategy == "replicate":
        changes += [{"strategy": "fsdp", "microbatch_chunks": c} for c in _powers_of_two(rows // world_size)]
    for change in changes:
        strategy = change.get("strategy", preset.distributed.strategy)
        knobs = {k: v for k, v in change.items() if k != "strategy"}
        changed = dataclasses.replace(preset, pretrain=dataclasses.replace(cfg, **knobs),
                                      distributed=dataclasses.replace(preset.distributed, strategy=strategy))
        estimate = estimate_peak(changed, method, per, world_size, gpu)
        if estimate.total <= HEADROOM * device_bytes:
            sets = [f"--set distributed.strategy={strategy}"] if "strategy" in change else []
            sets += [f"--set pretrain.{k}={str(v).lower()}" for k, v in knobs.items()]
            return f"{' '.join(sets)} ({estimate.total / GB:.1f} GB per device)"
    return "more devices (--set distributed.strategy=fsdp shards the model over them), or a smaller model"


def _powers_of_two(rows: int) -> list[int]:
    """The chunk counts 2, 4, 8, ... that divide `rows`."""
    return [2 ** i for i in range(1, rows.bit_length()) if rows % 2 ** i == 0]

"""Will a pre-training run fit on this machine? Its peak memory is estimated from the preset before anything
starts and compared with what the machine has; a run that cannot fit, or that asks for a GPU the machine
lacks (bf16 autocast, torch.compile: both GPU-only in 03_pretrain), is refused with the estimate and the
override (pretrain.memory_check=false).

The estimate, in bytes, of one process (rank) training a model of P parameters with n microbatches per rank of
b sequences each (inputs of L_e tokens, targets of L_d), weights and gradients in float32:

    peak = RUNTIME + 4 P (weights) + 4 P (gradients) + 4 n P (PRESENCE per microbatch only: one gradient row
           per microbatch, all kept until the weights are known) + optimizer state
           + ACTIVATION_FACTOR * a * b * A (one microbatch's forward and backward) * (1 + TAPE_SHARE (n - 1)
             for per-sample PRESENCE, whose tapes of every microbatch stay until the weights are known)

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

How close it is, against peak resident set sizes (getrusage, one CPU thread; the constants were fitted on
these): whole `pretrain.py --preset tiny` runs of 60 steps (evaluation and checkpoints included), 0.73 and
0.75 GB estimated for the baseline and PRESENCE against 0.68 and 0.79 measured (+7%, -5%). Two optimizer steps
of random microbatches at the small preset's dimensions, by a script holding 0.47 GB after its imports (in
place of RUNTIME): the baseline with 2 and 8 sequences per microbatch 1.89 and 4.30 GB against 2.13 and 4.54
(-11%, -5%), PRESENCE with 2 microbatches of 8 4.91 against 4.78 (+3%), per-sample PRESENCE with 4 of 2 1.96
against 2.23 (-12%). The small preset itself (8 microbatches of 64 in fp32, as on a CPU) comes out at 29.5 GB:
on a 24 GB machine it was killed at 24 GB resident.
"""
from __future__ import annotations

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
# What per-sample PRESENCE keeps of each further microbatch, as a share of one microbatch's activations: its
# tape (module inputs and output-gradient edges, common/presence/per_sample_grads.py). Fitted on the small
# dimensions: 4 microbatches of 2 sequences peaked 72 MB above the baseline's 4 of 2.
TAPE_SHARE = 0.03
# The share of the available memory a run may plan to fill: the estimate is not exact, and the machine runs
# other things too.
HEADROOM = 0.9
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts of the estimate in bytes (see the module's docstring), and their sum."""
    runtime: float
    weights: float
    gradients: float
    gradient_rows: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return (self.runtime + self.weights + self.gradients + self.gradient_rows + self.optimizer
                + self.activations)


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
            return None
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


def activation_floats(dims: dict[str, int], input_length: int, target_length: int) -> int:
    """A of the module's docstring: the floats one sequence's forward pass keeps for its backward pass."""
    d, f, h, k, V = dims["d"], dims["f"], dims["h"], dims["k"], dims["V"]
    le, ld = input_length, target_length
    return (dims["n_enc"] * le * (4 * d + 4 * h * k + h * le + 4 * f)
            + dims["n_dec"] * ld * (6 * d + 5 * h * k + h * (ld + le) + 4 * f)
            + 2 * dims["n_dec"] * le * h * k + 3 * ld * V + h * le * (le + ld))


def estimate_peak(preset: Preset, method: str, per: str = "microbatch", world_size: int = 1,
                  gpu: bool = False) -> MemoryEstimate | None:
    """The peak memory of one rank of `method` at `preset` (see the module's docstring); None when the
    model's dimensions are unknown (model_dimensions)."""
    cfg, data = preset.pretrain, preset.data
    dims = model_dimensions(preset)
    if dims is None:
        return None
    parameters, matrices, vectors = parameter_count(dims)
    microbatches = cfg.num_microbatches // world_size
    sequences = cfg.batch_size // cfg.num_microbatches
    _, target_length = compute_input_and_target_lengths(data.input_length, data.noise_density,
                                                        data.mean_noise_span_length)
    bytes_per_activation = 2 if gpu and cfg.precision == "bf16" else 4
    # Only score-weighted steps keep gradient rows (per microbatch) or every microbatch's tape (per sample):
    # the baseline, Sequential, the oracle and the weight-matched control accumulate one gradient.
    scored = get_method(method).update == "scores"
    rows = microbatches if scored and per == "microbatch" else 0
    kept = 1 + TAPE_SHARE * (microbatches - 1) if scored and per == "sample" else 1
    optimizer = 4 * (sum(r + c for r, c in matrices) + vectors) if cfg.optimizer == "adafactor" else 8 * parameters
    activations = (ACTIVATION_FACTOR * bytes_per_activation * sequences * kept
                   * activation_floats(dims, data.input_length, target_length))
    return MemoryEstimate(runtime=RUNTIME_BYTES, weights=4 * parameters, gradients=4 * parameters,
                          gradient_rows=4 * rows * parameters, optimizer=optimizer, activations=activations)


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

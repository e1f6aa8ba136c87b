"""Cost of PRESENCE: time one training step's gradient, side by side, on the same model and batch.

Methods, timed round-robin (every repetition runs each once, so clock drift hits them alike), median:
  baseline              gradient accumulation over the microbatches (common.presence.presence_step.baseline_step)
  presence-microbatch   the paper's method: self-influence of each microbatch, softmax-weighted gradient
  presence-sample       the per-sample variant (one backward per microbatch, per-sample norms from hooks)
  naive-sample          the per-sample reference done naively: one forward/backward per sample into a
                        (B, P) buffer (the per-microbatch method with one-sample microbatches; the same
                        update as presence-sample here, where every sample has as many target tokens)
The optimizer update is left out (it is the same for every method). Peak memory is what a step needs on
top of the model's parameters (gradients, activations, buffers): on CUDA from the allocator's peak; on
the CPU from the peak resident size of a fresh process that runs the methods one after the other, with
glibc told to return freed blocks at once (MALLOC_MMAP_THRESHOLD_=4096; Linux only).

    python 03_pretrain/bench_si.py --preset tiny                  # CPU, ~1 min on 2 cores
    python 03_pretrain/bench_si.py --preset tiny --threads 1      # CPU shared with other jobs
    python 03_pretrain/bench_si.py --preset small --device cuda   # GPU, bf16 autocast; add --compile
Writes results/<preset>/bench/si_overhead.csv (or --out).
"""
from __future__ import annotations

import argparse
import gc
import json

import torch
from torch import nn

from common.benchmark import (benchmark_parser, can_measure_cpu_memory, fresh_process_json, peak_memory_mb, status_kb,
                              time_round_robin, write_benchmark_csv)
from common.cli import exit_on_known_errors
from common.config import load_preset
from common.modeling import build_model as build_fresh_model
from common.modeling import random_microbatches
from common.presence.methods import BASELINE
from common.presence.presence_step import baseline_step, presence_step, release_buffers
from common.seeding import seed_everything
from common.data.span_corruption import compute_input_and_target_lengths

TAU = 1.0  # any non-zero tau costs the same
COLUMNS = ["method", "step_ms", "ratio_to_baseline", "peak_mem_mb", "device", "preset", "cpu_time_ms", "batch_size",
           "n_microbatches", "microbatch_size", "input_length", "target_length", "vocab_size", "precision",
           "compiled", "repeats", "threads", "seed"]


def build_model(cfg, vocab_size: int, device: str) -> nn.Module:
    return build_fresh_model(cfg, vocab_size).to(device).train()


def methods(model, eager_model, microbatches, autocast_dtype):
    samples = [{k: v[j:j + 1] for k, v in mb.items()} for mb in microbatches for j in range(len(mb["labels"]))]
    return {
        BASELINE.name: lambda: baseline_step(model, microbatches, autocast_dtype),
        "presence-microbatch": lambda: presence_step(model, microbatches, TAU, per="microbatch",
                                                     autocast_dtype=autocast_dtype),
        # Hooks cannot see inside a compiled graph: the per-sample methods run the eager model.
        "presence-sample": lambda: presence_step(eager_model, microbatches, TAU, per="sample",
                                                 autocast_dtype=autocast_dtype),
        "naive-sample": lambda: naive_sample_step(eager_model, samples, autocast_dtype),
    }


def naive_sample_step(model, samples, autocast_dtype) -> None:
    presence_step(model, samples, TAU, per="microbatch", autocast_dtype=autocast_dtype)
    release_buffers(model)  # its (B, P) buffer (~80 GB at the small preset) must not stay beside the others


def naive_buffer_fits(batch_size: int, model: nn.Module, device: str) -> tuple[bool, str]:
    """The naive loop keeps one gradient per sample, B x P floats (small preset, batch 512: 157 GB, more
    than an H200 holds): does that fit in the free memory, with room left for the rest of the step?"""
    need = batch_size * sum(p.numel() * p.element_size() for p in model.parameters())
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else _available_ram_bytes()
    why = f"its per-sample gradient buffer needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free"
    return need <= 0.7 * free, why


def _available_ram_bytes() -> float:
    try:
        return status_kb("MemAvailable", "/proc/meminfo") * 1024.0
    except OSError:
        return float("inf")  # not Linux: let the loop try


def peak_memory_per_method(fns, model, device: str) -> dict[str, float]:
    """Peak memory of one step above the model's parameters (gradients, activations, buffers)."""
    def reset():
        for p in model.parameters():
            p.grad = None
        release_buffers(model)
        gc.collect()
    return {name: peak_memory_mb(fn, device, reset) for name, fn in fns.items()}


def main(preset_name: str = "tiny", overrides: list[str] | None = None, device: str | None = None,
         vocab_size: int | None = None, repeats: int = 10, naive_repeats: int = 3, warmup: int = 2,
         compile_model: bool = False, seed: int = 0, threads: int | None = None,
         memory_only: bool = False, out: str | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    preset = load_preset(preset_name, overrides)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vocab_size = vocab_size or preset.data.tokenizer.vocab_size
    batch_size, n_micro = preset.pretrain.batch_size, preset.pretrain.num_microbatches
    input_length = preset.data.input_length
    target_len = compute_input_and_target_lengths(input_length, preset.data.noise_density,
                                                  preset.data.mean_noise_span_length)[1]
    autocast_dtype = torch.bfloat16 if device == "cuda" else None

    seed_everything(seed)
    eager_model = build_model(preset.model, vocab_size, device)
    model = torch.compile(eager_model) if compile_model else eager_model
    microbatches = random_microbatches(batch_size, n_micro, input_length, target_len, vocab_size, device)
    fns = methods(model, eager_model, microbatches, autocast_dtype)
    fits, why = naive_buffer_fits(batch_size, eager_model, device)
    if not fits:
        print(f"naive-sample skipped: {why}. Fix: a smaller batch, e.g. --set pretrain.batch_size=256")
        del fns["naive-sample"]
    if memory_only:  # inside the fresh process started below
        peak = peak_memory_per_method(fns, eager_model, device)
        print(json.dumps(peak))
        return peak
    print(f"{preset_name} on {device}: {sum(p.numel() for p in eager_model.parameters()) / 1e6:.1f}M parameters, "
          f"batch {batch_size} = {n_micro} x {batch_size // n_micro}, {input_length} -> {target_len} tokens, "
          f"vocab {vocab_size}, {torch.get_num_threads()} threads")

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    step_ms, cpu_ms = time_round_robin(fns, repeats, device, slow={"naive-sample": naive_repeats})
    if device == "cuda":
        peak = peak_memory_per_method(fns, eager_model, device)
    elif can_measure_cpu_memory():
        argv = ["--preset", preset_name, "--device", device, "--vocab-size", str(vocab_size), "--seed", str(seed),
                "--threads", str(torch.get_num_threads())] + [f"--set={o}" for o in overrides or []]
        print("measuring peak memory in a fresh process ...")
        peak = fresh_process_json(__file__, argv + ["--memory-only"])
    else:
        peak = {}

    rows = []
    for name in fns:
        compiled = compile_model and name in (BASELINE.name, "presence-microbatch")
        rows.append({"method": name, "step_ms": round(step_ms[name], 2),
                     "ratio_to_baseline": round(step_ms[name] / step_ms[BASELINE.name], 3),
                     "peak_mem_mb": round(peak.get(name, float("nan")), 1),
                     "cpu_time_ms": round(cpu_ms[name], 2) if device == "cpu" else "", "device": device, "preset": preset_name,
                     "batch_size": batch_size, "n_microbatches": n_micro, "microbatch_size": batch_size // n_micro,
                     "input_length": input_length, "target_length": target_len, "vocab_size": vocab_size,
                     "precision": "bf16-autocast" if autocast_dtype else "fp32", "compiled": compiled,
                     "repeats": naive_repeats if name == "naive-sample" else repeats,
                     "threads": torch.get_num_threads(), "seed": seed})
    print(f"{'method':<22}{'step ms':>10}{'x baseline':>12}{'peak MB':>10}{'CPU ms':>10}{'x baseline':>12}")
    for row in rows:
        cpu_ratio = cpu_ms[row["method"]] / cpu_ms[BASELINE.name]
        print(f"{row['method']:<22}{row['step_ms']:>10.1f}{row['ratio_to_baseline']:>12.3f}{row['peak_mem_mb']:>10.1f}"
              f"{cpu_ms[row['method']]:>10.1f}{cpu_ratio:>12.3f}")
    naive_speedup = step_ms["naive-sample"] / step_ms["presence-sample"] if "naive-sample" in step_ms else None
    if naive_speedup:
        print(f"per-sample is {naive_speedup:.1f}x faster than the naive per-sample loop")
    path = write_benchmark_csv(rows, COLUMNS, out, preset_name, "si_overhead.csv")
    return {"rows": rows, "path": str(path), "naive_speedup": naive_speedup}


if __name__ == "__main__":
    parser = benchmark_parser(__doc__, "si_overhead.csv")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the preset tokenizer's")
    parser.add_argument("--naive-repeats", type=int, default=3, help="rounds that also time the slow naive loop")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (baseline, per-microbatch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # internal: the fresh process
    args = parser.parse_args()
    with exit_on_known_errors():
        main(args.preset, args.overrides, args.device, args.vocab_size, args.repeats, args.naive_repeats,
             args.warmup, args.compile, args.seed, args.threads, args.memory_only, args.out)

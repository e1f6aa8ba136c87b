"""Throughput of whole pre-training steps, the baseline and PRESENCE side by side in one run.

A step is exactly what 03_pretrain/pretrain.py runs (common/presence/train_step.py): forward and backward over
every microbatch, for PRESENCE the self-influence scores and the weighted update direction, then the
optimizer and learning-rate steps. Precision, compilation, optimizer and SI layer set come from the
preset, as in pretrain.py. Inputs are random token ids in the preset's shapes, so no data is needed. For each batch shape (microbatches x sequences each)
every repetition runs each method once (round-robin: clock drift hits both alike); medians are
reported with tokens/s (input + target tokens), model TFLOP/s (6 x parameters x tokens per stack,
common/modeling.py) and, on a GPU, MFU against the bf16 matmul rate measured on the same card in the same
run (common/benchmark.py).

    python 03_pretrain/bench_train.py --preset tiny                                    # CPU, ~1 min
    python 03_pretrain/bench_train.py --preset small --device cuda --shapes 8x32 8x64 2x64
Writes results/<preset>/bench/train_throughput.csv (or --out).
"""
from __future__ import annotations

import argparse

import torch

from common.cli import exit_on_known_errors
from common.benchmark import benchmark_parser, mfu_ceiling_tflops, time_round_robin, write_benchmark_csv
from common.config import load_preset
from common.modeling import build_model, model_flops_per_sequence, random_microbatches
from common.optim import build_optimizer
from common.presence.methods import BASELINE, PRESENCE
from common.presence.presence_step import StepPlan, release_buffers
from common.seeding import seed_everything
from common.data.span_corruption import compute_input_and_target_lengths
from common.presence.train_step import train_step

# The plain step and PRESENCE's (every non-zero temperature costs the same).
METHODS = {BASELINE.name: StepPlan(), PRESENCE.name: StepPlan("scores", tau=-1.0)}
COLUMNS = ["shape", "method", "step_ms", "ratio_to_baseline", "tokens_per_s", "model_tflops", "mfu",
           "matmul_ceiling_tflops",
           "peak_mem_gb", "first_step_s", "batch_size", "n_microbatches", "microbatch_size", "input_length",
           "target_length", "parameters", "optimizer", "precision", "compiled", "device", "device_name", "preset",
           "repeats", "threads", "seed"]


def parse_shape(text: str) -> tuple[int, int]:
    """'8x64' -> (8 microbatches, 64 sequences each)."""
    try:
        n, size = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected MICROBATCHESxSIZE, e.g. 8x64") from None
    if n < 1 or size < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: both numbers must be positive")
    return n, size


def bench_shape(preset, device: torch.device, repeats: int, warmup: int, seed: int) -> list[dict]:
    cfg = preset.pretrain
    n_micro, batch_size = cfg.num_microbatches, cfg.batch_size
    vocab_size = preset.data.tokenizer.vocab_size
    input_length = preset.data.input_length  # encoder inputs; the raw span the corruption starts from is longer
    target_length = compute_input_and_target_lengths(
        input_length, preset.data.noise_density, preset.data.mean_noise_span_length)[1]
    use_bf16 = cfg.precision == "bf16" and device.type == "cuda"
    compiled = cfg.compile and device.type == "cuda"
    torch._dynamo.reset()  # a new shape compiles afresh rather than turning the compiled graph dynamic
    seed_everything(seed)
    model = build_model(preset.model, vocab_size).to(device).train()
    step_model = torch.compile(model) if compiled else model
    optimizer, scheduler = build_optimizer(model, cfg)
    microbatches = random_microbatches(batch_size, n_micro, input_length, target_length, vocab_size, device)

    def run(plan):
        train_step(step_model, microbatches, plan, optimizer, scheduler, layers=cfg.si_layers,
                   autocast_dtype=torch.bfloat16 if use_bf16 else None, grad_clip=cfg.grad_clip)

    steps = {name: (lambda plan=plan: run(plan)) for name, plan in METHODS.items()}
    first_step_ms, _ = time_round_robin(steps, 1, device)  # the first call of each compiles (or warms caches)
    for _ in range(warmup):
        for step in steps.values():
            step()
    step_ms, _ = time_round_robin(steps, repeats, device)
    peak_gb = {}
    if device.type == "cuda":
        for name, step in steps.items():
            release_buffers(model)  # PRESENCE's gradient rows would otherwise count in the baseline's peak
            torch.cuda.reset_peak_memory_stats(device)
            step()
            peak_gb[name] = torch.cuda.max_memory_allocated(device) / 2**30

    flops_per_step = model_flops_per_sequence(model, input_length, target_length) * batch_size
    ceiling = mfu_ceiling_tflops(device)
    median = {name: ms / 1e3 for name, ms in step_ms.items()}
    rows = []
    for name in METHODS:
        tflops = flops_per_step / median[name] / 1e12
        rows.append({
            "shape": f"{n_micro}x{batch_size // n_micro}", "method": name, "step_ms": round(median[name] * 1e3, 2),
            "ratio_to_baseline": round(median[name] / median[BASELINE.name], 3),
            "tokens_per_s": round(batch_size * (input_length + target_length) / median[name]),
            "model_tflops": round(tflops, 3), "mfu": round(tflops / ceiling, 4) if ceiling else "",
            "matmul_ceiling_tflops": round(ceiling, 1) if ceiling else "",
            "peak_mem_gb": round(peak_gb[name], 2) if peak_gb else "", "first_step_s": round(first_step_ms[name] / 1e3, 1),
            "batch_size": batch_size, "n_microbatches": n_micro, "microbatch_size": batch_size // n_micro,
            "input_length": input_length, "target_length": target_length,
            "parameters": sum(p.numel() for p in model.parameters()), "optimizer": cfg.optimizer,
            "precision": "bf16-autocast" if use_bf16 else "fp32", "compiled": compiled, "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "preset": preset.name, "repeats": repeats, "threads": torch.get_num_threads(), "seed": seed})
    release_buffers(model)
    return rows


def main(preset_name: str = "tiny", overrides: list[str] | None = None, device: str | None = None,
         shapes: list[tuple[int, int]] | None = None, repeats: int = 10, warmup: int = 2, seed: int = 0,
         threads: int | None = None, out: str | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    overrides = list(overrides or [])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = load_preset(preset_name, overrides)
    preset_micro = preset.pretrain.num_microbatches
    shapes = shapes or [(preset_micro, preset.pretrain.batch_size // preset_micro)]
    rows = []
    for n_micro, size in shapes:
        # The shape is the batch (load_preset validates it, e.g. that the microbatches divide the batch): it
        # takes the place of the preset's, and of one given with --set, which load_preset would refuse twice.
        shape = {"pretrain.batch_size": n_micro * size, "pretrain.num_microbatches": n_micro}
        shaped = load_preset(preset_name, [o for o in overrides if o.split("=", 1)[0].strip() not in shape]
                             + [f"{key}={value}" for key, value in shape.items()])
        print(f"{preset_name} on {device}: {n_micro} x {size} sequences ...", flush=True)
        rows += bench_shape(shaped, device, repeats, warmup, seed)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"{'shape':<8}{'method':<10}{'step ms':>10}{'x baseline':>12}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}"
          f"{'peak GB':>9}{'1st s':>7}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] != "" else "-"
        peak = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] != "" else "-"
        print(f"{r['shape']:<8}{r['method']:<10}{r['step_ms']:>10.1f}{r['ratio_to_baseline']:>12.3f}"
              f"{r['tokens_per_s']:>12,}{r['model_tflops']:>10.2f}{mfu:>8}{peak:>9}{r['first_step_s']:>7.1f}")
    path = write_benchmark_csv(rows, COLUMNS, out, preset_name, "train_throughput.csv")
    return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
    parser = benchmark_parser(__doc__, "train_throughput.csv")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="NxSIZE",
                        help="batch shapes, microbatches x sequences each (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first (compiling) step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with exit_on_known_errors():
        main(args.preset, args.overrides, args.device, args.shapes, args.repeats, args.warmup, args.seed, args.threads,
             args.out)

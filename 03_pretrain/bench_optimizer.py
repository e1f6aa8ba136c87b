"""Cost of one optimizer step on the preset's model: Hugging Face's Adafactor, ours (common.adafactor, the
same update batched over same-shaped parameters) and torch's AdamW (fused on CUDA, foreach otherwise).

Random gradients; the optimizers are timed round-robin (every repetition runs each once), median. Ops per
step are the aten ops called from Python (not from inside another aten op) in one step, counted with the
profiler: on a GPU each is a kernel launch, and a foreach op is one kernel (on the CPU it loops inside). On
the CPU ours stacks at most 4 MB at a time (common.adafactor.STACK_ELEMENTS), so it counts more ops there
than on a GPU (small: 1,907 on the CPU, 267 with the GPU's limit, against HF's 5,428).

    python 03_pretrain/bench_optimizer.py --preset tiny                  # CPU, ~10 s
    python 03_pretrain/bench_optimizer.py --preset tiny --threads 1      # CPU shared with other jobs
    python 03_pretrain/bench_optimizer.py --preset small --repeats 5     # CPU, ~1 min (77M parameters)
    python 03_pretrain/bench_optimizer.py --preset small --device cuda
Writes results/<preset>/bench/optimizer.csv (or --out).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile
from transformers.optimization import Adafactor as HFAdafactor

from common.cli import exit_on_known_errors
from common.adafactor import Adafactor
from common.benchmark import benchmark_parser, time_round_robin, write_benchmark_csv
from common.config import load_preset
from common.modeling import build_model
from common.seeding import seed_everything

COLUMNS = ["optimizer", "step_ms", "ratio_to_hf_adafactor", "ops_per_step", "device", "preset", "parameters",
           "repeats", "threads"]
# common.optim's settings (T5X's)
ADAFACTOR = dict(lr=1e-2, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, scale_parameter=True)


def optimizers(params: list[torch.Tensor], device: str) -> dict[str, torch.optim.Optimizer]:
    adamw = "fused" if device == "cuda" else "foreach"
    return {"hf-adafactor": HFAdafactor(params, relative_step=False, warmup_init=False, **ADAFACTOR),
            "adafactor": Adafactor(params, **ADAFACTOR),
            f"adamw-{adamw}": torch.optim.AdamW(params, lr=1e-3, **{adamw: True})}


def aten_ops_per_step(optimizer) -> Counter:
    """The aten ops one step calls from Python (not from inside another aten op), by name: on a GPU each
    launches a kernel (a foreach op one), on the CPU foreach ops loop inside."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        optimizer.step()
    return Counter(e.name for e in prof.events()
                   if e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")))


def main(preset_name: str = "tiny", device: str = "cpu", repeats: int = 10, threads: int | None = None,
         seed: int = 0, overrides: list[str] | None = None, out: str | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    preset = load_preset(preset_name, overrides)
    seed_everything(seed)
    model = build_model(preset.model, preset.data.tokenizer.vocab_size).to(device)
    params = list(model.parameters())
    for p in params:  # the optimizers all step the same parameters; only their cost matters here
        p.grad = torch.randn_like(p)
    n_params = sum(p.numel() for p in params)
    print(f"{preset_name} on {device}: {n_params / 1e6:.1f}M parameters in {len(params)} tensors, "
          f"{torch.get_num_threads()} threads")

    opts = optimizers(params, device)
    for optimizer in opts.values():  # the first step allocates the states
        optimizer.step()
    step_ms, _ = time_round_robin({name: opt.step for name, opt in opts.items()}, repeats, device)
    ops = {name: aten_ops_per_step(optimizer).total() for name, optimizer in opts.items()}

    rows = [{"optimizer": name, "step_ms": round(step_ms[name], 2),
             "ratio_to_hf_adafactor": round(step_ms[name] / step_ms["hf-adafactor"], 3), "ops_per_step": ops[name],
             "device": device, "preset": preset_name, "parameters": n_params, "repeats": repeats,
             "threads": torch.get_num_threads()} for name in opts]
    print(f"{'optimizer':<16}{'step ms':>10}{'x HF':>8}{'ops/step':>10}{'x HF':>8}")
    for row in rows:
        print(f"{row['optimizer']:<16}{row['step_ms']:>10.1f}{row['ratio_to_hf_adafactor']:>8.3f}"
              f"{row['ops_per_step']:>10}{row['ops_per_step'] / ops['hf-adafactor']:>8.3f}")
    path = write_benchmark_csv(rows, COLUMNS, out, preset_name, "optimizer.csv")
    return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
    args = benchmark_parser(__doc__, "optimizer.csv", device_default="cpu").parse_args()
    with exit_on_known_errors():
        main(args.preset, args.device, args.repeats, args.threads, overrides=args.overrides, out=args.out)

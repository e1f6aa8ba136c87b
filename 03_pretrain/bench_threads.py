"""Thread settings on a shared CPU: the tiny PRESENCE training step on idle cores and beside one competing
CPU-bound process (a busy loop this script starts), for 1 and 2 threads and OpenMP's default and passive
wait policies; each setting in a fresh process (the thread count and wait policy are fixed at start-up).

    python 03_pretrain/bench_threads.py --preset tiny       # ~2 min on 2 cores; run it on otherwise idle cores

Prints each setting's median step time and its ratio to the fastest idle setting. Writes
results/<preset>/bench/threads.csv (or --out). common/threads.py's default comes from this.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

import torch

from common.benchmark import benchmark_parser, write_benchmark_csv
from common.cli import exit_on_known_errors
from common.config import load_preset
from common.modeling import build_model, random_microbatches
from common.optim import build_optimizer
from common.paths import REPO_ROOT
from common.presence.methods import PRESENCE, Knobs, Recipe
from common.presence.train_step import train_step
from common.seeding import seed_everything
from common.data.span_corruption import compute_input_and_target_lengths

COLUMNS = ["threads", "wait_policy", "competing_process", "step_s", "ratio_to_idle_best", "cores", "preset", "repeats"]
SETTINGS = [(threads, policy) for threads in (1, 2) for policy in ("default", "passive")]


def step_seconds(preset_name: str, repeats: int, overrides: list[str]) -> float:
    """Median seconds of one PRESENCE step (the first two steps excluded) in this process."""
    preset = load_preset(preset_name, overrides)
    cfg = preset.pretrain
    seed_everything(0)
    model = build_model(preset.model, preset.data.tokenizer.vocab_size).train()
    optimizer, scheduler = build_optimizer(model, cfg)
    target_length = compute_input_and_target_lengths(preset.data.input_length, preset.data.noise_density,
                                                      preset.data.mean_noise_span_length)[1]
    microbatches = random_microbatches(cfg.batch_size, cfg.num_microbatches, preset.data.input_length, target_length,
                                       preset.data.tokenizer.vocab_size, torch.device("cpu"))
    recipe = Recipe.of(PRESENCE, "microbatch", 0, Knobs(cfg.tau_direct, cfg.tau_inverse, cfg.switch_step, cfg.steps))
    times = []
    for step in range(1, repeats + 3):
        start = time.perf_counter()
        train_step(model, microbatches, recipe.plan(step), optimizer, scheduler, layers=cfg.si_layers)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def busy_loop() -> None:
    while True:
        pass


def main(preset_name: str = "tiny", repeats: int = 10, overrides: list[str] | None = None, out: str | None = None):
    overrides = overrides or []
    rows = []
    for competing in (False, True):
        rival = multiprocessing.Process(target=busy_loop, daemon=True) if competing else None
        if rival:
            rival.start()
        try:
            for threads, policy in SETTINGS:
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}
                env.pop("OMP_WAIT_POLICY", None)
                if policy == "passive":
                    env["OMP_WAIT_POLICY"] = "PASSIVE"
                child = subprocess.run([sys.executable, __file__, "--child", "--preset", preset_name, "--repeats",
                                        str(repeats)] + [f"--set={o}" for o in overrides],
                                       env=env, capture_output=True, text=True, check=True)
                rows.append({"threads": threads, "wait_policy": policy, "competing_process": competing,
                             "step_s": round(json.loads(child.stdout.splitlines()[-1]), 4),
                             "cores": os.cpu_count(), "preset": preset_name, "repeats": repeats})
        finally:
            if rival:
                rival.terminate()
    best = min(r["step_s"] for r in rows if not r["competing_process"])
    print(f"{'threads':>8} {'wait policy':>12} {'competing':>10} {'s/step':>8} {'x idle best':>12}")
    for row in rows:
        row["ratio_to_idle_best"] = round(row["step_s"] / best, 2)
        print(f"{row['threads']:>8} {row['wait_policy']:>12} {str(row['competing_process']):>10} "
              f"{row['step_s']:>8.3f} {row['ratio_to_idle_best']:>12.2f}")
    path = write_benchmark_csv(rows, COLUMNS, out, load_preset(preset_name).name, "threads.csv")
    return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
    parser = benchmark_parser(__doc__, "threads.csv", device_default="cpu")
    parser.add_argument("--child", action="store_true", help="internal: time one setting in this process")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(step_seconds(args.preset, args.repeats, args.overrides)))
    else:
        with exit_on_known_errors():
            main(args.preset, args.repeats, args.overrides, args.out)

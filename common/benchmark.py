"""Timing for the benchmarks of 03_pretrain: every repetition runs each variant once (round-robin), so
clock drift, thermal state and other jobs hit all variants alike, and medians are reported."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from tqdm import trange


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a host clock around a call times the call."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device | str,
                     slow: dict[str, int] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall-clock and process-CPU milliseconds per call of each function. `slow` caps the
    repetitions of expensive variants (name -> repetitions). The CPU time (all threads of this process)
    is what to compare when other jobs share the cores."""
    slow = slow or {}
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for rep in trange(repeats, desc="timing (round-robin)", leave=False):
        for name, fn in fns.items():
            if rep >= slow.get(name, repeats):
                continue
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    median_ms = lambda samples: {name: statistics.median(t) * 1e3 for name, t in samples.items()}  # noqa: E731
    return median_ms(wall), median_ms(cpu)

"""Timing for the benchmarks of 03_pretrain: every repetition runs each variant once (round-robin), so
clock drift, thermal state and other jobs hit all variants alike, and medians are reported. And the
denominator of MFU, measured on the card itself in the same run."""
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


def matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, size: int = 8192,
                  repeats: int = 10) -> float:
    """The dense-matmul rate the device reaches, in TFLOP/s: the fastest of `repeats` timed products of two
    size x size matrices in `dtype` (2 size^3 FLOPs each), after one untimed warm-up product."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e12


def mfu_ceiling_tflops(device: torch.device | str) -> float | None:
    """The MFU denominator: the bf16 matmul rate measured on this GPU now (a card's datasheet peak is not
    what it sustains, and clocks differ between cards of one model), or None on the CPU, where MFU is not
    reported."""
    return matmul_tflops(device) if torch.device(device).type == "cuda" else None

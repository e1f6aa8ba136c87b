"""Timing and peak memory for the benchmarks of 03_pretrain.

Timing: every repetition runs each variant once (round-robin), so clock drift, thermal state and other
jobs hit all variants alike, and medians are reported. And the denominator of MFU, measured on the card
itself in the same run.

Peak memory of one call, above what was allocated before it: on CUDA from the allocator's peak; on the
CPU from the peak resident size (VmHWM, Linux), which follows the live tensors only in a process whose
glibc serves every block >= 4 KiB with mmap and returns it on free (`fresh_process_json` starts such a
process; the benchmark scripts re-run themselves in it with an internal flag).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import trange

from common.io import write_csv
from common.paths import REPO_ROOT, results_dir

# glibc: mmap (and unmap on free) every block of 4 KiB or more, and never keep freed memory for reuse
FRESH_PROCESS_ENV = {"MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0"}


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a host clock around a call times the call."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def round_robin_seconds(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device | str,
                        slow: dict[str, int] | None = None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process-CPU seconds of every call, per function and round: each round calls every
    function once, in order. `slow` caps the rounds of expensive variants (name -> rounds). The CPU time
    (all threads of this process) is what to compare when other jobs share the cores."""
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
    return wall, cpu


def median_ms(seconds: dict[str, list[float]]) -> dict[str, float]:
    """The median of each function's calls (round_robin_seconds), in milliseconds."""
    return {name: statistics.median(t) * 1e3 for name, t in seconds.items()}


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device | str,
                     slow: dict[str, int] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall-clock and process-CPU milliseconds per call of each function (round_robin_seconds)."""
    wall, cpu = round_robin_seconds(fns, repeats, device, slow)
    return median_ms(wall), median_ms(cpu)


def paired_ratio_quartiles(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile over rounds of numerator[i] / denominator[i]: the times of
    two variants in the same round share that round's load, which their ratio cancels."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("paired ratios need the same, non-zero number of rounds on both sides")
    ratios = [a / b for a, b in zip(numerator, denominator)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, median, q3


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


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str,
                   reset: Callable[[], None] | None = None) -> float:
    """Peak memory of one call of `fn` above what was allocated just before it, measured on the second
    call (the first allocates lazily initialised library state); `reset` runs between the two calls to
    free what the first left behind (gradients, buffers). On the CPU, meaningful in a fresh process
    started by `fresh_process_json`."""
    fn()
    if reset is not None:
        reset()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM) to the current one
    fn()
    return (status_kb("VmHWM") - before) / 2**10


def status_kb(field: str, path: str = "/proc/self/status") -> int:
    """A "Name: N kB" field of a /proc file (VmRSS, VmHWM of this process; MemAvailable of /proc/meminfo)."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in {path}")


def can_measure_cpu_memory() -> bool:
    """The CPU peak needs Linux's /proc/self/clear_refs (elsewhere the peaks are reported as NaN)."""
    return os.path.exists("/proc/self/clear_refs")


def fresh_process_json(script: str, argv: list[str]):
    """Run `python script argv` in a fresh process with FRESH_PROCESS_ENV and the repository on the
    path, and return the JSON value its last line of output prints."""
    env = dict(os.environ, **FRESH_PROCESS_ENV,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.run([sys.executable, script, *argv], env=env, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"the fresh process {script} {' '.join(argv)} failed:\n{child.stderr[-2000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def benchmark_parser(description: str, csv_name: str, device_default: str | None = None,
                     repeats: int = 10) -> argparse.ArgumentParser:
    """The options every benchmark takes: --preset, --set, --device, --repeats, --threads, --out."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--device", choices=["cpu", "cuda"], default=device_default,
                   help=f"default: {device_default or 'cuda if available'}")
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds (median)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); use 1 when other jobs share the cores, since "
                        "oversubscribed OpenMP threads make small matmuls tens of times slower")
    p.add_argument("--out", default=None, help=f"CSV path (default results/<preset>/bench/{csv_name})")
    return p


def write_benchmark_csv(rows: list[dict], columns: list[str], out: str | None, preset_name: str, csv_name: str) -> Path:
    """The benchmark's rows to --out, or results/<preset>/bench/<csv_name>; returns the path."""
    path = Path(out) if out else results_dir(preset_name, "bench") / csv_name
    write_csv(path, rows, columns)
    print(f"wrote {path}")
    return path

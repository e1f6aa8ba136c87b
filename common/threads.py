"""CPU threads that hold up on a shared machine.

torch starts one OpenMP thread per core, and OpenMP threads spin while they wait for each other. When
another CPU-bound process shares the cores, a thread that loses its core stalls the others at every
parallel region, and the small matmuls of the tiny model run tens of times slower (results/tiny/bench/
threads.csv, made by 03_pretrain/bench_threads.py). Leaving one core to whatever shares the machine costs
a little on idle cores and keeps a step within a small factor of its idle time when another job runs.
An explicit OMP_NUM_THREADS (pretrain_all.py --jobs sets it) always wins.
"""
from __future__ import annotations

import os

import torch


def default_cpu_threads(cores: int | None = None) -> int:
    """One thread per core but one (at least one)."""
    cores = cores if cores is not None else os.cpu_count() or 1
    return max(1, cores - 1)


def set_cpu_threads(device: torch.device | str = "cpu") -> int:
    """On the CPU, without OMP_NUM_THREADS in the environment, use default_cpu_threads(); returns the
    thread count in force. On a GPU the host threads only feed the device: left as torch has them."""
    if torch.device(device).type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_cpu_threads())
    return torch.get_num_threads()

"""CPU threads that hold up on a shared machine.

torch starts one OpenMP thread per core, and OpenMP threads spin while they wait for each other. When
another CPU-bound process shares the cores, a thread that loses its core stalls the others at every
parallel region. On 2 cores (results/tiny/bench/threads.csv, made by 03_pretrain/bench_threads.py), a tiny
PRESENCE step with 2 threads took 0.32 s on idle cores and 1.29 s (4.0x) beside one busy loop; with 1
thread 0.31 s and 0.34 s (1.09x). One thread per core but one therefore costs nothing measurable at tiny
on idle cores and keeps a step near its idle time when another job runs. (OMP_WAIT_POLICY=PASSIVE helps 2
threads beside a busy loop, 0.46 s, but slows them on idle cores, 0.43 s, so it is not the default.)
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

"""The collectives the training step needs; without an initialised torch.distributed process group they
are the identity, so the same code runs on one process (the caller starts ranks with torchrun: nccl on
GPU, gloo on CPU)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order; all ranks must pass the same shape."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum of `tensor` over all ranks."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s parameters and buffers (call once after building the model, since the
    training step reduces gradients itself instead of wrapping the model in DistributedDataParallel)."""
    if is_distributed():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=src)

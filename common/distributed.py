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


# ---- the fsdp strategy: PyTorch FSDP2 ------------------------------------------------------------------------

def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or the module behind torch.compile's wrapper) was sharded by `shard_model`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def shard_model(model: nn.Module, block_lists: tuple[str, ...], device: torch.device) -> nn.Module:
    """Shard `model` in place with FSDP2 (torch.distributed.fsdp.fully_shard) over all ranks: every block of
    the module lists named by `block_lists` (e.g. "encoder.block") is its own unit, gathered for its forward
    and backward only, and the root holds the rest (embeddings, output layer, final norms). Parameters become
    DTensors sharded on dim 0 under their own names; build the optimizer after this."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    for name in block_lists:
        for block in model.get_submodule(name):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of `model` back in its sharded state. A forward without a backward (evaluation)
    leaves the root's parameters gathered, and model.parameters() would then return gathered stand-ins
    whose storage FSDP2 frees at the next reshard: read after that, they crash the process."""
    from torch.distributed.fsdp import FSDPModule

    for module in getattr(model, "_orig_mod", model).modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def block_lists(first_blocks: tuple[str, ...]) -> tuple[str, ...]:
    """The module lists that hold a family's blocks, from its first blocks' names ("encoder.block.0" ->
    "encoder.block")."""
    return tuple(name.rsplit(".", 1)[0] for name in first_blocks)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def rank_rows(rows: int) -> slice:
    """The contiguous share of `rows` rows this rank runs when every rank shares every microbatch (the fsdp
    strategy); rows must divide by the world size."""
    if rows % world_size():
        raise ValueError(f"{rows} rows cannot be shared by {world_size()} processes")
    part = rows // world_size()
    return slice(rank() * part, (rank() + 1) * part)


def barrier() -> None:
    if is_distributed():
        dist.barrier()

"""Checkpoints that survive interruption, resume a run exactly, and never keep a poisoned state.

A checkpoint is a folder `step-<N>/` holding the model in Hugging Face format (`save_pretrained`,
loadable by `from_pretrained`) and `trainer_state.pt` (optimizer, scheduler, every RNG state and the
data position). Parameters that are not all finite are refused before anything is written. It is
written under a temporary name and renamed into place; only then is the `LATEST` pointer replaced
(atomically). An interruption at any moment therefore leaves `LATEST` naming a complete checkpoint.

The checkpoint before it is kept until the new one is verified, i.e. until the training step after it
has run with a finite loss and update (`confirm_checkpoint`, which points `VERIFIED` at it and drops the
others). If that step is not finite, the new checkpoint is suspect, since it led straight to a blow-up
(parameters can be finite and already huge): `roll_back_checkpoint` drops it and points `LATEST` back at
the verified one.

A checkpoint damaged on disk afterwards (a truncated file: a full disk, a copy cut short) is found before
anything is loaded from it: `latest_checkpoint` then says which it skips and why, and falls back to the
newest intact checkpoint (pointing LATEST at it), or refuses with the fix when none is left.

Models for later stages (snapshots, the final model) are written the same way by save_model_folder.

A model sharded by FSDP2 (the fsdp strategy) is checkpointed sharded: `shards/` holds the model and the
optimizer state as torch.distributed.checkpoint writes them (each rank its own shards, one `.metadata`
file), beside the same trainer_state.pt (rank 0's RNG states: every rank draws the same). Every rank
calls save_checkpoint and load_checkpoint (collectives); rank 0 writes the rest and moves the pointers, so
the folder must be shared by all ranks (one machine, or a shared file system). torch.distributed.checkpoint
reshards on load, so a run may resume onto another number of processes; the final model and snapshots are
gathered into ordinary Hugging Face folders."""
from __future__ import annotations

import contextlib
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model

from common.distributed import all_reduce_sum_, barrier, is_sharded, local_part, rank, world_size
from common.io import atomic_open, write_json
from common.modeling import all_finite, unreadable_weights

POINTER = "LATEST"
VERIFIED = "VERIFIED"
STATE_FILE = "trainer_state.pt"
SHARDS = "shards"  # a sharded model's and optimizer's files (torch.distributed.checkpoint)


class CheckpointError(ValueError):
    """No checkpoint of a run can be read; the message names the damaged files and the fix."""


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def check_finite(model, what: str) -> None:
    """Raise FloatingPointError, naming `what` (the folder that would have been written), if a parameter of
    `model` is not finite (common.modeling.all_finite: NaN, inf, or a norm that overflows); a sharded model's
    ranks check their shards and agree, so that all of them raise or none."""
    shards = [local_part(p) for p in model.parameters()]
    finite = all_finite(shards)
    if is_sharded(model):
        finite = all_reduce_sum_(finite.to(torch.float64).reshape(1)).item() == world_size()
    if finite:
        return
    bad = [name for name, p in model.named_parameters() if not all_finite([local_part(p)])]
    raise FloatingPointError(f"{what} not written: {len(bad)} parameter tensors are not finite "
                             f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, extra: dict[str, Any]) -> Path:
    """Write checkpoint `step` under `root` and point LATEST at it; of the older ones only the verified
    one stays. Raises FloatingPointError for non-finite parameters and OSError (naming the folder, with
    LATEST unchanged) when the disk refuses the write."""
    root = Path(root)
    final = root / f"step-{step}"
    check_finite(model, f"checkpoint {final}")
    tmp = root / f".step-{step}.tmp"
    if is_sharded(model):
        return _save_sharded(root, step, (model, optimizer, scheduler), extra)
    with _writing(tmp, final):
        model.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_states(), "extra": extra}, tmp / STATE_FILE)
    return _publish(root, tmp, final)


def _publish(root: Path, tmp: Path, final: Path) -> Path:
    """Move a written checkpoint into place, point LATEST at it and drop the older unverified ones."""
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _point(root, POINTER, final.name)
    _drop_all_but(root, {final.name, _read_pointer(root, VERIFIED)})
    return final


def save_model_folder(folder: str | Path, model, tokenizer, info: dict[str, Any]) -> None:
    """A model for later stages (a snapshot, the final model): Hugging Face files, the tokenizer and
    presence_run.json (`info`), appearing all at once; refused like a checkpoint when not finite."""
    folder = Path(folder)
    check_finite(model, str(folder))
    state = full_state_dict(model) if is_sharded(model) else None
    if rank() != 0:
        return
    tmp = folder.with_name(f".{folder.name}.tmp")
    with _writing(tmp, folder):
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "presence_run.json", info)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def confirm_checkpoint(root: str | Path) -> None:
    """The step after LATEST ran with a finite loss and update: LATEST is verified, the others go."""
    root = Path(root)
    latest = _read_pointer(root, POINTER)
    if latest is not None:
        _point(root, VERIFIED, latest)
        _drop_all_but(root, {latest})


def roll_back_checkpoint(root: str | Path) -> tuple[str | None, str | None]:
    """The step after LATEST was not finite. An unverified LATEST is dropped and LATEST points back at the
    verified checkpoint (removed when there is none). Returns (dropped, now latest) folder names."""
    root = Path(root)
    latest, verified = _read_pointer(root, POINTER), _read_pointer(root, VERIFIED)
    if latest is None or latest == verified:
        return None, latest
    if verified is None:
        (root / POINTER).unlink()
    else:
        _point(root, POINTER, verified)
    shutil.rmtree(root / latest, ignore_errors=True)
    return latest, verified


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint to resume from: LATEST's, when its files are intact; else the newest intact one (a line
    says which was skipped and why, and LATEST points at the one used). None before the first checkpoint;
    CheckpointError when no checkpoint is intact."""
    root = Path(root)
    latest = _read_pointer(root, POINTER)
    if latest is None:
        return None
    path = root / latest
    problems = checkpoint_problems(path)
    if not problems:
        return path
    intact = [p for p in sorted(root.glob("step-*"), key=checkpoint_step, reverse=True)
              if p.name != latest and not checkpoint_problems(p)]
    if not intact:
        raise CheckpointError(f"{problems[0]}: checkpoint {path} is damaged and the run has no other. Fix: start "
                              "the run anew (--overwrite instead of --resume)")
    print(f"checkpoint {path} skipped: {'; '.join(problems)}; using {intact[0]}, the newest intact checkpoint")
    _point(root, POINTER, intact[0].name)
    return intact[0]


def checkpoint_problems(path: str | Path) -> list[str]:
    """What keeps a checkpoint folder from loading, one sentence per file (empty: intact): the weights'
    safetensors headers against their files (common.modeling.unreadable_weights) and trainer_state.pt's
    zip directory, which torch.save writes last, so that a truncated file lacks it. No tensor is read."""
    path = Path(path)
    if (path / SHARDS).is_dir():
        problems = [] if (path / SHARDS / ".metadata").is_file() else [f"{path / SHARDS / '.metadata'} is missing"]
    else:
        problems = unreadable_weights(path)
    state = path / STATE_FILE
    if not state.is_file():
        problems.append(f"{state} is missing")
    elif not zipfile.is_zipfile(state):
        problems.append(f"{state} is not a complete torch.save file (truncated?)")
    return problems


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint folder (step-<N>) was saved at."""
    return int(Path(path).name.split("-", 1)[1])


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> tuple[int, dict[str, Any]]:
    """Restore model weights, optimizer, scheduler and RNG states; returns (step, extra). A sharded model
    loads a sharded checkpoint, on any number of ranks (every rank calls this)."""
    path = Path(path)
    if is_sharded(model) != (path / SHARDS).is_dir():
        kinds = ("sharded (distributed.strategy fsdp)", "whole (distributed.strategy replicate)")
        raise CheckpointError(f"checkpoint {path} is {kinds[not (path / SHARDS).is_dir()]} but the model is "
                              f"{kinds[not is_sharded(model)].split(' (')[0]}. Fix: resume with the strategy "
                              "the run was trained with")
    if is_sharded(model):
        _load_sharded(path / SHARDS, model, optimizer)
    else:
        load_model(model, path / "model.safetensors")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if not is_sharded(model):
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"])
    return state["step"], state["extra"]


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict, gathered onto rank 0's CPU (empty on the other ranks; every rank
    calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_sharded(root: Path, step: int, trainer: tuple, extra: dict[str, Any]) -> Path:
    """save_checkpoint of a sharded model: every rank writes its shards into the temporary folder, then rank
    0 adds trainer_state.pt and publishes it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer, scheduler = trainer
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / SHARDS)
    except Exception as err:  # dcp gathers every rank's failure (a full disk) into one CheckpointException
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"writing {final} failed ({err}); nothing of it was kept") from err
    if rank() == 0:
        try:
            torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_states(), "extra": extra,
                        "world_size": world_size()}, tmp / STATE_FILE)
        except (OSError, RuntimeError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"writing {final} failed ({err}); nothing of it was kept") from err
        _publish(root, tmp, final)
    barrier()
    return final


def _load_sharded(shards: Path, model, optimizer) -> None:
    """The model's and the optimizer's shards, resharded for this run's ranks. Before reading, the state dict
    helpers give a fresh optimizer its state's shapes with one step of zero gradients at learning rate 0,
    which changes no parameter; every value is then replaced by the checkpoint's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=shards)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


@contextlib.contextmanager
def _writing(tmp: Path, target: Path) -> Iterator[None]:
    """Write into the fresh folder `tmp` (destined for `target`); on failure remove it and raise OSError
    naming `target` (safetensors and torch.save report a full disk without a path)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"writing {target} failed ({err}); nothing of it was kept") from err


def _read_pointer(root: Path, name: str) -> str | None:
    pointer = root / name
    return pointer.read_text().strip() if pointer.is_file() else None


def _point(root: Path, name: str, target: str) -> None:
    with atomic_open(root / name) as f:
        f.write(target)


def _drop_all_but(root: Path, keep: set[str | None]) -> None:
    for old in root.glob("step-*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)

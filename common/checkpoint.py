"""Checkpoints that survive interruption and resume a run exactly.

A checkpoint is a folder `step-<N>/` holding the model in Hugging Face format (`save_pretrained`,
loadable by `from_pretrained`) and `trainer_state.pt` (optimizer, scheduler, every RNG state and the
data position). It is written under a temporary name and renamed into place; only then is the
`LATEST` pointer replaced (atomically), and only then are older checkpoints removed. An interruption
at any moment therefore leaves `LATEST` naming a complete checkpoint."""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model

from common.io import atomic_open

POINTER = "LATEST"
STATE_FILE = "trainer_state.pt"


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


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, extra: dict[str, Any]) -> Path:
    """Write checkpoint `step` under `root`, point LATEST at it, then drop the older ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_states(), "extra": extra}, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    with atomic_open(root / POINTER) as f:
        f.write(final.name)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    pointer = Path(root) / POINTER
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which is incomplete. Fix: delete {root} and restart the run")
    return path


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> tuple[int, dict[str, Any]]:
    """Restore model weights, optimizer, scheduler and RNG states; returns (step, extra)."""
    path = Path(path)
    load_model(model, path / "model.safetensors")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"])
    return state["step"], state["extra"]

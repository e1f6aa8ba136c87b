"""Run folders: every run writes its resolved config, its environment and its metrics into a folder
of its own, and never silently replaces another run's folder. A run's heavy store (checkpoints) is bound
to its folder and locked while a process works on it."""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from common.io import read_json, write_json
from common.paths import REPO_ROOT, RESULTS_DIR

LOCK_FILE = "run.lock"
OWNER_FILE = "owner.json"

PACKAGES = ("torch", "transformers", "sentencepiece", "tokenizers", "numpy", "datasets")


class RunExistsError(FileExistsError):
    pass


def prepare_run_dir(path: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Create the run folder. An existing, non-empty folder is an error unless the caller resumes it
    (then it must exist) or explicitly asks to overwrite."""
    path = Path(path)
    exists = path.is_dir() and any(path.iterdir())
    if resume and not exists:
        raise FileNotFoundError(f"cannot resume: {path} holds no run. Fix: drop --resume to start a new run")
    if exists and not (resume or overwrite):
        raise RunExistsError(
            f"{path} already holds a run. Fix: pass --resume to continue it, --overwrite to replace it"
            f"{committed_note(path)}, or choose another run name (--run-name)"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


# How a changed knob shows in a default run name (others: the field's name and value).
NAME_PARTS = {"pretrain.switch_step": "I{}", "pretrain.si_layers": "si-{}", "pretrain.steps": "steps{}"}


def run_name(method: str, seed: int, tau: float | None = None, per: str = "microbatch", noise_rate: float = 0.0,
             changes: dict[str, object] | None = None) -> str:
    """A run's default name: the method, its --tau, I, per-sample, the layer set, the noise rate, then every
    other recipe field that differs from the preset's own ({"pretrain.steps": 30}, sorted), then the seed:
    presence-single-tau+2-s0, presence-I50-per-sample-s0, presence-steps30-s0. 03_pretrain/pretrain.py names
    new runs so, and the tables find a recipe's standard run by it."""
    changes = dict(changes or {})
    parts = [method] + ([f"tau{tau:+g}"] if tau is not None else [])
    if "pretrain.switch_step" in changes:
        parts.append(NAME_PARTS["pretrain.switch_step"].format(changes.pop("pretrain.switch_step")))
    if per == "sample":
        parts.append("per-sample")
    if "pretrain.si_layers" in changes:
        parts.append(NAME_PARTS["pretrain.si_layers"].format(changes.pop("pretrain.si_layers")))
    if noise_rate:
        parts.append(f"noise{noise_rate:g}")
    for key, value in sorted(changes.items()):
        shown = ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
            else value
        parts.append(NAME_PARTS[key].format(shown) if key in NAME_PARTS else f"{key.split('.')[-1]}{shown}")
    return "-".join(parts + [f"s{seed}"])


def committed_note(path: str | Path) -> str:
    """A warning for a suggested --overwrite of a run folder that lies among the committed results."""
    inside = Path(path).resolve().is_relative_to(RESULTS_DIR.resolve())
    return f" (which replaces the run in {path}, part of the committed results)" if inside else ""


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` for the block; a second process asking for it gets RunExistsError
    naming the holder. The lock is flock(2) on an open file, which the kernel releases when its process
    dies, so a killed run never leaves it stuck (it needs a local file system; NFS may not honour it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunExistsError(f"{folder} is in use by another process ({f.read().strip() or 'unknown'}). Fix: "
                                 "wait for it to end, or stop it, then start again (with --resume to continue "
                                 "the run)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def bind_store(store: str | Path, run_dir: str | Path, take_over: bool = False) -> str | None:
    """Record that `store` (a run's checkpoints and models) belongs to the run folder `run_dir`. Runs are
    stored by name, and two run folders of one name would overwrite each other: a store that belongs to
    another folder is refused (RunExistsError) unless `take_over` (the user asked to replace the run of that
    name), which returns the folder it belonged to. A store without a record (older) is adopted."""
    owner, run_dir = Path(store) / OWNER_FILE, str(Path(run_dir).resolve())
    recorded = read_json(owner).get("run_dir") if owner.is_file() else None
    if recorded not in (None, run_dir) and not take_over:
        raise RunExistsError(f"{store} holds the checkpoints of the run in {recorded}, not of {run_dir}: both runs "
                             f"are named {Path(store).name}. Fix: give this run another name (--run-name, or another "
                             f"last folder in --out), or pass --overwrite to replace that run's checkpoints")
    if recorded != run_dir:
        write_json(owner, {"run_dir": run_dir})
    return recorded if recorded not in (None, run_dir) else None


def config_changes(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} of every value that both configs hold and that differs; nested mappings are
    compared key by key, anything else (lists included) as a whole."""
    changes = {}
    for key in old.keys() & new.keys():
        a, b, name = old[key], new[key], f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_changes(a, b, f"{name}."))
        elif a != b:
            changes[name] = (a, b)
    return dict(sorted(changes.items()))


def git_commit() -> str:
    """The repository's commit, with '+dirty' when tracked files outside results/ have uncommitted
    changes (results/ holds the outputs that runs rewrite, not code)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def repository_argv(argv: list[str]) -> list[str]:
    """The command as run from the repository root: paths inside the repository made relative to it, so
    that a run record names nothing of the machine that made it."""
    root = REPO_ROOT.resolve()
    out = []
    for word in argv:
        path = Path(word)
        out.append(str(path.resolve().relative_to(root)) if path.is_absolute() and path.resolve().is_relative_to(root)
                   else word)
    return out


def environment_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": repository_argv(sys.argv),
    }
    for name in PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    try:
        import torch

        info["torch_runtime"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        info["cpu_threads"] = torch.get_num_threads()
    except ImportError:
        info["device"] = "unknown"
    return info


def write_run_files(run_dir: str | Path, config: dict[str, Any], metrics: dict[str, Any] | None = None) -> None:
    """config.json and environment.json now; metrics.json when given (call again at the end)."""
    run_dir = Path(run_dir)
    write_json(run_dir / "config.json", config)
    write_json(run_dir / "environment.json", environment_info())
    if metrics is not None:
        write_json(run_dir / "metrics.json", metrics)

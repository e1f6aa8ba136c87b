"""Run folders: every run writes its resolved config, its environment and its metrics into a folder
of its own, and never silently replaces another run's folder."""
from __future__ import annotations

import datetime as dt
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from common.io import write_json
from common.paths import REPO_ROOT

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
            f"{path} already holds a run. Fix: pass --resume to continue it, --overwrite to replace it, "
            "or choose another run name"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def environment_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
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

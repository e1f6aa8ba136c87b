"""Where things live. Results (small, committed) go under results/; heavy artefacts (corpora,
tokenized data, checkpoints) under an ignored artefacts folder that PRESENCE_ARTEFACTS can move."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "presets"
RESULTS_DIR = REPO_ROOT / "results"

ARTEFACTS_ENV = "PRESENCE_ARTEFACTS"
XTREME_ENV = "PRESENCE_XTREME_DIR"


def artefacts_root() -> Path:
    """The artefacts folder: $PRESENCE_ARTEFACTS if set, else <repo>/artefacts."""
    return Path(os.environ.get(ARTEFACTS_ENV) or REPO_ROOT / "artefacts").resolve()


def artefacts_dir(preset: str, *parts: str) -> Path:
    """Heavy, git-ignored outputs of one preset, e.g. artefacts_dir("tiny", "data")."""
    return artefacts_root().joinpath(preset, *parts)


def results_dir(preset: str, stage: str) -> Path:
    """Committed, tidy outputs of one stage at one preset: results/<preset>/<stage>/."""
    return RESULTS_DIR / preset / stage


def finished_pretrain_runs(preset: str) -> list[Path]:
    """The final/ folders of the pre-training runs of `preset` that finished (03_pretrain writes
    presence_run.json into final/ last)."""
    return [p.parent for p in sorted(artefacts_dir(preset, "pretrain").glob("*/final/presence_run.json"))]


def xtreme_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local XTREME folder (XTREME's download layout): an explicit path, else $PRESENCE_XTREME_DIR,
    else None (callers then use the hub or the offline fallback)."""
    chosen = explicit or os.environ.get(XTREME_ENV)
    if not chosen:
        return None
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"XTREME folder {path} does not exist. Fix: point {XTREME_ENV} (or --xtreme-dir) at a folder "
            "with XTREME's download layout, or unset it to use the hub."
        )
    return path

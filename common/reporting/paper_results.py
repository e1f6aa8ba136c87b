"""The scores the PRESENCE paper reports (results/paper/paper_results.csv, see its README), loaded
for printing beside ours. They are the paper's numbers, never ours."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.paths import RESULTS_DIR

PAPER_RESULTS_CSV = RESULTS_DIR / "paper" / "paper_results.csv"
PAPER_COLUMNS = ["table", "pretrain_steps", "model", "method", "setting", "task", "metric", "value", "note"]

# The paper's pre-training scale per model, for the captions of the comparison tables.
PAPER_SCALE = ("mT5-base / mT5-large pre-trained on mC4 (101 languages), "
               "inputs of 1024 tokens, batch 1024 (base) / 512 (large), 1M steps (Table 3) or 200k steps "
               "(Tables 2, 5); fine-tuned on the full XTREME training sets")


def load_paper_results(path: str | Path = PAPER_RESULTS_CSV) -> pd.DataFrame:
    """The paper's cells as a DataFrame with PAPER_COLUMNS (value as float, note '' when blank)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing. Fix: restore results/paper/paper_results.csv from git")
    frame = pd.read_csv(path, dtype={"note": str}, keep_default_na=False)
    missing = sorted(set(PAPER_COLUMNS) - set(frame.columns))
    if missing:
        raise ValueError(f"{path} lacks columns {missing}. Fix: restore it from git")
    frame["value"] = pd.to_numeric(frame["value"], errors="raise")
    frame["pretrain_steps"] = frame["pretrain_steps"].astype(int)
    return frame[PAPER_COLUMNS]


def paper_value(paper: pd.DataFrame, table: str, model: str, method: str, setting: str, task: str) -> float | None:
    """One reported cell, or None when the paper does not report it."""
    hit = paper[(paper["table"] == table) & (paper["model"] == model) & (paper["method"] == method)
                & (paper["setting"] == setting) & (paper["task"] == task)]
    if len(hit) > 1:
        raise ValueError(f"the paper's results hold {len(hit)} cells for {table}/{model}/{method}/{setting}/{task}")
    return None if hit.empty else float(hit["value"].iloc[0])

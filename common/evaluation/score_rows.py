"""The score CSVs 04_finetune writes (xtreme.csv, retrieval.csv): one row per (run, task, setting, language,
metric), values in percent, and beside each value the chance level, the score of guessing at random:

- accuracy of XNLI and PAWS-X: one label word of k, 100 / k (3 and 2 labels);
- verse retrieval (every metric): one candidate verse of the n in the other language, 100 / n;
- empty where no single level exists: F1 and exact match of QA (free text), entity F1 of PAN-X.

An `avg` row's chance is the mean of its languages' (they share one level: the same labels, or the same n
verses). Re-runs replace their rows; a file is rewritten atomically and a broken one is refused, not merged.
"""
from __future__ import annotations

import csv
from pathlib import Path

from common.evaluation.xtreme import NLI_LABELS, PAWSX_LABELS
from common.io import write_csv

COLUMNS = ["run", "method", "seed", "task", "setting", "lang", "metric", "value", "n_examples", "chance"]
ROW_KEY = ("run", "task", "setting", "lang", "metric")  # a re-run replaces the rows with the same key
NUM_LABELS = {"xnli": len(NLI_LABELS), "pawsx": len(PAWSX_LABELS)}
RETRIEVAL_TASK = "verse_retrieval"


def chance_level(task: str, metric: str, n_examples: int) -> float | None:
    """The expected score (percent) of a uniformly random answer, or None where there is no single one."""
    if task == RETRIEVAL_TASK:
        return 100.0 / n_examples
    if task in NUM_LABELS and metric == "accuracy":
        return 100.0 / NUM_LABELS[task]
    return None


def add_chance_levels(rows: list[dict]) -> list[dict]:
    """The rows with `chance` filled in (rounded as the values are; "" where there is none)."""
    levels: dict[tuple, list[float]] = {}
    for row in rows:
        if row["lang"] != "avg":
            level = chance_level(row["task"], row["metric"], int(row["n_examples"]))
            row["chance"] = "" if level is None else round(level, 4)
            if level is not None:
                levels.setdefault(_group(row), []).append(level)
    for row in rows:
        if row["lang"] == "avg":
            group = levels.get(_group(row))
            row["chance"] = round(sum(group) / len(group), 4) if group else ""
    return rows


def _group(row: dict) -> tuple:
    return tuple(str(row[k]) for k in ("run", "task", "setting", "metric"))


def read_rows(path: Path) -> list[dict]:
    """The rows of a score CSV; a file without the chance column is read too (chance is recomputed from the
    other columns). A broken file (other columns, a cut-off row) is an error: it is never merged into."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames not in (COLUMNS, COLUMNS[:-1]):
            raise ValueError(f"{path} has columns {reader.fieldnames}, expected {COLUMNS}. Fix: move it away")
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        if None in row or any(row.get(c) in (None, "") for c in COLUMNS[:-1]):
            raise ValueError(f"{path}, line {line}: a row with missing fields (the file was cut short or edited). "
                             "Fix: move it away and re-run 04_finetune for every checkpoint")
    return rows


def upsert_rows(path: Path, rows: list[dict]) -> None:
    """Replace the rows with the same key, keep the others, write atomically."""
    new_keys = {tuple(str(r[k]) for k in ROW_KEY) for r in rows}
    kept = [r for r in read_rows(path) if tuple(r[k] for k in ROW_KEY) not in new_keys] if path.exists() else []
    merged = add_chance_levels(kept + [dict(r) for r in rows])
    merged.sort(key=lambda r: (str(r["run"]), str(r["task"]), str(r["setting"]), str(r["lang"]) == "avg",
                               str(r["lang"]), str(r["metric"])))
    write_csv(path, merged, COLUMNS)

"""Which numbers a `make reproduce` made, and which it took from the committed results.

`make reproduce` trains only its fast path (the preset's pretrain.reproduce_methods x pretrain.seeds) and
evaluates XTREME only when the data is there, but the tables read every run under results/<preset>/. So
that a reader can tell the two apart, every output records when it was made: a pre-training run in its
environment.json (results/), a fine-tuning evaluation in its run folder's environment.json (artefacts/,
which a fresh clone does not have), the SI analysis in its own environment.json. An output made before
the reproduction started was reused, and says why.
"""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pandas as pd

from common.paths import XTREME_ENV

PROVENANCE_COLUMNS = ["what", "item", "status", "reason"]


def parse_time(text: str) -> dt.datetime:
    """An ISO time; without a zone it is taken as UTC (as `date -u +%Y-%m-%dT%H:%M:%S` writes it)."""
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def made_since(environment_json: Path, since: dt.datetime) -> bool:
    """Whether the output whose environment.json this is was made at or after `since` (absent: no)."""
    try:
        made = json.loads(environment_json.read_text(encoding="utf-8"))["time_utc"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return False
    return parse_time(made) >= since


def mark_runs(runs: pd.DataFrame, runs_dir: Path, since: dt.datetime, fast_path: set[tuple[str, int]]) -> list[dict]:
    """Adds runs["reused"]; returns one provenance row per pre-training run."""
    fresh = [made_since(runs_dir / name / "environment.json", since) for name in runs["run_name"]]
    runs["reused"] = [not f for f in fresh]
    rows = []
    for run, f in zip(runs.itertuples(), fresh):
        in_fast_path = (run.method, int(run.seed)) in fast_path and bool(run.standard)
        reason = "" if f else ("in make reproduce's fast path but not retrained (was it finished already? see the "
                               "log)" if in_fast_path else "not in make reproduce's fast path (pretrain.reproduce_methods "
                                                          "x pretrain.seeds): made by the grid commands in the README")
        rows.append({"what": "pre-training run", "item": run.run_name, "status": "regenerated" if f else "reused",
                     "reason": reason})
    return rows


def mark_scores(scores: pd.DataFrame, artefacts_finetune: Path, since: dt.datetime, runs: pd.DataFrame) -> list[dict]:
    """Adds scores["reused"] per (run, task, setting) from the evaluation's run folder; one provenance row each."""
    keys = scores[["run", "task", "setting"]].drop_duplicates()
    fresh = {tuple(k): made_since(artefacts_finetune / k[0] / k[1] / k[2] / "environment.json", since)
             for k in keys.itertuples(index=False)}
    scores["reused"] = [not fresh[k] for k in zip(scores["run"], scores["task"], scores["setting"])]
    retrained = set(runs.loc[~runs["reused"], "run_name"]) if "reused" in runs else set()
    rows = []
    for (run, task, setting), f in sorted(fresh.items()):
        if f:
            reason = ""
        elif task != "verse_retrieval" and not os.environ.get(XTREME_ENV):
            reason = f"XTREME data absent ({XTREME_ENV} unset): the committed scores were kept"
        elif run not in retrained:
            reason = "its checkpoint was not retrained by this reproduction"
        else:
            reason = "not evaluated by this reproduction (see the 04_finetune log)"
        rows.append({"what": "fine-tuning", "item": f"{run} / {task} / {setting}",
                     "status": "regenerated" if f else "reused", "reason": reason})
    return rows


def provenance_markdown(rows: list[dict], since: dt.datetime) -> str:
    frame = pd.DataFrame(rows, columns=PROVENANCE_COLUMNS)
    counts = frame.groupby(["what", "status"]).size().to_dict()
    lines = [f"# What `make reproduce` (started {since.isoformat(timespec='seconds')}) made and what it reused", "",
             "Numbers marked † in the tables come from reused outputs. Counts: "
             + "; ".join(f"{what} {status}: {n}" for (what, status), n in sorted(counts.items())) + ".", "",
             "| what | item | status | reason |", "|---|---|---|---|"]
    lines += [f"| {r.what} | {r.item} | {r.status} | {r.reason} |" for r in frame.itertuples()]
    return "\n".join(lines) + "\n"

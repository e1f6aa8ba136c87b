"""How a weighted run's weights shift across the corpus's streams (its languages, or its sources on a mixed
corpus): per stream and τ stage, the stream's share of the update's weight over its share of the batch
(1: the weights ignore the stream; above 1: they favour it), from each run's stream_weights.csv (every
pretrain.log_every steps, so a stage's figure is over its logged steps only)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.io import read_json
from common.reporting.markdown import markdown_table
from common.reporting.run_results import finished_runs, recipe_name

COLUMNS = ["recipe", "stream", "stage", "n_seeds", "batch_share", "weight_share", "weight_over_batch_mean",
           "weight_over_batch_std"]


def stream_weight_shift(runs_dir: Path) -> pd.DataFrame:
    """One row per recipe, stream and stage ("tau1": steps up to the switch step I, "tau2": after it): the
    mean over steps of the batch and weight shares, their ratio per seed, and its mean and sample std over
    the seeds whose logged steps of that stage drew the stream (n_seeds). Empty when no finished run logged
    its streams."""
    per_seed = []
    for run_dir in finished_runs(runs_dir):
        log_path = run_dir / "stream_weights.csv"
        if not log_path.is_file():
            continue
        config = read_json(run_dir / "config.json")
        log = pd.read_csv(log_path)
        # a step logs only the streams its batch drew: the others had no share of it
        full = pd.MultiIndex.from_product([log["step"].unique(), log["stream"].unique()], names=["step", "stream"])
        log = (log.set_index(["step", "stream"])[["batch_share", "weight_share"]].reindex(full, fill_value=0.0)
               .reset_index())
        log["stage"] = (log["step"] > config["preset"]["pretrain"]["switch_step"]).map({False: "tau1", True: "tau2"})
        shares = log.groupby(["stream", "stage"], as_index=False)[["batch_share", "weight_share"]].mean()
        shares["ratio"] = shares["weight_share"] / shares["batch_share"]
        shares["recipe"] = recipe_name(config["method"], config.get("per", "microbatch"))
        per_seed.append(shares)
    if not per_seed:
        return pd.DataFrame(columns=COLUMNS)
    table = (pd.concat(per_seed).groupby(["recipe", "stream", "stage"], sort=False)
             .agg(n_seeds=("ratio", "count"), batch_share=("batch_share", "mean"),
                  weight_share=("weight_share", "mean"), weight_over_batch_mean=("ratio", "mean"),
                  weight_over_batch_std=("ratio", "std"))
             .reset_index())
    return table[COLUMNS]


def stream_weight_markdown(table: pd.DataFrame) -> str:
    """Per recipe, a stream per row: its batch share in the τ = −1 stage (nearly all of the steps), then the two
    stages' weight ÷ batch share side by side."""
    lines = []
    for recipe, rows in table.groupby("recipe", sort=False):
        stages = rows.set_index(["stream", "stage"])
        body = []
        for stream in dict.fromkeys(rows["stream"]):
            cells = [stream, f"{stages.loc[(stream, 'tau2'), 'batch_share']:.3f}"]
            for stage in ("tau1", "tau2"):
                mean, std = stages.loc[(stream, stage), ["weight_over_batch_mean", "weight_over_batch_std"]]
                cells.append(f"{mean:.2f} ± {std:.2f}" if pd.notna(std) else f"{mean:.2f}")
            body.append(cells)
        lines += [f"**{recipe}** ({int(rows['n_seeds'].max())} seeds)", "",
                  markdown_table(["stream", "batch share, τ = −1 stage", "weight ÷ batch share, τ = +1 stage",
                                  "weight ÷ batch share, τ = −1 stage"], body), ""]
    return "\n".join(lines)

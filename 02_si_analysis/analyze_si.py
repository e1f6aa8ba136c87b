"""02_si_analysis: the paper's Figure 1 (self-influence of clean vs word-jumbled text, and of random vs
domain-mismatched English), tested harder than the paper did: is SI more than loss or length, how
early in training do SI scores separate noise, and which layer set to use.

    python 02_si_analysis/analyze_si.py --preset tiny                     # scorer: the baseline run, seed 0
    python 02_si_analysis/analyze_si.py --preset tiny --run presence-s0   # another pre-trained run
    python 02_si_analysis/analyze_si.py --preset paper --checkpoint google/mt5-base   # hub access needed

Inputs: artefacts/<preset>/data/probes.jsonl.gz (01_data) and the scorer's checkpoints
artefacts/<preset>/pretrain/<run>/{final, snapshots/step-N} (03_pretrain).
Outputs in results/<preset>/si_analysis/: si_scores.csv (one row per probe sample, checkpoint and layer
set), si_summary.csv, si_correlations.csv, si_reliability.csv, metrics.json; PNGs in results/<preset>/figures/
(with --out: in <out>/figures/). A new analysis first removes the previous one's tables, so that an
interrupted analysis never leaves a mix; metrics.json is written last: the analysis is complete with it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from tqdm import tqdm

from common.cli import exit_on_known_errors
from common.config import check_seed, load_preset, preset_argument
from common.presence.influence import batch_self_influence, forward_logits, group_losses, targets, token_losses
from common.io import iter_jsonl_gz, read_json, read_stored_text, remove_interrupted_writes, write_csv, write_json
from common.modeling import load_pretrained, require_model
from common.paths import artefacts_dir, finished_pretrain_runs, results_dir
from common.reporting.plotting import plot_figure1, plot_si_layer_sets, plot_si_reliability
from common.data.probes import span_corrupted_probes
from common.runinfo import write_run_files
from common.reporting.stats import auroc, bootstrap_mean_ci, mann_whitney_p
from common.data.tokenizer import encode_texts, load_tokenizer
from common.threads import set_cpu_threads

NOISY = {"jumbled": "clean", "mismatched": "random"}  # noisy condition -> the condition it is compared with
TABLES = ("si_scores.csv", "si_summary.csv", "si_correlations.csv", "si_reliability.csv")
SCORE_COLUMNS = ["lang", "condition", "sample_id", "n_tokens", "loss", "si", "checkpoint", "step", "layer_set", "seed"]
# Significant digits of the tables: SI and losses are float32 sums, which another thread count or checkpoint
# retrained on another machine moves in the 7th digit; at this precision a rerun rewrites nothing.
DIGITS = 6


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--run", default="baseline-s0", help="the 03_pretrain run whose checkpoints score the probes")
    p.add_argument("--checkpoint", help="score with this model folder or hub name instead (no snapshots)")
    p.add_argument("--seed", type=int, default=0, help="seed of the span-corruption noise of the probes")
    p.add_argument("--out", help="output folder (default results/<preset>/si_analysis)")
    p.add_argument("--overwrite", action="store_true", help="replace an analysis made with another scorer")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    return p.parse_args(argv)


def read_probes(path: Path) -> pd.DataFrame:
    records = [record for _, record in iter_jsonl_gz(path, "run `make data` (01_data/prepare_data.py)")]
    return pd.DataFrame(records).rename(columns={"language": "lang"})


def checkpoints(args, preset) -> list[tuple[str, int | None, str]]:
    """(label, step, folder or hub name) of the scorer's snapshots and its final model, oldest first."""
    if args.checkpoint:
        require_model(args.checkpoint, finished_pretrain_runs(preset.name), preset.name)
        return [(args.checkpoint, None, args.checkpoint)]
    store = artefacts_dir(preset.name, "pretrain", args.run)
    final = store / "final"
    if not (final / "presence_run.json").is_file():
        raise FileNotFoundError(f"{final} holds no finished run. Fix: run `make pretrain` (or 03_pretrain/pretrain.py "
                                f"--preset {preset_argument(args.preset)} --method baseline) first, or pass --run / "
                                "--checkpoint")
    found = [(f"{args.run}/{p.name}", int(p.name.split("-")[1]), str(p))
             for p in sorted(store.glob("snapshots/step-*"), key=lambda p: int(p.name.split("-")[1]))]
    return found + [(f"{args.run}/final", read_json(final / "presence_run.json")["steps"], str(final))]


def score(model, tokenizer, probes: pd.DataFrame, layer_set: str, cfg, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample self-influence and span-corruption loss of every probe, in batches."""
    sis, losses = [], []
    for start in tqdm(range(0, len(probes), cfg.si_analysis.batch_size), desc=f"SI ({layer_set})", leave=False):
        chunk = probes.iloc[start:start + cfg.si_analysis.batch_size]
        batch = span_corrupted_probes(chunk["text"].tolist(), chunk["sample_id"].tolist(), tokenizer,
                                      input_length=cfg.data.input_length, seed=seed,
                                      noise_density=cfg.data.noise_density,
                                      mean_noise_span_length=cfg.data.mean_noise_span_length)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        sis.append(batch_self_influence(model, batch, layers=layer_set, per="sample").double().cpu())
        with torch.no_grad():
            labels = targets(model, batch)  # a causal LM's are shifted
            losses.append(group_losses(token_losses(forward_logits(model, batch), labels), labels).double().cpu())
    return torch.cat(sis).numpy(), torch.cat(losses).numpy()


def summary_rows(scores: pd.DataFrame, bootstrap: int) -> list[dict]:
    """Per checkpoint, layer set, language and condition: n, mean, median and bootstrap CI of the mean;
    for the noisy conditions also the Mann-Whitney p-value and AUROC of SI (and, as a baseline
    detector, of the loss) separating them from their reference condition."""
    rows = []
    for (checkpoint, layer_set, lang), group in scores.groupby(["checkpoint", "layer_set", "lang"], sort=False):
        for condition, part in group.groupby("condition", sort=False):
            low, high = bootstrap_mean_ci(part["si"], n_resamples=bootstrap)
            row = {"checkpoint": checkpoint, "step": part["step"].iloc[0], "layer_set": layer_set, "lang": lang,
                   "condition": condition, "n": len(part), "mean": part["si"].mean(), "median": part["si"].median(),
                   "ci_low": low, "ci_high": high, "reference": "", "mw_p": "", "auroc_si": "", "auroc_loss": ""}
            reference = group[group["condition"] == NOISY.get(condition, "")]
            if len(reference):
                row.update(reference=NOISY[condition], mw_p=mann_whitney_p(part["si"], reference["si"]),
                           auroc_si=auroc(part["si"], reference["si"]),
                           auroc_loss=auroc(part["loss"], reference["loss"]))
            rows.append(row)
    return rows


def correlation_rows(scores: pd.DataFrame) -> list[dict]:
    """Is SI just loss or length? Spearman correlations per checkpoint, layer set, language, condition."""
    rows = []
    for keys, part in scores.groupby(["checkpoint", "layer_set", "lang", "condition"], sort=False):
        rows.append(dict(zip(["checkpoint", "layer_set", "lang", "condition"], keys), n=len(part),
                         spearman_si_loss=sps.spearmanr(part["si"], part["loss"]).statistic,
                         spearman_si_n_tokens=sps.spearmanr(part["si"], part["n_tokens"]).statistic))
    return rows


def reliability_rows(scores: pd.DataFrame) -> list[dict]:
    """How early do SI scores become reliable? Per checkpoint (layer set "first"): the AUROC of SI for
    noise, and the rank correlation of each sample's SI with its SI under the final checkpoint."""
    first = scores[scores["layer_set"] == "first"]
    final_step = first["step"].max()
    final = first[first["step"] == final_step].set_index(["lang", "condition", "sample_id"])["si"]
    rows = []
    for (checkpoint, step, lang), group in first.groupby(["checkpoint", "step", "lang"], sort=False):
        for noisy, reference in NOISY.items():
            pair = group[group["condition"].isin([noisy, reference])]
            pos, neg = pair[pair["condition"] == noisy]["si"], pair[pair["condition"] == reference]["si"]
            if len(pos) and len(neg):
                here = pair.set_index(["lang", "condition", "sample_id"])["si"]
                rows.append({"checkpoint": checkpoint, "step": step, "fraction_of_training": step / final_step,
                             "lang": lang, "comparison": f"{noisy} vs {reference}", "auroc_si": auroc(pos, neg),
                             "spearman_with_final": sps.spearmanr(here, final.loc[here.index]).statistic})
    return rows


def start_outputs(out: Path, config: dict) -> dict[str, str]:
    """The previous analysis's tables and metrics.json go (and leftovers of interrupted writes); this one's
    config.json comes first, so that the folder always names the scorer of the tables it holds. Returns
    the previous tables' text: the new ones are written against it (common.io.write_csv, DIGITS)."""
    remove_interrupted_writes(out)
    previous = {name: read_stored_text(out / name) for name in TABLES if (out / name).is_file()}
    for name in TABLES + ("metrics.json",):
        (out / name).unlink(missing_ok=True)
    write_run_files(out, config)
    return previous


def main(args: argparse.Namespace) -> dict:
    check_seed(args.seed, "--seed")
    preset = load_preset(args.preset, args.set)
    out = Path(args.out) if args.out else results_dir(preset.name, "si_analysis")
    scorer = args.checkpoint or args.run
    previous = out / "config.json"
    if previous.is_file() and read_json(previous)["scorer"] != scorer and not args.overwrite:
        raise FileExistsError(f"{out} holds the analysis of scorer {read_json(previous)['scorer']}. Fix: pass "
                              "--out for another folder, or --overwrite to replace it")
    probes = read_probes(artefacts_dir(preset.name, "data", "probes.jsonl.gz"))
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_cpu_threads(device)  # common/threads.py: one core left to whatever shares the machine
    found = checkpoints(args, preset)
    # --overwrite says how to write, not what was analysed: left out, so that it does not change the record
    settings = {key: value for key, value in vars(args).items() if key != "overwrite"}
    previous = start_outputs(out, {"scorer": scorer, "args": settings, "preset": preset.to_dict()})

    frames, started, scored = [], time.perf_counter(), 0
    for label, step, folder in found:
        model = load_pretrained(folder).to(device).eval()  # eval: no dropout noise in SI
        tokenizer = load_tokenizer(folder)
        n_tokens = [len(ids) for ids in encode_texts(tokenizer, probes["text"].tolist())]
        # every layer set on the final checkpoint; the earlier ones only need the paper's set
        layer_sets = preset.si_analysis.layer_sets if folder == found[-1][2] else ["first"]
        for layer_set in layer_sets:
            si, loss = score(model, tokenizer, probes, layer_set, preset, args.seed)
            scored += len(probes)
            frames.append(probes[["lang", "condition", "sample_id"]].assign(
                n_tokens=n_tokens, loss=loss, si=si, checkpoint=label, step=step, layer_set=layer_set, seed=args.seed))
        print(f"{label}: scored {len(probes)} probes x {len(layer_sets)} layer set(s)")
    seconds = time.perf_counter() - started
    scores = pd.concat(frames, ignore_index=True)[SCORE_COLUMNS]

    def write(name: str, rows: list[dict], columns: list[str] | None = None) -> None:
        write_csv(out / name, rows, columns, digits=DIGITS, previous=previous.get(name))

    write("si_scores.csv", scores.to_dict("records"), SCORE_COLUMNS)
    write("si_summary.csv", summary_rows(scores, preset.si_analysis.bootstrap_samples))
    write("si_correlations.csv", correlation_rows(scores))
    write("si_reliability.csv", reliability_rows(scores))
    figures = out / "figures" if args.out else results_dir(preset.name, "figures")
    final_label = found[-1][0]
    plot_figure1(scores, figures / "figure1_si_noise_domain.png", f" ({preset.name} preset, {final_label})")
    plot_si_layer_sets(scores[scores["checkpoint"] == final_label], figures / "si_layer_sets.png")
    if len(found) > 1:
        plot_si_reliability(pd.DataFrame(reliability_rows(scores)), figures / "si_reliability.png")
    metrics = {"checkpoints": [label for label, _, _ in found], "probes": len(probes), "scored_samples": scored,
               "seconds": seconds, "samples_per_second": scored / seconds, "device": str(device)}
    write_json(out / "metrics.json", metrics)
    print(f"SI analysis: {scored} samples in {seconds:.1f} s ({scored / seconds:.0f} samples/s) -> {out}")
    return metrics


if __name__ == "__main__":
    with exit_on_known_errors():
        main(parse_args())

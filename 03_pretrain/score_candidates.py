"""PRESENCE-Sequential, step 1 (the paper's Table 2): score the self-influence of every pre-training
row with a scoring model, here the finished baseline run of the same seed (the paper: mT5-base
after 200k steps). pretrain.py --method presence-sequential then keeps the lowest-scoring share
(pretrain.sequential_keep_fraction; the paper does not give it) and -reverse drops it.

    python 03_pretrain/score_candidates.py --preset tiny --seed 0
    python 03_pretrain/score_candidates.py --preset small --seed 1 --scorer presence-s1

Reads the packed training rows (01_data) and artefacts/<preset>/pretrain/<scorer>/final (03_pretrain).
Writes results/<preset>/pretrain/sequential/scores-s<seed>.csv (per language, or source stream: quantiles of
the rows' SI and loss, their rank correlation, and the share of its rows that Sequential keeps, since one
global ranking can favour some languages), then
artefacts/<preset>/pretrain/sequential/scores-s<seed>.npy (one score per training row, in row order),
which pretrain.py and pretrain_all.py read: written last, so that its presence means both are there.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from common.cli import exit_on_known_errors
from common.config import check_seed, load_preset, preset_argument
from common.presence.influence import batch_self_influence
from common.io import atomic_path, write_csv
from common.modeling import load_pretrained
from common.data.packed_data import (check_files, checked_ids, load_array, load_data_manifest, read_rows,
                                     recorded_files)
from common.paths import artefacts_dir, results_dir
from common.data.span_corruption import span_corrupt
from common.threads import set_cpu_threads


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0, help="seed of the Sequential runs these scores are for")
    p.add_argument("--scorer", help="run whose final model scores (default: baseline-s<seed>)")
    p.add_argument("--batch-size", type=int, help="rows scored at once (default: si_analysis.batch_size)")
    p.add_argument("--out", help="folder of the per-language summary (default results/<preset>/pretrain/sequential)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    return p.parse_args(argv)


def language_rows(languages, row_language, scores, losses, keep_fraction) -> list[dict]:
    """Per language (or source stream): quantiles of the rows' SI and loss, their rank correlation, and the
    share of its rows Sequential keeps."""
    kept = np.zeros(len(scores), dtype=bool)
    kept[np.argsort(scores, kind="stable")[:round(keep_fraction * len(scores))]] = True
    rows = []
    for index, lang in enumerate(languages):
        mine = row_language == index
        si_q, loss_q = np.quantile(scores[mine], [0.1, 0.5, 0.9]), np.quantile(losses[mine], [0.1, 0.5, 0.9])
        rows.append({"lang": lang, "rows": int(mine.sum()), "si_q10": si_q[0], "si_median": si_q[1], "si_q90": si_q[2],
                     "loss_q10": loss_q[0], "loss_median": loss_q[1], "loss_q90": loss_q[2],
                     "si_loss_spearman": float(spearmanr(scores[mine], losses[mine]).statistic) if mine.sum() > 2
                     else float("nan"),
                     "kept_share_sequential": kept[mine].mean(), "kept_share_reverse": (~kept[mine]).mean()})
    return rows


def main(args: argparse.Namespace) -> dict:
    check_seed(args.seed, "--seed")
    preset = load_preset(args.preset, args.set)
    scorer = args.scorer or f"baseline-s{args.seed}"
    final = artefacts_dir(preset.name, "pretrain", scorer, "final")
    if not (final / "presence_run.json").is_file():
        raise FileNotFoundError(f"{final} holds no finished run. Fix: pre-train the scorer first: 03_pretrain/"
                                f"pretrain.py --preset {preset_argument(args.preset)} --method baseline "
                                f"--seed {args.seed}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_cpu_threads(device)  # common/threads.py: one core left to whatever shares the machine
    model = load_pretrained(final).to(device).eval()
    data_dir = artefacts_dir(preset.name, "data")
    m = load_data_manifest(data_dir)
    check_files(data_dir, recorded_files(data_dir))
    tokens = read_rows(data_dir, "train", m)
    batch_size = args.batch_size or preset.si_analysis.batch_size

    started, scores, losses = time.perf_counter(), [], []
    for start in tqdm(range(0, len(tokens), batch_size), desc=f"scoring {len(tokens)} rows with {scorer}"):
        # each chunk's noise is seeded by its position, so the scores do not depend on the batch size's history
        rows = np.arange(start, min(start + batch_size, len(tokens)))
        chunk = checked_ids(tokens[rows], rows, m["vocab_size"], data_dir / "packed" / "train.bin")
        inputs, targets = span_corrupt(chunk, np.random.default_rng([args.seed, 2, start]), eos_id=m["eos_id"],
                                       first_sentinel_id=m["first_sentinel_id"], noise_density=m["noise_density"],
                                       mean_noise_span_length=m["mean_noise_span_length"])
        batch = {"input_ids": torch.from_numpy(inputs).to(device),
                 "attention_mask": torch.ones(inputs.shape, dtype=torch.long, device=device),
                 "labels": torch.from_numpy(targets).to(device)}
        si, loss = batch_self_influence(model, batch, layers=preset.pretrain.si_layers, per="sample", with_losses=True)
        scores.append(si.double().cpu())
        losses.append(loss.double().cpu())
    scores, losses = torch.cat(scores).numpy(), torch.cat(losses).numpy()
    seconds = time.perf_counter() - started
    if not np.isfinite(scores).all():
        raise FloatingPointError(f"{(~np.isfinite(scores)).sum()} rows got a non-finite score from {scorer}. "
                                 "Fix: score with an earlier or a healthier checkpoint (--scorer)")

    row_language = load_array(data_dir / "packed" / "train_language.npy", len(scores))
    summary_dir = Path(args.out) if args.out else results_dir(preset.name, "pretrain") / "sequential"
    summary = summary_dir / f"scores-s{args.seed}.csv"
    write_csv(summary, [dict(row, scorer=scorer, seed=args.seed) for row in
                        language_rows(m["languages"], row_language, scores, losses,
                                      preset.pretrain.sequential_keep_fraction)],
              digits=6)  # a rerun's float noise (7th digit) leaves the file as it was
    out = artefacts_dir(preset.name, "pretrain", "sequential", f"scores-s{args.seed}.npy")
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, scores)
    print(f"scored {len(scores)} rows in {seconds:.0f} s ({len(scores) / seconds:.0f} rows/s) -> {out}, {summary}")
    return {"rows": len(scores), "seconds": seconds, "scores": str(out)}


if __name__ == "__main__":
    with exit_on_known_errors():
        main(parse_args())

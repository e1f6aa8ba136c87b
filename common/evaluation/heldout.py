"""The held-out loss of the pre-training objective (span corruption for T5, the next token or the masked
tokens for other families: common/families.py): the pre-training yardstick, with its own noise.

Every run is scored on the same rows of the held-out split (all of them by default; `eval_rows` takes a
fixed subset), each row corrupted the same way in every run (noise seeded by the row), so differences
between runs are differences between models. Per row: its mean token cross-entropy. Per language: the
mean over its rows and the standard error over rows. Overall (`lang` "all"): the languages' losses
weighted by their training sampling probabilities, so that the yardstick weighs languages as training
does (the held-out split's own language mix follows the documents, not the sampling), with the standard
error sqrt(sum_L p_L^2 se_L^2).

The standard error measures how much the number would move with other held-out rows (evaluation noise);
the spread over seeds (training noise) is reported apart from it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from common.data.packed_data import SpanCorruptionBatches
from common.modeling import IGNORE_INDEX
from common.presence.influence import eager, forward_logits, targets, token_losses

HELDOUT_SEED = 12345  # span-corruption noise of the held-out rows: the same for every run and seed
HELDOUT_COLUMNS = ["run", "method", "seed", "step", "lang", "n_rows", "n_tokens", "loss", "se"]


def heldout_rows(num_rows: int, eval_rows: int | None) -> np.ndarray:
    """The row ids scored: all, or a fixed seeded subset of `eval_rows` (the same for every run)."""
    if eval_rows is None or eval_rows >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(HELDOUT_SEED).choice(num_rows, size=eval_rows, replace=False))


@torch.no_grad()
def row_losses(model, heldout: SpanCorruptionBatches, rows: np.ndarray, batch_size: int, device,
               autocast) -> tuple[np.ndarray, np.ndarray]:
    """(mean token loss, target tokens) of every row in `rows`, float64 / int64."""
    model = eager(model)
    was_training = model.training
    model.eval()
    losses, counts = [], []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in heldout.fixed_rows(rows[start:start + batch_size]).items()}
        with autocast():
            logits = forward_logits(model, batch)
        labels = targets(model, batch)  # a causal LM's are shifted
        per_token = token_losses(logits, labels).double()
        count = (labels != IGNORE_INDEX).sum(1)
        losses.append((per_token.sum(1) / count.clamp(min=1)).cpu())
        counts.append(count.cpu())
    model.train(was_training)
    return torch.cat(losses).numpy(), torch.cat(counts).numpy()


def summarise(losses: np.ndarray, counts: np.ndarray, row_languages: list[str],
              sampling: dict[str, float]) -> list[dict]:
    """One dict per language present (lang, n_rows, n_tokens, loss, se), then the overall "all" row."""
    row_languages = np.asarray(row_languages)
    out = []
    for lang in sorted(set(row_languages.tolist())):
        mine = losses[row_languages == lang]
        se = float(mine.std(ddof=1) / math.sqrt(len(mine))) if len(mine) > 1 else float("nan")
        out.append({"lang": lang, "n_rows": int(len(mine)), "n_tokens": int(counts[row_languages == lang].sum()),
                    "loss": float(mine.mean()), "se": se})
    total = sum(sampling.get(row["lang"], 0.0) for row in out)
    if total <= 0:
        raise ValueError(f"no sampling probability for the held-out languages {[r['lang'] for r in out]}")
    p = {row["lang"]: sampling.get(row["lang"], 0.0) / total for row in out}
    out.append({"lang": "all", "n_rows": int(len(losses)), "n_tokens": int(counts.sum()),
                "loss": sum(p[r["lang"]] * r["loss"] for r in out),
                "se": math.sqrt(sum(p[r["lang"]] ** 2 * r["se"] ** 2 for r in out))})
    return out

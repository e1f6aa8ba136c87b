"""Known noise in the training data: a seeded share of the packed training rows replaced by labelled kinds
of corruption, so that what self-influence and PRESENCE do with noisy data can be measured instead of
assumed (the paper argues that SI is high on noisy text and that tau = -1 moves weight off it).

Kinds (each keeps the row's length; a corrupted row keeps its language for sampling):
  jumbled  the row's words in random order: word units are runs of pieces from one that starts a word
           ("▁" in SentencePiece) to the next; a row with fewer than MIN_WORDS word starts (Chinese,
           Japanese: no spaces) has its pieces permuted one by one instead
  random   uniformly random ordinary tokens (no pad, EOS, unknown or sentinel ids)
  python   out-of-domain text: Python standard-library source (the probe sets' mismatched domain),
           tokenized, EOS between files, cut into rows

Labels are int8 per row: 0 clean, k = 1 + the kind's index in the configured kinds. The chosen rows get
the kinds in turn, so each kind has an equal share (within one row).
"""
from __future__ import annotations

import numpy as np

from common.config import NOISE_KINDS
from common.data.probes import stdlib_files
from common.data.tokenizer import NUM_SENTINELS, encode_texts
CLEAN = 0
MIN_WORDS = 8
_WORD_START = "\u2581"  # SentencePiece's word-boundary mark


def noise_dir_name(rate: float) -> str:
    """The folder under packed/ holding the training rows at this noise rate, e.g. noise-0.2."""
    return f"noise-{rate:g}"


def choose_noisy_rows(num_rows: int, rate: float, num_kinds: int, rng: np.random.Generator) -> np.ndarray:
    """int8 labels: round(rate * num_rows) rows, chosen at random, labelled 1..num_kinds in turn."""
    if not 0 <= rate < 1:
        raise ValueError(f"noise rate {rate} is outside [0, 1)")
    labels = np.zeros(num_rows, dtype=np.int8)
    chosen = rng.choice(num_rows, size=int(round(rate * num_rows)), replace=False)
    labels[chosen] = 1 + np.arange(len(chosen)) % num_kinds
    return labels


def word_starts(tokenizer) -> np.ndarray:
    """Bool per token id: the piece begins a word (or is a special token, which stands alone)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    starts = np.array([bool(p) and p.startswith(_WORD_START) for p in pieces])
    starts[list(tokenizer.all_special_ids)] = True
    return starts


def jumble_row(tokens: np.ndarray, starts_word: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The row with its word units (pieces, if it has fewer than MIN_WORDS words) in random order."""
    starts = starts_word[tokens]
    starts[0] = True
    bounds = np.flatnonzero(starts)
    if len(bounds) < MIN_WORDS:
        return tokens[rng.permutation(len(tokens))]
    units = np.split(tokens, bounds[1:])
    return np.concatenate([units[i] for i in rng.permutation(len(units))])


def ordinary_ids(tokenizer, first_sentinel_id: int) -> np.ndarray:
    """Token ids that ordinary text is made of: below the sentinels, without the special tokens."""
    ids = np.arange(first_sentinel_id - NUM_SENTINELS + 1)
    return np.setdiff1d(ids, np.array(tokenizer.all_special_ids))


def python_rows(tokenizer, count: int, raw_length: int, eos_id: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows of standard-library source, files in a seeded order, EOS after each file."""
    files = stdlib_files()
    stream: list[int] = []
    for i in rng.permutation(len(files)):
        if len(stream) >= count * raw_length:
            break
        try:
            text = files[i].read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        stream += encode_texts(tokenizer, [text])[0] + [eos_id]
    if len(stream) < count * raw_length:
        raise ValueError(f"the standard library gave {len(stream)} tokens, {count} rows of {raw_length} asked. "
                         "Fix: lower data.noise_rates")
    return np.asarray(stream[:count * raw_length]).reshape(count, raw_length)


def corrupt_rows(rows: np.ndarray, labels: np.ndarray, kinds: list[str], tokenizer, ids: dict,
                 rng: np.random.Generator) -> np.ndarray:
    """A copy of `rows` (n, raw_length) with every labelled row replaced by its kind of noise."""
    unknown = sorted(set(kinds) - set(NOISE_KINDS))
    if unknown:
        raise ValueError(f"unknown noise kinds {unknown}. Fix: use some of {NOISE_KINDS}")
    noisy = np.array(rows, copy=True)
    raw_length = rows.shape[1]
    for k, kind in enumerate(kinds, start=1):
        chosen = np.flatnonzero(labels == k)
        if not len(chosen):
            continue
        if kind == "jumbled":
            starts = word_starts(tokenizer)
            for row in chosen:
                noisy[row] = jumble_row(np.asarray(rows[row]), starts, rng)
        elif kind == "random":
            noisy[chosen] = rng.choice(ordinary_ids(tokenizer, ids["first_sentinel_id"]), size=(len(chosen), raw_length))
        else:
            noisy[chosen] = python_rows(tokenizer, len(chosen), raw_length, ids["eos_id"], rng)
    return noisy


def noise_shares(labels: np.ndarray, weights: np.ndarray, num_kinds: int) -> dict[int, tuple[float, float]]:
    """{kind: (share of the rows, share of the weight)} with kind 0 = every noisy row together; `weights`
    are per row and sum to 1."""
    shares = {0: (float(np.mean(labels > 0)), float(np.sum(weights[labels > 0])))}
    for k in range(1, num_kinds + 1):
        shares[k] = (float(np.mean(labels == k)), float(np.sum(weights[labels == k])))
    return shares

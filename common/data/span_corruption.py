"""T5's span-corruption objective, vectorised over rows with numpy.

Written from the algorithm described for T5 (Raffel et al. 2020, section 3.1.4) and its
`random_spans_noise_mask` / `compute_input_and_target_lengths` helpers:

- a row of L tokens gets round(L * noise_density) noise tokens in round(noise / mean_span) spans;
- the noise and the kept tokens are each cut into that many non-empty segments, uniformly at random,
  and the segments interleave starting with kept tokens (so a row never starts with noise);
- in the inputs every noise span becomes one sentinel; the targets hold, for every noise span, its
  sentinel followed by the span's tokens; both end with EOS;
- sentinels are numbered downward from the last id: span k gets id first_sentinel_id - k.

Python's round() (half to even) is used throughout, as in T5's helpers.
"""
from __future__ import annotations

import numpy as np
import torch

from common.modeling import IGNORE_INDEX



def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a row of `length` tokens, with T5's clamps: at least one noise
    token, at least one kept token, at least one span."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def corrupted_lengths(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(inputs, targets) lengths after corrupting `length` raw tokens, EOS included: the inputs keep the
    non-noise tokens plus one sentinel per span, the targets the noise tokens plus one sentinel per span."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def compute_input_and_target_lengths(inputs_length: int, noise_density: float = 0.15,
                                     mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(raw tokens per row, targets length): the longest raw row whose corrupted inputs fit
    `inputs_length`. T5's numbers: 512 -> (568, 114), 1024 -> (1137, 229)."""
    raw = inputs_length  # corruption only shortens the inputs, so the answer is at least this
    while corrupted_lengths(raw + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        raw += 1
    return raw, corrupted_lengths(raw, noise_density, mean_noise_span_length)[1]


def random_segment_lengths(num_items: int, num_segments: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """(batch, num_segments) positive ints, each row summing to num_items, uniform over all such
    compositions: the cut points are a uniformly random (num_segments - 1)-subset of the num_items - 1
    gaps, taken as the positions of the smallest i.i.d. uniform keys."""
    if num_segments == 1:
        return np.full((batch, 1), num_items, dtype=np.int64)
    keys = rng.random((batch, num_items - 1), dtype=np.float32)
    cuts = np.argpartition(keys, num_segments - 2, axis=1)[:, :num_segments - 1] + 1
    cuts.sort(axis=1)
    bounds = np.concatenate([np.zeros((batch, 1), np.int64), cuts, np.full((batch, 1), num_items, np.int64)], axis=1)
    return np.diff(bounds, axis=1)


def random_spans_noise_mask(batch: int, length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """(batch, length) bool, True on noise tokens; every row has the same noise and span counts."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = random_segment_lengths(num_noise, num_spans, batch, rng)
    kept_lengths = random_segment_lengths(length - num_noise, num_spans, batch, rng)
    interleaved = np.stack([kept_lengths, noise_lengths], axis=2).reshape(-1)
    is_noise = np.tile(np.array([False, True]), batch * num_spans)
    return np.repeat(is_noise, interleaved).reshape(batch, length)


def _replace_spans(tokens: np.ndarray, span_mask: np.ndarray, eos_id: int, first_sentinel_id: int) -> np.ndarray:
    """Each run of True in `span_mask` becomes one sentinel (the k-th run from the left gets
    first_sentinel_id - k), the rest of the run is dropped, and EOS is appended. All rows must keep
    the same number of tokens, which holds for masks from random_spans_noise_mask."""
    before = np.zeros_like(span_mask)
    before[:, 1:] = span_mask[:, :-1]
    run_start = span_mask & ~before
    sentinels = first_sentinel_id + 1 - np.cumsum(run_start, axis=1, dtype=np.int64)  # (int: bool cumsum is slow)
    values = np.where(run_start, sentinels, tokens)
    kept = values[~span_mask | run_start].reshape(len(tokens), -1)
    return np.concatenate([kept, np.full((len(tokens), 1), eos_id, dtype=kept.dtype)], axis=1)


def span_corrupt(tokens: np.ndarray, rng: np.random.Generator, *, eos_id: int, first_sentinel_id: int,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt every row of `tokens` (batch, L). Returns int64 (inputs, targets) of the shapes
    corrupted_lengths(L, ...) gives."""
    tokens = np.asarray(tokens, dtype=np.int64)
    mask = random_spans_noise_mask(len(tokens), tokens.shape[1], noise_density, mean_noise_span_length, rng)
    inputs = _replace_spans(tokens, mask, eos_id, first_sentinel_id)
    # In the targets the kept runs play the sentinels' part: kept run k precedes noise span k.
    targets = _replace_spans(tokens, ~mask, eos_id, first_sentinel_id)
    return inputs, targets


def span_corrupted_example(token_ids: list[int] | np.ndarray, rng: np.random.Generator, *, input_length: int,
                           target_length: int, pad_id: int, eos_id: int, first_sentinel_id: int,
                           noise_density: float = 0.15,
                           mean_noise_span_length: float = 3.0) -> dict[str, torch.Tensor]:
    """One variable-length token sequence as one padded training example: 1-D LongTensors
    input_ids and attention_mask (input_length) and labels (target_length, IGNORE_INDEX on padding).
    The sequence must not be longer than the raw row length that input_length implies."""
    raw_length, _ = compute_input_and_target_lengths(input_length, noise_density, mean_noise_span_length)
    if len(token_ids) > raw_length:
        raise ValueError(f"{len(token_ids)} tokens do not fit a raw row of {raw_length}; truncate them first")
    inputs, targets = span_corrupt(np.asarray(token_ids)[None, :], rng, eos_id=eos_id,
                                   first_sentinel_id=first_sentinel_id, noise_density=noise_density,
                                   mean_noise_span_length=mean_noise_span_length)
    if targets.shape[1] > target_length:
        raise ValueError(f"targets of {targets.shape[1]} tokens exceed target_length {target_length}; use the "
                         "target length compute_input_and_target_lengths gives for input_length")
    input_ids = torch.full((input_length,), pad_id, dtype=torch.long)
    input_ids[:inputs.shape[1]] = torch.from_numpy(inputs[0])
    attention_mask = (torch.arange(input_length) < inputs.shape[1]).long()
    labels = torch.full((target_length,), IGNORE_INDEX, dtype=torch.long)
    labels[:targets.shape[1]] = torch.from_numpy(targets[0])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

"""Span corruption against T5's published numbers and a brute-force reconstruction of the original rows."""
import itertools
from collections import Counter

import numpy as np
import pytest

from common.modeling import IGNORE_INDEX
from common.data.span_corruption import (compute_input_and_target_lengths, random_segment_lengths,
                                    random_spans_noise_mask, span_corrupt, span_corrupted_example)

EOS, FIRST_SENTINEL = 1, 999  # sentinels are 999, 998, ...; the test tokens stay below 899


# 512 and 1024 are T5's published pairs; 128 by hand: 141 raw tokens -> 21 noise in 7 spans -> 141 - 21 + 7 + 1 = 128
# inputs and 21 + 7 + 1 = 29 targets, while 142 raw tokens would give 129 inputs.
@pytest.mark.parametrize("inputs_length, expected", [(512, (568, 114)), (1024, (1137, 229)), (128, (141, 29))])
def test_lengths_are_t5s(inputs_length, expected):
    assert compute_input_and_target_lengths(inputs_length, 0.15, 3.0) == expected


def reconstruct(inputs, targets):
    """Brute force: put every input sentinel's span (read from the targets) back in its place."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, current = {}, None
    for token in targets[:-1]:
        if token > FIRST_SENTINEL - 100:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in inputs[:-1]:
        out.extend(spans.pop(token) if token > FIRST_SENTINEL - 100 else [token])
    assert not spans, "every target span must have its sentinel in the inputs"
    return out


@pytest.mark.parametrize("seed", range(20))
def test_inputs_and_targets_rebuild_the_rows(seed):
    rng = np.random.default_rng(seed)
    length = int(rng.integers(2, 400))
    batch = int(rng.integers(1, 6))
    tokens = rng.integers(0, 899, size=(batch, length))
    tokens[:, rng.integers(0, length)] = EOS  # document separators inside a packed row are ordinary tokens
    inputs, targets = span_corrupt(tokens, np.random.default_rng(seed), eos_id=EOS, first_sentinel_id=FIRST_SENTINEL)
    for row in range(batch):
        assert reconstruct(list(inputs[row]), list(targets[row])) == list(tokens[row])
        sentinels = [t for t in inputs[row] if t > FIRST_SENTINEL - 100]
        assert sentinels == list(range(FIRST_SENTINEL, FIRST_SENTINEL - len(sentinels), -1))


def test_packed_rows_give_exactly_the_configured_lengths():
    raw, target_length = compute_input_and_target_lengths(512)
    tokens = np.random.default_rng(0).integers(3, 899, size=(16, raw))
    inputs, targets = span_corrupt(tokens, np.random.default_rng(1), eos_id=EOS, first_sentinel_id=FIRST_SENTINEL)
    assert inputs.shape == (16, 512) and targets.shape == (16, target_length)


def test_noise_mask_has_t5s_counts_and_starts_with_kept_tokens():
    mask = random_spans_noise_mask(64, 568, 0.15, 3.0, np.random.default_rng(0))
    assert (mask.sum(axis=1) == 85).all()  # round(568 * 0.15)
    span_starts = mask[:, 1:] & ~mask[:, :-1]
    assert (span_starts.sum(axis=1) == 28).all()  # round(85 / 3)
    assert not mask[:, 0].any()


def test_segmentation_is_uniform_over_compositions():
    # 6 items in 3 non-empty segments: C(5, 2) = 10 compositions, each should come up 1/10 of the time.
    draws = random_segment_lengths(6, 3, 20000, np.random.default_rng(0))
    assert (draws.sum(axis=1) == 6).all() and (draws >= 1).all()
    counts = Counter(map(tuple, draws))
    expected = {c for c in itertools.product(range(1, 5), repeat=3) if sum(c) == 6}
    assert set(counts) == expected
    assert max(abs(n / 20000 - 0.1) for n in counts.values()) < 0.01  # ~4.7 standard errors


def test_deterministic_under_a_seed_and_different_across_seeds():
    tokens = np.random.default_rng(0).integers(3, 899, size=(8, 142))
    run = lambda seed: span_corrupt(tokens, np.random.default_rng(seed), eos_id=EOS, first_sentinel_id=FIRST_SENTINEL)
    a, b, c = run(5), run(5), run(6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_single_example_is_padded_and_labels_ignore_padding():
    example = span_corrupted_example(list(range(10, 60)), np.random.default_rng(0), input_length=128, target_length=32,
                                     pad_id=0, eos_id=EOS, first_sentinel_id=FIRST_SENTINEL)
    ids, mask, labels = example["input_ids"], example["attention_mask"], example["labels"]
    assert ids.shape == (128,) and labels.shape == (32,)
    n_in, n_out = int(mask.sum()), int((labels != IGNORE_INDEX).sum())
    assert (ids[n_in:] == 0).all() and (labels[n_out:] == IGNORE_INDEX).all()
    assert reconstruct(ids[:n_in].tolist(), labels[:n_out].tolist()) == list(range(10, 60))
    with pytest.raises(ValueError, match="truncate"):
        span_corrupted_example(list(range(200)), np.random.default_rng(0), input_length=128, target_length=32,
                               pad_id=0, eos_id=EOS, first_sentinel_id=FIRST_SENTINEL)

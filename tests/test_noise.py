"""The known-noise data: labelled rows corrupted as each kind promises, clean rows untouched, the share of
rows and of weight per kind, and the loader serving the same rows at every noise rate."""
import numpy as np
import pytest

from common.data.noise import MIN_WORDS, choose_noisy_rows, jumble_row, noise_shares, ordinary_ids, word_starts
from common.data.packed_data import SpanCorruptionBatches, load_data_manifest, load_tokenizer_from_data, read_rows

RATE = 0.3  # tests/conftest.py's MINI_DATA builds this noise rate


def test_noisy_rows_are_the_rate_and_the_kinds_take_turns():
    labels = choose_noisy_rows(1000, 0.2, 3, np.random.default_rng(0))
    assert (labels > 0).sum() == 200
    assert sorted(np.bincount(labels)[1:].tolist()) == [66, 67, 67]
    with pytest.raises(ValueError):
        choose_noisy_rows(10, 1.0, 3, np.random.default_rng(0))


def test_jumbling_permutes_whole_words():
    starts = np.zeros(20, dtype=bool)
    starts[[1, 4, 7, 10, 13, 16, 19]] = True  # ids that begin a word
    row = np.array([1, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 16, 17, 19, 2, 1, 5])
    out = jumble_row(row.copy(), starts, np.random.default_rng(0))
    words = lambda r: sorted(tuple(w) for w in np.split(r, np.flatnonzero(starts[r])[1:] if starts[r[0]] else
                                                              np.flatnonzero(starts[r])))
    assert sorted(out.tolist()) == sorted(row.tolist()) and not np.array_equal(out, row)
    assert words(out) == words(row)


def test_a_row_with_few_word_starts_has_its_pieces_permuted():
    starts = np.zeros(20, dtype=bool)
    starts[1] = True
    row = np.arange(2, 18)
    out = jumble_row(row.copy(), starts, np.random.default_rng(0))
    assert np.flatnonzero(starts[row]).size < MIN_WORDS
    assert sorted(out.tolist()) == row.tolist() and not np.array_equal(out, row)


def test_noise_shares_by_hand():
    labels = np.array([0, 1, 2, 0, 1, 0])
    weights = np.array([0.1, 0.2, 0.3, 0.1, 0.2, 0.1])
    shares = noise_shares(labels, weights, 2)
    assert shares[0] == pytest.approx((0.5, 0.7))
    assert shares[1] == pytest.approx((2 / 6, 0.4)) and shares[2] == pytest.approx((1 / 6, 0.3))


@pytest.mark.slow
def test_the_data_stage_corrupts_the_labelled_rows_as_promised(mini_artefacts):
    data_dir = mini_artefacts / "tiny" / "data"
    manifest = load_data_manifest(data_dir)
    tokenizer = load_tokenizer_from_data(data_dir)
    clean = np.asarray(read_rows(data_dir, "train", manifest))
    loader = SpanCorruptionBatches(data_dir, "train", 4, seed=0, noise_rate=RATE)
    noisy, labels = np.asarray(loader.tokens), loader.noise_labels
    assert loader.noise_kinds == ["jumbled", "random", "python"]
    assert (labels > 0).sum() == round(RATE * len(clean))
    assert np.array_equal(noisy[labels == 0], clean[labels == 0])
    jumbled, random, python = (np.flatnonzero(labels == k) for k in (1, 2, 3))
    assert all(sorted(noisy[r]) == sorted(clean[r]) for r in jumbled)
    assert np.mean([not np.array_equal(noisy[r], clean[r]) for r in jumbled]) > 0.9
    assert np.isin(noisy[random], ordinary_ids(tokenizer, manifest["first_sentinel_id"])).all()
    python_text = tokenizer.decode(noisy[python].ravel().tolist())
    assert python_text.count("def ") + python_text.count("import ") + python_text.count("self") > len(python) / 4
    assert word_starts(tokenizer)[manifest["eos_id"]]
    # the same rows are served at every rate, so runs at different rates see the same batches
    plain = SpanCorruptionBatches(data_dir, "train", 4, seed=0)
    assert np.array_equal(plain.batch_rows(3), loader.batch_rows(3)) and plain.noise_labels is None
    with pytest.raises(FileNotFoundError, match="noise rate 0.5"):
        SpanCorruptionBatches(data_dir, "train", 4, seed=0, noise_rate=0.5)

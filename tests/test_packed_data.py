"""Packed rows against a brute-force packing; the loader is a pure function of (seed, step), resumes
exactly, realises the alpha mixture per epoch, and feeds T5ForConditionalGeneration."""
import hashlib
from collections import Counter

import numpy as np
import pytest
import torch

from common.io import read_json, write_json
from common.data.packed_data import (MANIFEST, PackedWriter, SpanCorruptionBatches, check_files, file_records,
                                     heldout_documents, load_array, mixture_rows_per_epoch, read_rows)
from common.data.span_corruption import compute_input_and_target_lengths

EOS, VOCAB = 1, 300
INPUT_LENGTH = 16
RAW, TARGET = compute_input_and_target_lengths(INPUT_LENGTH)  # 17 raw tokens, 5 targets


def random_documents(rng, n):
    return [list(rng.integers(3, VOCAB - 100, size=rng.integers(1, 40))) for _ in range(n)]


def brute_force_rows(documents):
    stream = [t for d in documents for t in d + [EOS]]
    return [stream[i:i + RAW] for i in range(0, len(stream) - RAW + 1, RAW)]


def make_data_dir(path, docs_by_language, alpha=0.3):
    """A data folder as 01_data writes it, made from token lists."""
    languages = list(docs_by_language)
    with PackedWriter(path / "packed" / "train.bin", RAW, EOS, np.uint16) as train, \
            PackedWriter(path / "packed" / "heldout.bin", RAW, EOS, np.uint16) as heldout:
        for docs in docs_by_language.values():
            train.add(docs)
            heldout.add(docs[:3])
            train.end_language(), heldout.end_language()
    weights = {lang: n ** alpha for lang, n in zip(languages, train.rows_per_language)}
    manifest = {"languages": languages, "input_length": INPUT_LENGTH, "target_length": TARGET, "raw_length": RAW,
                "eos_id": EOS, "pad_id": 0, "first_sentinel_id": VOCAB - 1, "vocab_size": VOCAB,
                "noise_density": 0.15, "mean_noise_span_length": 3.0, "token_dtype": "uint16",
                "sampling_probabilities": {lang: w / sum(weights.values()) for lang, w in weights.items()},
                "splits": {"train": {"rows": sum(train.rows_per_language)},
                           "heldout": {"rows": sum(heldout.rows_per_language)}},
                "per_language": {lang: {"train_rows": n} for lang, n in zip(languages, train.rows_per_language)},
                "tokenizer": "tokenizer"}
    write_json(path / MANIFEST, manifest)
    return manifest


@pytest.fixture
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    make_data_dir(tmp_path, {"en": random_documents(rng, 400), "hi": random_documents(rng, 60)})
    return tmp_path


def test_writer_packs_like_brute_force_and_keeps_languages_apart(tmp_path):
    rng = np.random.default_rng(1)
    en, hi = random_documents(rng, 50), random_documents(rng, 20)
    manifest = make_data_dir(tmp_path, {"en": en, "hi": hi})
    rows = read_rows(tmp_path, "train", manifest)
    expected = brute_force_rows(en) + brute_force_rows(hi)  # each language's partial last row is dropped
    assert rows.tolist() == expected
    language = np.load(tmp_path / "packed" / "train_language.npy")
    assert Counter(language.tolist()) == {0: len(brute_force_rows(en)), 1: len(brute_force_rows(hi))}


def test_writer_leaves_nothing_behind_when_interrupted(tmp_path):
    with pytest.raises(RuntimeError):
        with PackedWriter(tmp_path / "packed" / "train.bin", RAW, EOS, np.uint16) as writer:
            writer.add([[5] * 100])
            raise RuntimeError("killed")
    assert list((tmp_path / "packed").iterdir()) == []


def test_heldout_documents_are_a_seeded_share_never_all():
    mask = heldout_documents(200, 0.05, seed=[0, 1])
    assert mask.sum() == 10 and np.array_equal(mask, heldout_documents(200, 0.05, seed=[0, 1]))
    assert heldout_documents(3, 0.01, seed=0).sum() == 1 and heldout_documents(2, 0.9, seed=0).sum() == 1


def test_same_seed_same_batches_and_resume_mid_epoch(data_dir):
    a = SpanCorruptionBatches(data_dir, "train", batch_size=8, seed=3)
    b = SpanCorruptionBatches(data_dir, "train", batch_size=8, seed=3)
    steps = [0, 1, a.steps_per_epoch - 1, a.steps_per_epoch, 3 * a.steps_per_epoch + 2]
    for step in steps:
        for key in ("input_ids", "labels"):
            assert torch.equal(a.batch(step)[key], b.batch(step)[key])
    resumed = SpanCorruptionBatches(data_dir, "train", batch_size=8, seed=3).iterate(start_step=7)
    uninterrupted = dict(zip(range(12), (batch for _, batch in a.iterate())))
    for step, batch in [next(resumed) for _ in range(5)]:
        assert torch.equal(batch["labels"], uninterrupted[step]["labels"])
    other = SpanCorruptionBatches(data_dir, "train", batch_size=8, seed=4)
    assert not torch.equal(a.batch(0)["input_ids"], other.batch(0)["input_ids"])


def test_batches_are_span_corrupted_rows(data_dir):
    loader = SpanCorruptionBatches(data_dir, "train", batch_size=4, seed=0)
    batch, rows = loader.batch(5), loader.batch_rows(5)
    assert batch["input_ids"].shape == (4, INPUT_LENGTH) and batch["labels"].shape == (4, TARGET)
    assert batch["input_ids"].dtype == torch.long and bool(batch["attention_mask"].all())
    first_sentinel = VOCAB - 1
    for i, row in enumerate(rows):
        spans, current = {}, None
        for token in batch["labels"][i, :-1].tolist():
            if token > first_sentinel - 100:
                current = spans.setdefault(token, [])
            else:
                current.append(token)
        rebuilt = [t for token in batch["input_ids"][i, :-1].tolist()
                   for t in (spans[token] if token > first_sentinel - 100 else [token])]
        assert rebuilt == loader.tokens[row].tolist()


def test_one_heldout_epoch_serves_every_row_once(data_dir):
    loader = SpanCorruptionBatches(data_dir, "heldout", batch_size=2, seed=0)
    assert sorted(loader.epoch_rows(0).tolist()) == list(range(loader.num_rows))
    served = np.concatenate([loader.batch_rows(s) for s in range(loader.steps_per_epoch)])
    assert len(served) == loader.steps_per_epoch * 2 and len(set(served.tolist())) == len(served)


def test_train_epochs_follow_the_alpha_mixture(data_dir):
    loader = SpanCorruptionBatches(data_dir, "train", batch_size=4, seed=0)
    m = loader.manifest
    available = [m["per_language"][lang]["train_rows"] for lang in m["languages"]]
    wanted = mixture_rows_per_epoch(available, [m["sampling_probabilities"][lang] for lang in m["languages"]])
    assert wanted[1] > available[1] and wanted[0] < available[0]  # hi is up-sampled, en down-sampled
    for epoch in (0, 1):
        rows = loader.epoch_rows(epoch)
        languages = Counter(loader.row_language[rows].tolist())
        assert [languages[0], languages[1]] == wanted
        hi_rows = Counter(rows[loader.row_language[rows] == 1].tolist())
        passes = wanted[1] // available[1]
        assert set(hi_rows.values()) <= {passes, passes + 1} and len(hi_rows) == available[1]
        assert len(set(rows[loader.row_language[rows] == 0].tolist())) == wanted[0]  # en: no repeats
    assert not np.array_equal(loader.epoch_rows(0), loader.epoch_rows(1))


def test_row_subset_and_too_small_data(data_dir):
    loader = SpanCorruptionBatches(data_dir, "train", batch_size=4, seed=0, rows=np.array([5, 6, 7, 8, 9, 10, 11, 12]))
    assert loader.steps_per_epoch == 2
    assert sorted(np.concatenate([loader.batch_rows(0), loader.batch_rows(1)]).tolist()) == list(range(5, 13))
    with pytest.raises(ValueError, match="smaller batch"):
        SpanCorruptionBatches(data_dir, "heldout", batch_size=10_000, seed=0)


def test_batches_feed_t5(data_dir):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                      d_kv=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS)
    model = T5ForConditionalGeneration(config)
    loss = model(**SpanCorruptionBatches(data_dir, "train", batch_size=4, seed=0).batch(0)).loss
    assert torch.isfinite(loss)


def test_a_row_file_of_the_wrong_size_is_named_with_the_fix(data_dir):
    manifest = read_json(data_dir / MANIFEST)
    path = data_dir / "packed" / "train.bin"
    path.write_bytes(path.read_bytes()[:-1])
    expected = f"{path} has .* bytes, but the manifest describes .*truncated.*Fix: .*prepare_data.py"
    for read in (lambda: read_rows(data_dir, "train", manifest), lambda: SpanCorruptionBatches(data_dir, "train", 4, 0)):
        with pytest.raises(ValueError, match=expected):
            read()


def test_recorded_sizes_and_hashes_catch_changed_files(data_dir):
    names = ["packed/train.bin", "packed/train_language.npy"]
    records = file_records(data_dir, names)
    for name in names:
        content = (data_dir / name).read_bytes()
        assert records[name] == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    check_files(data_dir, records, full=True)
    path = data_dir / "packed" / "train.bin"
    content = bytearray(path.read_bytes())
    content[100] ^= 1  # one bit, same size: only the hash sees it
    path.write_bytes(bytes(content))
    check_files(data_dir, records)
    with pytest.raises(ValueError, match=f"{path} does not match the sha256.*Fix:"):
        check_files(data_dir, records, full=True)
    path.write_bytes(bytes(content) + b"\0\0")
    with pytest.raises(ValueError, match=f"{path} has {len(content) + 2} bytes, the manifest records {len(content)}"):
        check_files(data_dir, records)
    with pytest.raises(ValueError, match="records no file sizes and hashes.*Fix:"):
        check_files(data_dir, None, full=True)


def test_out_of_vocabulary_ids_never_reach_a_batch(data_dir):
    loader = SpanCorruptionBatches(data_dir, "train", 4, seed=0)
    rows = loader.batch_rows(3)
    tokens = np.fromfile(data_dir / "packed" / "train.bin", dtype=np.uint16).reshape(loader.num_rows, RAW)
    tokens[rows[2], 5] = VOCAB  # one id past the vocabulary
    tokens.tofile(data_dir / "packed" / "train.bin")
    loader = SpanCorruptionBatches(data_dir, "train", 4, seed=0)
    loader.batch(2)
    with pytest.raises(ValueError, match=f"train.bin: rows \\[{rows[2]}\\] hold token ids up to {VOCAB}, outside the "
                                         f"vocabulary of {VOCAB}.*Fix:"):
        loader.batch(3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        loader.fixed_rows(np.array([rows[2]]))


def test_a_damaged_label_file_is_named(data_dir):
    path = data_dir / "packed" / "train_language.npy"
    path.write_bytes(b"not an array")
    with pytest.raises(ValueError, match=f"{path} cannot be read.*Fix:"):
        SpanCorruptionBatches(data_dir, "train", 4, seed=0)
    np.save(path, np.zeros(3, dtype=np.int16))
    with pytest.raises(ValueError, match=r"holds shape \(3,\), expected"):
        load_array(path, 5)

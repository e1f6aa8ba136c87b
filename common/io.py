"""Atomic file writing and small readers. Every output is written to a temporary file in the same
folder and renamed into place, so an interrupted run never leaves a file that looks complete."""
from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import math
import numbers
import os
import shutil
import tempfile
from io import StringIO
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


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: list[str] | None = None,
              digits: int | None = None, previous: str | None = None) -> int:
    """Write dict rows as a CSV (columns: given, else the first row's keys). Returns the row count.

    `digits` states the precision of a table of measurements: its floats are written with that many
    significant digits, and where a previous version of the file (`previous`, its text; default: the file
    at `path`) has the same columns and row count, a number equal to the previous one at that precision
    keeps the previous text; a file with nothing else changed is not rewritten. So a stage run again, with
    float noise below the stated precision (thread counts, summation order), leaves its tables
    byte-identical, and `git diff` shows what really changed."""
    rows = list(rows)
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    unknown = sorted({key for row in rows for key in row} - set(columns))
    if unknown:
        raise ValueError(f"{path}: rows have fields {unknown} outside the columns {columns}")
    if digits is None:
        texts = None
    else:
        if previous is None and Path(path).is_file():
            previous = read_stored_text(path)
        texts = [[format_cell(row.get(c), digits) for c in columns] for row in rows]
        old = list(csv.reader(StringIO(previous, newline=""))) if previous else []
        if old[:1] == [columns] and len(old) == len(texts) + 1:
            texts = [[o if t == o or same_number(row.get(c), o, digits) else t for c, t, o in zip(columns, new, prior)]
                     for row, new, prior in zip(rows, texts, old[1:])]
            if texts == old[1:]:
                if not (Path(path).is_file() and read_stored_text(path) == previous):
                    with atomic_open(path) as f:  # the previous file was moved away: back as it was
                        f.write(previous)
                return len(rows)
    with atomic_open(path) as f:
        if texts is None:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
            writer.writeheader()
            writer.writerows(rows)
        else:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(texts)
    return len(rows)


def read_stored_text(path: str | os.PathLike) -> str:
    """A text file as stored, line endings included (csv writes \\r\\n; read_text would turn them into \\n)."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def format_cell(value: Any, digits: int) -> str:
    """A CSV cell: floats rounded to `digits` significant digits (written as Python writes floats, so that
    0.0 stays a float for the reader), None empty, anything else as csv writes it."""
    if value is None:
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return repr(float(f"{float(value):.{digits}g}"))
    return str(value)


def same_number(value: Any, text: str, digits: int) -> bool:
    """Whether `value` is a float (or the text of one, as a CSV read back holds it) equal to the number in
    `text` at `digits` significant digits: a relative difference of at most 10^(1 - digits), about one unit
    in the last digit (so that noise across a rounding boundary, 1.0000049 written 1.00000 and 1.0000051
    now, counts as equal). NaN equals NaN. Integers (counts) are equal only when they are the same."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            int(value)
            return False
    elif not isinstance(value, numbers.Real) or isinstance(value, numbers.Integral):
        return False
    try:
        a, b = float(value), float(text)
    except ValueError:
        return False
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= 10.0 ** (1 - digits) * max(abs(a), abs(b))


def keep_equal_numbers(path: str | os.PathLike, previous: str | None, digits: int) -> None:
    """Settle the CSV at `path` (written at full precision, e.g. row by row while a run trains) against the
    text its previous version had: numbers equal at `digits` significant digits get their previous text back
    (write_csv's rule), so that a rerun whose numbers moved only by float noise leaves the file as it was."""
    if previous is None or not Path(path).is_file():
        return
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    write_csv(path, rows, list(reader.fieldnames or []), digits=digits, previous=previous)


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

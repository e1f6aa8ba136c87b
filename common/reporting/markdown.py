"""Markdown helpers for generated results: pipe tables and the marked block of the README that
05_figures/update_readme.py refreshes."""
from __future__ import annotations

BEGIN_MARKER = "<!-- results:begin -->"
END_MARKER = "<!-- results:end -->"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub pipe table; '|' inside cells is escaped so a cell never splits a row."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row needs {len(header)} cells to match the header {header}")
    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows])


def replace_marked_block(text: str, block: str, begin: str = BEGIN_MARKER, end: str = END_MARKER) -> str:
    """`text` with everything between the begin and end markers replaced by `block` (markers kept)."""
    start = text.find(begin)
    stop = text.find(end)
    if start < 0 or stop < 0 or stop < start or text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"expected exactly one {begin!r} followed by one {end!r}. Fix: add the two markers "
                         "on lines of their own where the results belong")
    return text[:start + len(begin)] + "\n" + block.strip("\n") + "\n" + text[stop:]

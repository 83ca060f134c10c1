"""Compare the tables of two built books, page by page: what a refactoring must leave unchanged.

    python scripts/compare_tables.py OLD/book/_build/html NEW/book/_build/html [PAGE ...]

Every ``<table>`` of each chapter page (default: the pages both builds have) is read as rows of
cell texts, in page order, and the two builds are compared cell by cell. Prose (verdict sentences
that were reworded on purpose) is not compared. Prints one line per page and every differing cell;
exits 1 if any table differs, 2 if a page is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bs4 import BeautifulSoup


def page_tables(path: Path) -> list[list[list[str]]]:
    """The page's tables, each a list of rows, each a list of whitespace-normalised cell texts."""
    soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    main = soup.find("main") or soup
    return [[[" ".join(cell.get_text(" ").split()) for cell in row.find_all(["th", "td"])]
             for row in table.find_all("tr")] for table in main.find_all("table")]


def compare(old: list[list[list[str]]], new: list[list[list[str]]]) -> list[str]:
    """Human-readable differences between two pages' tables (empty if identical)."""
    out = []
    if len(old) != len(new):
        out.append(f"{len(old)} tables before, {len(new)} after")
    for t, (a, b) in enumerate(zip(old, new, strict=False)):
        if len(a) != len(b):
            out.append(f"table {t + 1}: {len(a)} rows before, {len(b)} after")
        for r, (row_a, row_b) in enumerate(zip(a, b, strict=False)):
            if row_a != row_b:
                out.append(f"table {t + 1} row {r + 1}: {row_a} -> {row_b}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("pages", nargs="*", help="page names without .html (default: shared)")
    args = parser.parse_args(argv)
    names = args.pages or sorted({p.stem for p in args.old.glob("*.html")}
                                 & {p.stem for p in args.new.glob("*.html")} - {"genindex",
                                                                                "search"})
    status = 0
    for name in names:
        paths = [root / f"{name}.html" for root in (args.old, args.new)]
        if not all(p.exists() for p in paths):
            print(f"{name}: missing in {', '.join(str(p) for p in paths if not p.exists())}")
            status = 2
            continue
        old, new = (page_tables(p) for p in paths)
        diffs = compare(old, new)
        cells = sum(len(row) for table in old for row in table)
        print(f"{name}: {len(old)} tables, {cells} cells: "
              + ("identical" if not diffs else f"{len(diffs)} differences"))
        for line in diffs:
            print("   ", line)
        status = max(status, 1 if diffs else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Formatting shared by the report's markdown sections: numbers, table cells, tables."""

from __future__ import annotations

from typing import Any

NA = "n/a"
DASH = "–"


def fmt(x: Any, digits: int = 2) -> str:
    """A number with thousands separators and ``digits`` decimals (none for integers); n/a."""
    if x is None or isinstance(x, bool):
        return NA
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def cell(text: Any) -> str:
    """Markdown-table-safe text: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table as lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def ids(values) -> str:
    """Expert ids as ``1,2,5``; n/a for none."""
    return ",".join(str(i) for i in values) if values else NA


def yes_no(x: bool | None) -> str:
    return NA if x is None else ("yes" if x else "no")

"""Markdown output shared by the report and the generated docs (docs/cohorts.md)."""

from __future__ import annotations

from typing import Iterable, Sequence


def markdown_table(columns: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """A GitHub Markdown table, one line per list item: header, rule, rows ('|' escaped, newlines as spaces)."""
    def esc(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(esc(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return out

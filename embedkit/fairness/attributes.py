"""What ``--by`` names, the same in `fairness`, `report`, `sweep`, `sql` and `export`: attributes, each sliced on
its own (``sex,age_group``: the sex groups, then the age groups), and cells of two attributes written ``a*b``
(``age_group*sex``: the four age x sex cells, as one attribute).

A cell is a column the SQL views compute (``embedkit/sql/01_predictions_base.sql``); ``a*b`` names it by what it
crosses, in either order.
"""

from __future__ import annotations

from embedkit.fairness.db import FairnessError

CELL_SEPARATOR = "*"
# The crossed attributes of each cell column the views compute -> that column.
CELLS: dict[frozenset[str], str] = {frozenset(("age_group", "sex")): "age_group_sex"}


def parse_by(text: str | None) -> list[str]:
    """``"sex, age_group*sex"`` -> ``["sex", "age_group_sex"]``: attributes in the order given, once each."""
    out: list[str] = []
    for part in (text or "").split(","):
        part = part.strip()
        if CELL_SEPARATOR in part:
            part = _cell(part)
        if part and part not in out:
            out.append(part)
    return out


def _cell(text: str) -> str:
    crossed = [p.strip() for p in text.split(CELL_SEPARATOR)]
    found = CELLS.get(frozenset(crossed)) if len(crossed) == 2 and all(crossed) else None
    if found is None:
        known = ", ".join(CELL_SEPARATOR.join(sorted(k)) for k in CELLS)
        raise FairnessError(f"no cell '{text}': the views compute the cells {known} (two attributes joined by "
                            f"'{CELL_SEPARATOR}'); separate attributes are comma-separated, e.g. sex,age_group")
    return found


def columns_of(attribute: str) -> tuple[str, ...]:
    """The columns of images an attribute is read from: itself, or the two a cell crosses."""
    crossed = next((k for k, name in CELLS.items() if name == attribute), None)
    return tuple(sorted(crossed)) if crossed else (attribute,)

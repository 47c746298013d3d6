"""What ``--by`` names, the same in `fairness`, `report`, `sweep`, `sql` and `export`: attributes, each sliced on
its own (``sex,age_group``: the sex groups, then the age groups), and cells of two or more attributes written
``a*b`` (``age_group*sex``: the four age x sex cells, as one attribute; ``view*sex``, ``age_decade*view*sex``).

``age_group*sex`` (either order) is the column ``age_group_sex`` the SQL views compute
(``embedkit/sql/01_predictions_base.sql``); any other cell is an attribute named ``a*b`` whose group is the
crossed values joined by ``_`` (``PA_M``), computed when the connection is made (embedkit/fairness/db.py), NULL
where any crossed value is.
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
    if not all(crossed) or len(set(crossed)) < len(crossed):
        raise FairnessError(f"no cell '{text}': a cell crosses two or more different attributes joined by "
                            f"'{CELL_SEPARATOR}' (e.g. age_group*sex, view*sex); separate attributes are "
                            "comma-separated, e.g. sex,age_group")
    return CELLS.get(frozenset(crossed)) or CELL_SEPARATOR.join(crossed)


def columns_of(attribute: str) -> tuple[str, ...]:
    """The columns an attribute is read from: itself, or those a cell crosses."""
    crossed = next((k for k, name in CELLS.items() if name == attribute), None)
    return tuple(sorted(crossed)) if crossed else tuple(attribute.split(CELL_SEPARATOR))

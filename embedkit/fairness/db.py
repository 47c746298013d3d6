"""The DuckDB side of the store: every store table registered in process, and the fairness views over them.

The metric definitions live once, in ``embedkit/sql/NN_<name>.sql`` (one view per file, run in filename order; each
file's header says its grain and columns). This module only registers tables, sets the few settings the views read
with ``getvariable`` (each taken from :mod:`embedkit.constants`, so the age boundary is stated once), and fills the
attribute list into the one view that unpivots attributes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from embedkit.constants import AGE_GROUPS, AGE_OLD_FROM, SEXES
from embedkit.errors import EmbedkitError

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"

# Attributes the views slice by unless the caller names others (age_group_sex: the age x sex cells).
DEFAULT_ATTRIBUTES: tuple[str, ...] = ("sex", "age_group", "age_group_sex", "view")
ECE_BINS = 15  # equal-width bins on [0, 1] for the top-label and classwise ECE
CI_LEVEL = 0.95

# Views whose grain is one row per prediction (or more): `embedkit export` leaves these as SQL, not Parquet.
ROW_LEVEL_VIEWS: frozenset[str] = frozenset({"group_rows", "class_scores"})
# Tables the views need; the others found in a store are registered too, for `embedkit sql`.
REQUIRED_TABLES: tuple[str, ...] = ("images", "runs", "predictions")
RESAMPLE_WEIGHTS = "resample_weights"

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VIEW = re.compile(r"CREATE\s+OR\s+REPLACE\s+VIEW\s+([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)


class FairnessError(EmbedkitError):
    pass


def view_files() -> list[Path]:
    """The view definitions, in the order they are created (filename order: views build on earlier views)."""
    return sorted(SQL_DIR.glob("[0-9][0-9]_*.sql"))


def view_names() -> list[str]:
    """Names of the views the SQL files create, in creation order."""
    names = []
    for path in view_files():
        match = _VIEW.search(path.read_text())
        if match:
            names.append(match.group(1))
    return names


def settings_sql() -> str:
    """``SET VARIABLE`` statements for every setting the views read: one place, from embedkit.constants."""
    young, old = AGE_GROUPS
    male, female = SEXES
    values = {
        "age_old_from": str(int(AGE_OLD_FROM)),
        "age_group_young": _quote(young),
        "age_group_old": _quote(old),
        "sex_male": _quote(male),
        "sex_female": _quote(female),
        "ece_bins": str(int(ECE_BINS)),
        "ci_level": repr(float(CI_LEVEL)),
    }
    return "\n".join(f"SET VARIABLE {name} = {value};" for name, value in values.items())


def resample_weights_sql() -> str:
    """The (empty) bootstrap multiplicity table that group_rows joins: no rows means the observed sample only."""
    return (
        f"CREATE OR REPLACE TEMP TABLE {RESAMPLE_WEIGHTS} (replicate INTEGER, attribute VARCHAR, split VARCHAR, "
        "row_id VARCHAR, multiplicity BIGINT);"
    )


def render_views(attributes: Sequence[str]) -> list[tuple[str, str]]:
    """(file name, SQL) of every view, with the attribute list filled in where a file asks for it."""
    columns = ", ".join(_ident(a) for a in attributes)
    casts = ", ".join(f"CAST({_ident(a)} AS VARCHAR) AS {_ident(a)}" for a in attributes)
    out = []
    for path in view_files():
        sql = path.read_text().replace("{{attribute_columns}}", columns).replace("{{attribute_casts}}", casts)
        out.append((path.name, sql))
    return out


def connect(store, attributes: Iterable[str] | None = None):
    """A DuckDB connection with every table of ``store`` registered (Lance datasets, read in place) and the views.

    ``attributes``: the columns to slice by (default: sex, age_group, age_group_sex, view); any column of the
    images table, or of ``predictions_base``, may be named. Raises FairnessError when the store has no predictions.
    """
    names = store.table_names()
    missing = [name for name in REQUIRED_TABLES if name not in names]
    if "predictions" in missing or ("predictions" in names and store.count("predictions") == 0):
        raise FairnessError(
            f"the store {store.path} has no predictions yet: fairness metrics are computed from a run's "
            "predictions. Run a head first (e.g. `embedkit probe` or a zero-shot run), or point --store / "
            "$EMBEDKIT_STORE at the store that holds them."
        )
    if missing:
        raise FairnessError(
            f"the store {store.path} has predictions but no table {', '.join(repr(m) for m in missing)}: "
            "predictions are joined to the images table (demographics) and the runs table (class order). "
            "Import the cohort (`embedkit data ...`) into this store."
        )
    return connect_tables({name: store.dataset(name) for name in names}, attributes)


def connect_tables(tables: Mapping[str, Any], attributes: Iterable[str] | None = None, con=None):
    """Register ``tables`` (name -> Arrow table, pyarrow/Lance dataset or pandas frame) and create the views.

    The path that :func:`connect` takes after opening the store; benchmarks and tests that hold Arrow tables use it
    directly, so the SQL is the same whatever holds the rows.
    """
    import duckdb

    con = con or duckdb.connect()
    for name, data in tables.items():
        if not _NAME.match(name):
            continue  # not addressable in SQL without quoting; embedkit never writes such names
        con.register(name, data)
    create_views(con, attributes)
    return con


def create_views(con, attributes: Iterable[str] | None = None) -> None:
    """Set the settings, create the empty resample_weights table and every view on ``con`` (tables registered)."""
    attributes = _check_attribute_names(attributes)
    con.execute(settings_sql())
    con.execute(resample_weights_sql())
    rendered = render_views(attributes)
    for i, (name, sql) in enumerate(rendered):
        con.execute(sql)
        if i == 0:  # predictions_base exists now: check the attributes against its columns before going on
            _check_attributes_exist(con, attributes)


def _check_attribute_names(attributes: Iterable[str] | None) -> list[str]:
    attrs = list(DEFAULT_ATTRIBUTES if attributes is None else attributes)
    out: list[str] = []
    for a in attrs:
        a = a.strip()
        if not a:
            continue
        if a == "all":
            continue  # always present: the whole split as one group
        if not _NAME.match(a):
            raise FairnessError(f"attribute {a!r} is not a column name (letters, digits and _ only)")
        if a not in out:
            out.append(a)
    if not out:
        raise FairnessError("name at least one attribute to slice by, e.g. sex,age_group")
    return out


def _check_attributes_exist(con, attributes: Sequence[str]) -> None:
    columns = con.sql("DESCRIBE predictions_base").to_arrow_table().column("column_name").to_pylist()
    unknown = [a for a in attributes if a not in columns]
    if unknown:
        usable = [c for c in columns if c not in {"probs", "labels", "weight", "y_true", "y_pred", "confidence",
                                                    "l1_error", "row_id", "unit_id", "run_id"}]
        raise FairnessError(
            f"unknown attribute {', '.join(repr(u) for u in unknown)}: attributes are columns of the images table "
            f"(or computed by the views). Available: {', '.join(usable)}"
        )


def table_names(con) -> list[tuple[str, str]]:
    """(name, kind) of every table and view the connection can query, kind being 'table' or 'view'."""
    rows = con.sql(
        "SELECT table_name, table_type FROM information_schema.tables ORDER BY table_type, table_name"
    ).to_arrow_table().to_pylist()
    return [(r["table_name"], "view" if r["table_type"] == "VIEW" else "table") for r in rows]


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"

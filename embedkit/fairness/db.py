"""The DuckDB side of the store: every store table registered in process, and the fairness views over them.

The metric definitions live once, in ``embedkit/sql/NN_<name>.sql`` (one view per file, run in filename order; each
file's header says its grain and columns). This module only registers tables, sets the few settings the views read
with ``getvariable`` (each taken from :mod:`embedkit.constants`, so the age boundary is stated once), and fills the
attribute list into the one view that unpivots attributes.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from embedkit.constants import AGE_GROUPS, AGE_OLD_FROM, NO_FINDING, SEXES
from embedkit.errors import EmbedkitError

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"

# Attributes the views slice by unless the caller names others (age_group_sex: the age x sex cells).
DEFAULT_ATTRIBUTES: tuple[str, ...] = ("sex", "age_group", "age_group_sex", "view")
ECE_BINS = 15  # equal-width bins on [0, 1] for the top-label and classwise ECE
CI_LEVEL = 0.95

# Views whose grain is one row per prediction (or more): `embedkit export` leaves these as SQL, not Parquet.
ROW_LEVEL_VIEWS: frozenset[str] = frozenset({"group_rows", "class_scores", "label_predictions", "label_group_rows"})
# Tables the views need; the others found in a store are registered too, for `embedkit sql`.
REQUIRED_TABLES: tuple[str, ...] = ("images", "runs", "predictions")
RESAMPLE_WEIGHTS = "resample_weights"
# The stored predictions table is registered under this name; `predictions` is the view of the committed ones.
STORED_PREDICTIONS = "_predictions_stored"

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
        "scope_runs": "NULL",  # every run ...
        "scope_split": "NULL",  # ... and split (see 01_predictions_base.sql)
        "class_scores": "true",  # AUC and classwise ECE on (see 08_class_scores.sql)
        "no_finding": _quote(NO_FINDING),  # the multi-label runs' label of no disease (see 25_underdiagnosis.sql)
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
    # Each attribute is cast to text under its own alias and unpivoted back to its name: group_rows carries columns
    # of its own (correct, split, ...), which an attribute of the same name would otherwise shadow with its type.
    columns = ", ".join(f"{_ident('by:' + a)} AS {_ident(a)}" for a in attributes)
    casts = ", ".join(f"{_as_text(a)} AS {_ident('by:' + a)}" for a in attributes)
    out = []
    for path in view_files():
        sql = path.read_text().replace("{{attribute_columns}}", columns).replace("{{attribute_casts}}", casts)
        out.append((path.name, sql))
    return out


def _as_text(attribute: str) -> str:
    """An attribute's group as text: the column cast, or a cell's (``a*b``) crossed values joined by '_' (NULL when
    any is NULL: ``||`` propagates it)."""
    return " || '_' || ".join(f"CAST({_ident(c)} AS VARCHAR)" for c in attribute.split("*"))


def connect(store, attributes: Iterable[str] | None = None, views: bool = True):
    """A DuckDB connection with every table of ``store`` registered (Lance datasets, read in place) and the views.

    ``attributes``: the columns to slice by (default: sex, age_group, age_group_sex, view); any column of the
    images table, or of ``predictions_base``, may be named. Raises FairnessError when the store has no predictions,
    unless ``views`` is False: then only the tables are registered (ad hoc queries before any run exists).
    """
    names = store.table_names()
    if not views:
        return connect_tables(_open_datasets(store, names), with_views=False)
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
    return connect_tables(_open_datasets(store, names), attributes)


def _open_datasets(store, names: Sequence[str]) -> dict[str, Any]:
    """Each table's current snapshot, ``runs`` first: a run's predictions are committed before its ``runs`` row,
    so every run in the runs snapshot finds all its predictions in the later predictions snapshot."""
    ordered = sorted(names, key=lambda n: n != "runs")
    return {name: store.dataset(name) for name in ordered}


def connect_tables(tables: Mapping[str, Any], attributes: Iterable[str] | None = None, con=None,
                   with_views: bool = True):
    """Register ``tables`` (name -> Arrow table, pyarrow/Lance dataset or pandas frame) and create the views.

    The path that :func:`connect` takes after opening the store; benchmarks and tests that hold Arrow tables use it
    directly, so the SQL is the same whatever holds the rows.

    ``predictions`` is registered as ``_predictions_stored`` and seen through the view ``predictions``: the rows of
    runs that have a ``runs`` row (the commit marker; see embedkit/store/store.py). Leftovers of a writer killed
    between its two commits are invisible to every view, to ``embedkit sql`` and to ``export``.
    """
    import duckdb

    con = con or duckdb.connect()
    for name, data in tables.items():
        if not _NAME.match(name):
            continue  # not addressable in SQL without quoting; embedkit never writes such names
        con.register(STORED_PREDICTIONS if name == "predictions" else name, data)
    if "predictions" in tables:
        committed = "WHERE run_id IN (SELECT run_id FROM runs)" if "runs" in tables else "WHERE false"
        con.execute(f"CREATE OR REPLACE TEMP VIEW predictions AS SELECT * FROM {STORED_PREDICTIONS} {committed}")
    if with_views:
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


@contextmanager
def scoped(con, run_ids: Sequence[str] | None = None, split: str | None = None, class_scores: bool = True):
    """Restrict every view to ``run_ids`` and ``split`` (and with ``class_scores=False`` skip AUC and classwise ECE)
    for the duration of the block; the settings are restored afterwards."""
    runs = "NULL" if run_ids is None else "[" + ", ".join(_quote(r) for r in run_ids) + "]::VARCHAR[]"
    con.execute(f"SET VARIABLE scope_runs = {runs}")
    con.execute(f"SET VARIABLE scope_split = {'NULL' if split is None else _quote(split)}")
    con.execute(f"SET VARIABLE class_scores = {'true' if class_scores else 'false'}")
    try:
        yield con
    finally:
        con.execute("SET VARIABLE scope_runs = NULL")
        con.execute("SET VARIABLE scope_split = NULL")
        con.execute("SET VARIABLE class_scores = true")


# Statement kinds `embedkit sql` refuses whatever the settings: they write files, attach databases or load code.
_REFUSED_STATEMENTS = {"COPY": "COPY reads or writes files", "COPY_DATABASE": "COPY DATABASE writes files",
                       "EXPORT": "EXPORT DATABASE writes files", "ATTACH": "ATTACH opens another database",
                       "DETACH": "DETACH changes the attached databases",
                       "LOAD": "INSTALL / LOAD add extensions (and fetch them over the network)"}


def lock_down(con, allow_read: Sequence[str | Path] = ()) -> None:
    """Make ``con`` read-only towards the host: no file or network access by DuckDB itself (the store's tables are
    registered Python objects and stay readable), except reading the paths in ``allow_read``; settings locked."""
    dirs = [str(Path(p).resolve()) + "/" for p in allow_read if Path(p).is_dir()]
    files = [str(Path(p).resolve()) for p in allow_read if not Path(p).is_dir()]
    if dirs:
        con.execute("SET allowed_directories = $d", {"d": dirs})
    if files:
        con.execute("SET allowed_paths = $f", {"f": files})
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def check_read_only(sql: str) -> None:
    """Raise FairnessError, naming the statement, when ``sql`` holds a statement that writes files, attaches a
    database or loads an extension (`embedkit export` is the way to write files)."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error:
        return  # a syntax error: DuckDB's own message says where, when the query runs
    for statement in statements:
        kind = str(statement.type).rsplit(".", 1)[-1]
        if kind in _REFUSED_STATEMENTS:
            raise FairnessError(f"refused: {_REFUSED_STATEMENTS[kind]}; `embedkit sql` is read-only "
                                "(write files with `embedkit export --parquet DIR`)")


def _check_attribute_names(attributes: Iterable[str] | None) -> list[str]:
    attrs = list(DEFAULT_ATTRIBUTES if attributes is None else attributes)
    out: list[str] = []
    for a in attrs:
        a = a.strip()
        if not a:
            continue
        if a == "all":
            continue  # always present: the whole split as one group
        if not all(_NAME.match(c) for c in a.split("*")):
            raise FairnessError(f"attribute {a!r} is not a column name (letters, digits and _ only) or a cell of "
                                "them joined by '*'")
        if a not in out:
            out.append(a)
    if not out:
        raise FairnessError("name at least one attribute to slice by, e.g. sex,age_group")
    return out


# A number attribute with more distinct values than this is continuous: each value would be a group of its own.
MAX_NUMBER_GROUPS = 10
_NUMBER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT",
                 "FLOAT", "DOUBLE", "DECIMAL")


def _check_attributes_exist(con, attributes: Sequence[str]) -> None:
    described = con.sql("DESCRIBE predictions_base").to_arrow_table().to_pylist()
    columns = [d["column_name"] for d in described]
    crossed = list(dict.fromkeys(c for a in attributes for c in a.split("*")))  # a cell's columns, in its place
    unknown = [a for a in crossed if a not in columns]
    if unknown:
        usable = [c for c in columns if c not in {"probs", "labels", "weight", "y_true", "y_pred", "confidence",
                                                    "l1_error", "row_id", "unit_id", "run_id"}]
        raise FairnessError(
            f"unknown attribute {', '.join(repr(u) for u in unknown)}: attributes are columns of the images table "
            f"(or computed by the views). Available: {', '.join(usable)}"
        )
    types = {d["column_name"]: d["column_type"] for d in described}
    for a in crossed:
        if not types[a].startswith(_NUMBER_TYPES):
            continue
        distinct = con.sql(f"SELECT count(DISTINCT {_ident(a)}) FROM predictions_base").fetchall()[0][0]
        if distinct > MAX_NUMBER_GROUPS:
            instead = (f"slice by age_group (old from {AGE_OLD_FROM}) or the cells age_group*sex" if a == "age"
                       else "slice by a column with a few values, or bin this one in the manifest")
            raise FairnessError(
                f"--by {a}: '{a}' is a number with {distinct} distinct values, and each would be a group of its own "
                f"(more than {MAX_NUMBER_GROUPS}): {instead}")


def table_names(con) -> list[tuple[str, str]]:
    """(name, kind) of everything the connection can query: kind 'table' (store tables, registered in place, and
    resample_weights) or 'view' (the fairness views), tables first."""
    names = con.sql("SELECT DISTINCT table_name FROM information_schema.tables").to_arrow_table()
    views = set(view_names())
    rows = [(n, "view" if n in views else "table") for n in names.column("table_name").to_pylist()]
    return sorted(rows, key=lambda r: (r[1] != "table", r[0]))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def scored_runs(
    store,
    run_ids: Sequence[str] | None = None,
    model: str | None = None,
    method: str | None = None,
    split: str = "test",
) -> list[dict]:
    """The runs (run_id, model, method, weights_id, n) that match (:func:`embedkit.store.runs.select_runs`) and have
    predictions on ``split`` (n of them), oldest first.

    Raises FairnessError naming what exists when nothing matches.
    """
    from embedkit.store.runs import prediction_counts, select_runs

    selected = select_runs(store, run_ids, [model] if model else None, [method] if method else None).to_pylist()
    counts = prediction_counts(store, [r["run_id"] for r in selected])
    rows = [{"run_id": r["run_id"], "model": r["model"], "method": r["method"], "weights_id": r["weights_id"],
             "n": counts[r["run_id"]][split]}
            for r in selected if counts.get(r["run_id"], {}).get(split)]
    if rows:
        return rows
    known = sorted(select_runs(store).to_pylist(), key=lambda r: r["run_id"])[:20]
    splits = prediction_counts(store, [r["run_id"] for r in known])
    wanted = ", ".join(
        f"{k}={v!r}" for k, v in (("run", run_ids), ("model", model), ("method", method), ("split", split)) if v
    )
    listing = "; ".join(f"{r['run_id']} ({r['model']}/{r['method']}, splits {sorted(splits.get(r['run_id'], {}))})"
                        for r in known)
    raise FairnessError(
        f"no run with predictions matches {wanted}. Runs in the store: {listing or 'none'}. "
        "Pick one with --run, or --model/--method, and a split it was scored on (--split)."
    )


def export_parquet(con, directory: str | Path, attributes: Iterable[str] | None = None) -> list[Path]:
    """Write the store's tables (those without vectors) and the views as Parquet, plus ``views.sql``.

    Layout: ``tables/<name>.parquet``, ``views/<name>.parquet`` (every view but the row x attribute ones, which are
    only SQL: group_rows, class_scores), and ``views.sql``, which recreates the tables as views over the Parquet
    files and every view over them, for the DuckDB CLI (run it from ``directory``), or read the Parquet from pandas
    or R. Returns the files written.
    """
    attributes = _check_attribute_names(attributes)
    out = Path(directory)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "views").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    views = set(view_names())
    tables = [
        name for name, kind in table_names(con)
        if name not in views and name != RESAMPLE_WEIGHTS and not name.startswith("_")
        and not _has_vector(con, name)
    ]
    for name in tables:
        path = out / "tables" / f"{name}.parquet"
        con.execute(f"COPY (SELECT * FROM {_ident(name)}) TO {_quote(str(path))} (FORMAT parquet)")
        written.append(path)
    for name in view_names():
        if name in ROW_LEVEL_VIEWS:
            continue
        path = out / "views" / f"{name}.parquet"
        con.execute(f"COPY (SELECT * FROM {_ident(name)}) TO {_quote(str(path))} (FORMAT parquet)")
        written.append(path)
    script = out / "views.sql"
    script.write_text(views_script(tables, attributes))
    written.append(script)
    return written


def views_script(tables: Sequence[str], attributes: Sequence[str]) -> str:
    """A DuckDB script recreating ``tables`` as views over ``tables/<name>.parquet`` and every fairness view."""
    lines = [
        "-- embedkit fairness views over the Parquet files beside this script.",
        "-- Run from this directory: duckdb -c '.read views.sql' (or con.execute(open('views.sql').read()) in Python).",
        f"-- Attributes sliced by: {', '.join(attributes)}.",
        settings_sql(),
        resample_weights_sql(),
    ]
    for name in tables:
        lines.append(
            f"CREATE OR REPLACE VIEW {_ident(name)} AS SELECT * FROM read_parquet({_quote(f'tables/{name}.parquet')});"
        )
    for _, sql in render_views(attributes):
        lines.append(sql.rstrip())
    return "\n".join(lines) + "\n"


def _has_vector(con, name: str) -> bool:
    types = con.sql(f"DESCRIBE {_ident(name)}").to_arrow_table().to_pylist()
    return any(t["column_name"] == "vector" for t in types)

"""The store: a LanceDB directory holding every table embedkit writes.

Writers go through :class:`Store` so that keys, schemas and atomicity rules live in one place:
- ``upsert`` merges on key columns (re-running an import or embedding never duplicates rows);
- a run's predictions are written before its ``runs`` row, so a run that is visible is complete;
- an embeddings table refuses vectors of a different width with a message naming both widths.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from embedkit.constants import DEFAULT_STORE, STORE_ENV
from embedkit.errors import EmbedkitError
from embedkit.store import schemas


class StoreError(EmbedkitError):
    pass


def resolve_store_path(path: str | Path | None = None) -> Path:
    """The store directory: an explicit path, else $EMBEDKIT_STORE, else ./embedkit-store."""
    return Path(path or os.environ.get(STORE_ENV) or DEFAULT_STORE)


def embeddings_table(model: str) -> str:
    return "emb_" + model.replace("-", "_")


def prompts_table(model: str) -> str:
    return "prompts_" + model.replace("-", "_")


def vector_width(schema: pa.Schema) -> int:
    return schema.field("vector").type.list_size


def new_run_id(method: str) -> str:
    return f"{method}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _sql_quote(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def sql_in(column: str, values: Iterable[str]) -> str:
    """A Lance filter ``column IN (...)`` with quoted values."""
    return f"{column} IN ({', '.join(_sql_quote(v) for v in values)})"


def sql_eq(column: str, value: str) -> str:
    return f"{column} = {_sql_quote(value)}"


class Store:
    """A LanceDB directory. Opening does not create it; the first write does."""

    def __init__(self, path: str | Path | None = None):
        self.path = resolve_store_path(path)
        self._db = None

    @property
    def db(self):
        if self._db is None:
            import lancedb

            self._db = lancedb.connect(str(self.path))
        return self._db

    # ---- generic table operations -------------------------------------------------------------
    def table_names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name[: -len(".lance")] for p in self.path.glob("*.lance") if p.is_dir())

    def has(self, name: str) -> bool:
        # The store is a local directory; each table is <name>.lance inside it.
        return (self.path / f"{name}.lance").is_dir()

    def open(self, name: str):
        if not self.has(name):
            raise StoreError(f"table '{name}' does not exist in the store {self.path}")
        return self.db.open_table(name)

    def _open_or_create(self, name: str, schema: pa.Schema):
        if self.has(name):
            table = self.db.open_table(name)
            self._check_width(name, table.schema, schema)
            return table
        return self.db.create_table(name, schema=schema, exist_ok=True)

    def check_vector_width(self, name: str, schema: pa.Schema) -> None:
        """Raise before any work when table ``name`` exists with vectors of another width than ``schema``'s."""
        if self.has(name):
            self._check_width(name, self.open(name).schema, schema)

    @staticmethod
    def _check_width(name: str, existing: pa.Schema, wanted: pa.Schema) -> None:
        if "vector" in wanted.names and "vector" in existing.names:
            have, want = vector_width(existing), vector_width(wanted)
            if have != want:
                raise StoreError(
                    f"table '{name}' holds vectors of width {have}, but these vectors have width {want}. "
                    f"Embeddings of different widths cannot share a table: use the model that wrote it, "
                    f"or drop the table (embedkit sql / a new --store)."
                )

    def upsert(self, name: str, data: pa.Table, keys: list[str], schema: pa.Schema) -> None:
        """Insert rows of ``data`` or replace the rows with the same ``keys``; one atomic commit."""
        if data.num_rows == 0:
            return
        data = data.select(schema.names).cast(schema)
        table = self._open_or_create(name, schema)
        table.merge_insert(keys).when_matched_update_all().when_not_matched_insert_all().execute(data)

    def append(self, name: str, data: pa.Table, schema: pa.Schema) -> None:
        """Append rows in one atomic commit (a killed process leaves either all of them or none)."""
        if data.num_rows == 0:
            return
        data = data.select(schema.names).cast(schema)
        self._open_or_create(name, schema).add(data)

    def read(self, name: str, where: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """Read a table (optionally filtered and projected); an absent table raises StoreError."""
        ds = self.open(name).to_lance()
        return ds.to_table(filter=where, columns=columns)

    def count(self, name: str, where: str | None = None) -> int:
        return self.open(name).count_rows(where) if self.has(name) else 0

    def delete(self, name: str, where: str) -> None:
        if self.has(name):
            self.open(name).delete(where)

    def dataset(self, name: str):
        """The table as a pyarrow-compatible Lance dataset (for DuckDB; filters are pushed down)."""
        return self.open(name).to_lance()

    # ---- runs and predictions -----------------------------------------------------------------
    def write_run(self, run: dict, predictions: pa.Table) -> str:
        """Record a finished run: predictions first, then the ``runs`` row that makes them visible."""
        row = {name: run.get(name) for name in schemas.RUNS.names}
        row["created_at"] = row["created_at"] or datetime.now(timezone.utc)
        for key in ("config", "metrics"):
            if not isinstance(row[key], str):
                row[key] = json.dumps(row[key] or {}, sort_keys=True)
        if row["run_id"] is None:
            raise StoreError("a run needs a run_id")
        self.delete("predictions", sql_eq("run_id", row["run_id"]))  # leftovers of a killed attempt
        self.append("predictions", predictions, schemas.PREDICTIONS)
        self.append("runs", pa.Table.from_pylist([row], schema=schemas.RUNS), schemas.RUNS)
        return row["run_id"]

    def delete_run(self, run_id: str) -> None:
        """Delete a run and its predictions (the run row first, so no half-deleted run stays visible)."""
        if not self.count("runs", sql_eq("run_id", run_id)):
            raise StoreError(f"no run '{run_id}' in {self.path}")
        self.delete("runs", sql_eq("run_id", run_id))
        self.delete("predictions", sql_eq("run_id", run_id))

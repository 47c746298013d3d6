"""`embedkit doctor`: find, and with ``repair`` remove, what an interrupted or racing writer left in a store.

What it looks for (each a :class:`Finding`):
- orphan predictions: rows whose run has no ``runs`` row (a writer killed between its two commits, or a store
  written before run commits were journalled). Invisible to every view already; repair deletes them.
- duplicate vectors: two rows for one (row_id, weights_id) in an embeddings table (two passes at once, before
  passes took a lock). Heads refuse such a slice; repair keeps one copy of each.
- stale copies: embeddings tables of the older layout carry label, split and demographic columns beside the
  vectors. Nothing reads them (heads join ``images``); the count of rows where they disagree with ``images``
  says how stale they are, and repair drops the columns.
- duplicate runs: two ``runs`` rows with one run_id. Repair keeps the first.
- missing data files: a table's current version lists a data file that is not on disk (deleted or moved by
  hand). Its rows are gone and every read of the table fails; nothing repairs that, so the finding says how to
  rebuild the table, and the other checks skip it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from embedkit.store.store import CORE_TABLES, RUN_COMMIT_WAIT_S, Store, sql_in

STALE_COLUMNS = ("label", "age", "age_group", "sex", "view", "patient_id", "split")


@dataclass
class Finding:
    kind: str  # orphan_predictions | duplicate_vectors | stale_copies | duplicate_runs | missing_data_file
    table: str
    rows: int
    detail: str
    repaired: bool = False

    @property
    def repairable(self) -> bool:
        """Whether ``--repair`` removes it (a lost data file's rows are gone: only a rebuild brings them back)."""
        return self.kind != "missing_data_file"

    def line(self) -> str:
        state = " (repaired)" if self.repaired else ""
        return f"{self.kind}: {self.table}: {self.rows} rows; {self.detail}{state}"


def examine(store: Store, repair: bool = False) -> list[Finding]:
    """Every finding in ``store`` (repaired when ``repair``); an empty list means the store is sound."""
    findings = [Finding("missing_data_file", table, rows, f"{file} is not on disk: {_rebuild(table)}")
                for table, file, rows in store.missing_data_files()]
    damaged = {f.table for f in findings}
    if not damaged & {"runs", "predictions"}:
        findings += _runs_and_predictions(store, repair)
    for name in store.table_names():
        if name.startswith("emb_") and name not in damaged:
            findings += _embeddings(store, name, repair)
    return findings


def _rebuild(table: str) -> str:
    """How to get a table whose rows are lost back: what wrote it, run again, or a backup of what nothing rebuilds."""
    if table.startswith(("emb_", "prompts_", "localsim_", "embedding_settings")):
        return (f"drop it (`embedkit doctor --drop-table {table}`) and run `embedkit embed` again (embedding "
                "tables are rebuilt from the images)")
    if table in CORE_TABLES:
        return (f"restore the store from a backup, or drop it (`embedkit doctor --drop-table {table} --yes`: "
                f"{CORE_TABLES[table]}) and rebuild it")
    return f"drop it (`embedkit doctor --drop-table {table}`) and rerun the command that wrote it"


def _runs_and_predictions(store: Store, repair: bool) -> list[Finding]:
    found: list[Finding] = []
    if not store.has("predictions"):
        return found
    runs = store.read("runs", columns=["run_id"])["run_id"] if store.has("runs") else pa.array([], pa.string())
    ids = pc.value_counts(runs)
    dupes = [d["values"] for d in ids.to_pylist() if d["counts"] > 1]
    stored = store.read("predictions", columns=["run_id"])["run_id"]
    orphan_mask = pc.invert(pc.is_in(stored, value_set=pa.array(runs.to_pylist(), pa.string())))
    orphans = sorted(set(pc.filter(stored, orphan_mask).to_pylist()))
    if orphans:
        n = int(pc.sum(orphan_mask).as_py())
        found.append(Finding("orphan_predictions", "predictions", n,
                             f"{len(orphans)} runs never committed (e.g. {orphans[0]}); invisible to every view"))
    if dupes:
        found.append(Finding("duplicate_runs", "runs", len(dupes), f"run ids recorded twice, e.g. {dupes[0]}"))
    if repair and (orphans or dupes):
        with store.lock("runs", wait_s=RUN_COMMIT_WAIT_S, holder="embedkit doctor --repair"):
            if orphans:
                store.delete("predictions", sql_in("run_id", orphans))
            for run_id in dupes:
                first = store.read("runs", sql_in("run_id", [run_id])).slice(0, 1)
                store.delete("runs", sql_in("run_id", [run_id]))
                store.append("runs", first, first.schema)
            store._recover_journal()
        for f in found:
            f.repaired = True
    return found


def _embeddings(store: Store, name: str, repair: bool) -> list[Finding]:
    found: list[Finding] = []
    keys = store.read(name, columns=["row_id", "weights_id", "cohort", "model"])
    frame = keys.to_pandas()
    counts = frame.groupby(["row_id", "weights_id"]).size()
    dupes = counts[counts > 1]
    if len(dupes):
        found.append(Finding("duplicate_vectors", name, int(dupes.sum() - len(dupes)),
                             f"{len(dupes)} rows have more than one vector; heads refuse these slices"))
        if repair:
            _dedupe_vectors(store, name, frame, dupes)
            found[-1].repaired = True
    stale = [c for c in STALE_COLUMNS if c in store.open(name).schema.names]
    if stale:
        differ = _stale_rows(store, name, stale)
        found.append(Finding("stale_copies", name, differ,
                             f"columns {', '.join(stale)} copy `images` (older layout; never read): {differ} rows "
                             "disagree with it"))
        if repair:
            store.open(name).drop_columns(stale)
            found[-1].repaired = True
    return found


def _dedupe_vectors(store: Store, name: str, frame, dupes) -> None:
    """Keep the first vector of each duplicated (row_id, weights_id), slice by slice under the slice's lock."""
    dup_keys = frame.set_index(["row_id", "weights_id"]).loc[dupes.index].reset_index()
    for (weights_id, cohort), part in dup_keys.groupby(["weights_id", "cohort"]):
        model = str(part["model"].iloc[0])
        with store.embedding_lock(model, str(weights_id), str(cohort)):
            where = f"weights_id = '{weights_id}' AND " + sql_in("row_id", sorted(set(part["row_id"])))
            rows = store.read(name, where)
            first = pc.equal(_first_occurrence(rows["row_id"].to_pylist()), True)
            keep = rows.filter(first)
            schema = store.open(name).schema
            store.delete(name, where)
            store.append(name, keep, schema)


def _first_occurrence(values: list) -> pa.Array:
    seen: set = set()
    out = []
    for v in values:
        out.append(v not in seen)
        seen.add(v)
    return pa.array(out)


def _stale_rows(store: Store, name: str, columns: list[str]) -> int:
    """Rows of ``name`` whose copied columns differ from ``images`` (rows missing there count too)."""
    copies = store.read(name, columns=["row_id", *columns]).to_pandas().set_index("row_id")
    if not store.has("images"):
        return len(copies)
    truth = store.read("images", columns=["row_id", *columns]).to_pandas().drop_duplicates("row_id")
    truth = truth.set_index("row_id").reindex(copies.index)
    differ = ~((copies == truth) | (copies.isna() & truth.isna())).all(axis=1)
    return int(differ.sum())

"""The store: a LanceDB directory holding every table embedkit writes.

Writers go through :class:`Store` so that keys, schemas and atomicity rules live in one place:
- ``upsert`` merges on key columns (re-running an import or embedding never duplicates rows);
- runs are committed as a unit (:meth:`Store.write_runs`): the ``runs`` row is the commit marker. A run's
  predictions are appended first (one Lance commit), its ``runs`` rows second (one more); every reader joins
  predictions to ``runs`` (embedkit/fairness/db.py registers ``predictions`` as that join), so predictions
  without a run are invisible. Lance cannot commit two tables at once, and a marker costs one commit where a
  transaction table would cost a third. A journal entry (``_journal/<id>.json``, written before the first commit
  and removed after the last) names the runs in flight, so the next run commit, or ``embedkit doctor``, deletes
  the predictions a killed or failed writer left, and only those;
- writers that must not interleave take a lock file under ``_locks/`` (``flock``: released when the process
  dies, however it dies): run commits wait for each other, a second embedding pass of the same model is refused;
- an embeddings table refuses vectors of a different width with a message naming both widths.

The store may live on object storage (``s3://bucket/prefix``): the tables are the same Lance datasets, and the
locks and the journal are objects written with S3 conditional requests (:mod:`embedkit.store.objectstore`, which
states what that guarantees).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import signal
import time
import uuid
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from embedkit.constants import DEFAULT_STORE, STORE_ENV
from embedkit.errors import EmbedkitError
from embedkit.store import schemas
from embedkit.store.objectstore import StoreURI, is_object_store


class StoreError(EmbedkitError):
    pass


class StoreBusy(StoreError):
    """Another process holds a lock this write needs."""


_WRITE_REFUSALS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                   errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied"}
_WRITE_FIXES = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
                errno.EROFS: "copy the store to a writable file system (or remount it read-write)",
                errno.EACCES: "fix the permissions"}
LOCKS_DIR = "_locks"
JOURNAL_DIR = "_journal"
RUN_COMMIT_WAIT_S = 120.0  # a run commit takes milliseconds to seconds; waiting longer means a stuck writer
# Tables that hold what nothing else can rebuild (the cohorts, the runs, where weights came from, the studies):
# dropping one takes an explicit yes. Embeddings, prompts and local similarities are rebuilt by `embedkit embed`.
CORE_TABLES: dict[str, str] = {
    "images": "the cohorts: every view and head reads them",
    "runs": "the runs; their predictions go with them",
    "predictions": "every run's predictions; the runs go with them",
    "weights": "where each model's weights came from",
    "studies": "the studies and their settings",
}

LOGS_DIR = "_logs"  # the CLI's "this is a bug" tracebacks (embedkit/cli.py); not store content
# Fault injection for the crash tests (tests/test_store_faults.py): with EMBEDKIT_FAULT="kill:N" the process
# SIGKILLs itself at the N-th fault point, with "enospc:N" that point raises "No space left on device", with
# "erofs:N" "Read-only file system" (a read-only store where the tests run as root, whom chmod does not stop), with
# "bug:N" it raises an exception no code expects (the CLI's "this is a bug" path, tests/hostile_store.py).
# Every table write is preceded and followed by a fault point, so N = 1, 2, ... visits every gap between two writes.
FAULT_ENV = "EMBEDKIT_FAULT"
_fault_count = 0
_INJECTED = {"enospc": errno.ENOSPC, "erofs": errno.EROFS}


def _lock_holder(fd: int) -> str:
    """Who holds a lock, as its holder wrote it: a holder writes its line just after taking the lock, so an empty
    file is read again for a moment before saying only "another process"."""
    for _ in range(25):
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.02)
    return "another process"


def _fault_point() -> None:
    global _fault_count
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _fault_count += 1
    kind, _, at = spec.partition(":")
    if _fault_count == int(at or 0):
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "bug":
            raise RuntimeError(f"injected bug at fault point {at}")
        code = _INJECTED[kind]
        raise OSError(code, f"{_WRITE_REFUSALS[code]} (injected at fault point {at})")


def resolve_store_path(path: str | Path | None = None) -> Path | StoreURI:
    """The store directory: an explicit path, else $EMBEDKIT_STORE, else ./embedkit-store; an ``s3://`` location
    stays a URI (:class:`~embedkit.store.objectstore.StoreURI`)."""
    location = path or os.environ.get(STORE_ENV) or DEFAULT_STORE
    return StoreURI(location) if is_object_store(location) else Path(location)


# How Lance, pyarrow and DuckDB each word a table's data file gone from disk (DuckDB drops the leading '/').
_MISSING_FILE = re.compile(r"Not found: /?(?P<path>[^\s,]*?(?P<table>[^/\s,]+)\.lance/data/(?P<file>[^/\s,]+\.lance))")


def missing_data_file(exc: BaseException) -> StoreError | None:
    """The one-line error for an exception that says a table's data file is gone (deleted or moved by hand; the
    table's manifest still lists it), whoever raised it; None for any other exception. Reads write nothing, so
    nothing was changed."""
    match = _MISSING_FILE.search(str(exc))
    if match is None:
        return None
    store = Path("/" + match["path"].lstrip("/")).parent.parent.parent  # Lance names files by absolute path
    return StoreError(f"table '{match['table']}' in the store {store} is missing its data file data/{match['file']} "
                      f"(deleted or moved): nothing was changed; `embedkit --store {store} doctor` lists the damaged "
                      "tables and how to rebuild them")


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
        self._objects = None
        if not self.remote and self.path.exists() and not self.path.is_dir():
            raise StoreError(f"the store {self.path} is a file, not a folder: point --store / ${STORE_ENV} at a "
                             "folder (a new one is created on the first write)")
        self._db = None

    @property
    def remote(self) -> bool:
        """On object storage (``s3://``), not a local folder."""
        return isinstance(self.path, StoreURI)

    @property
    def objects(self):
        """The object operations of a remote store (locks, journal): :class:`~embedkit.store.objectstore.Objects`."""
        if self._objects is None:
            from embedkit.store.objectstore import Objects

            self._objects = Objects(self.path)
        return self._objects

    def require_local(self, what: str) -> "Store":
        """This store, or StoreError when it is on object storage and ``what`` needs a local folder."""
        if self.remote:
            raise StoreError(f"{what} needs a store on a local disk, and {self.path} is on object storage; on an "
                             "object store embedkit runs data import, embed, probe, sweep, fairness, sql, export and "
                             "report (docs/scaleout.md)")
        return self

    def require(self) -> "Store":
        """This store, or StoreError when it does not exist yet (no folder, or a folder without tables): a reader
        would otherwise answer as if it were empty."""
        if not self.table_names():
            state = ("no tables under that prefix" if self.remote else "the folder does not exist"
                     if not self.path.exists() else "the folder holds no tables")
            raise StoreError(f"no store at {self.path} ({state}): create one with `embedkit data import MANIFEST "
                             f"--images DIR --cohort NAME` or `embedkit demo`, or point --store / ${STORE_ENV} at "
                             "an existing one")
        return self

    def missing_data_files(self) -> list[tuple[str, str, int]]:
        """(table, data file, rows) for each data file a table's current version lists that is not on disk."""
        import lance

        missing = []
        if self.remote:  # Lance reports a missing object itself when it is read; nothing to stat here
            return missing
        for name in self.table_names():
            folder = self.path / f"{name}.lance"
            for fragment in lance.dataset(str(folder)).get_fragments():
                for data_file in fragment.data_files():
                    if not (folder / "data" / data_file.path).is_file():
                        missing.append((name, f"data/{data_file.path}", fragment.metadata.physical_rows))
        return missing

    @property
    def db(self):
        if self._db is None:
            import lancedb

            if self.remote:
                from embedkit.store.objectstore import storage_options

                self._db = lancedb.connect(str(self.path), storage_options=storage_options())
            else:
                self._db = lancedb.connect(str(self.path))
        return self._db

    # ---- generic table operations -------------------------------------------------------------
    def table_names(self) -> list[str]:
        if self.remote:
            return self._remote_table_names()
        if not self.path.is_dir():
            return []
        return sorted(p.name[: -len(".lance")] for p in self.path.glob("*.lance") if p.is_dir())

    def has(self, name: str) -> bool:
        # A local store is a directory; each table is <name>.lance inside it.
        if self.remote:
            return name in self._remote_table_names()
        return (self.path / f"{name}.lance").is_dir()

    def _remote_table_names(self) -> list[str]:
        names, token = [], None
        try:
            while True:
                page = self.db.list_tables(page_token=token)
                names += list(page.tables)
                token = page.page_token
                if not token:
                    return sorted(names)
        except (OSError, RuntimeError, ValueError) as exc:
            raise StoreError(f"cannot list the tables of the store {self.path}: "
                             f"{' '.join(str(exc).split())[:300]}; check the bucket and the AWS_* settings "
                             "(AWS_ENDPOINT_URL for an S3-compatible server)") from None

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

    def ensure_table(self, name: str, schema: pa.Schema) -> None:
        """Create table ``name`` empty when it does not exist (a sharded pass writes fragments into its folder)."""
        with self._writing(name):
            self._open_or_create(name, schema)

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
                    f"drop the table (`embedkit doctor --drop-table {name}`) or use a new --store."
                )

    def upsert(self, name: str, data: pa.Table, keys: list[str], schema: pa.Schema) -> None:
        """Insert rows of ``data`` or replace the rows with the same ``keys``; one atomic commit."""
        if data.num_rows == 0:
            return
        data = data.select(schema.names).cast(schema)
        with self._writing(name):
            table = self._open_or_create(name, schema)
            _fault_point()
            table.merge_insert(keys).when_matched_update_all().when_not_matched_insert_all().execute(data)
            _fault_point()

    def append(self, name: str, data: pa.Table, schema: pa.Schema) -> None:
        """Append rows in one atomic commit (a killed process leaves either all of them or none)."""
        if data.num_rows == 0:
            return
        data = data.select(schema.names).cast(schema)
        with self._writing(name):
            table = self._open_or_create(name, schema)
            for f in table.schema:  # a table of an older layout: its extra (nullable) columns get nulls
                if f.name not in data.schema.names:
                    data = data.append_column(f, pa.nulls(data.num_rows, f.type))
            _fault_point()
            table.add(data)
            _fault_point()

    def read(self, name: str, where: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """Read a table (optionally filtered and projected); an absent table raises StoreError."""
        ds = self.open(name).to_lance()
        return ds.to_table(filter=where, columns=columns)

    def count(self, name: str, where: str | None = None) -> int:
        return self.open(name).count_rows(where) if self.has(name) else 0

    def delete(self, name: str, where: str) -> None:
        if self.has(name):
            with self._writing(name):
                _fault_point()
                self.open(name).delete(where)
                _fault_point()

    def drop_table(self, name: str, core: bool = False) -> list[str]:
        """Drop table ``name``; returns the tables dropped. ``runs`` and ``predictions`` go together (a run is its
        row and its predictions). A core table (:data:`CORE_TABLES`) needs ``core=True``; an unknown name raises.

        Dropping waits for run commits (the ``runs`` lock) and refuses while an embedding pass of the table's model
        holds its lock, so no writer sees its table vanish half way.
        """
        names = self.table_names()
        if name not in names:
            raise StoreError(f"no table '{name}' in {self.path}; its tables: {', '.join(names) or 'none'}")
        if name in CORE_TABLES and not core:
            raise StoreError(f"'{name}' is a core table ({CORE_TABLES[name]}): nothing rebuilds it. "
                             f"Pass --yes to drop it anyway")
        tables = [t for t in ("predictions", "runs") if t in names] if name in ("runs", "predictions") else [name]
        with ExitStack() as held:
            if name in ("runs", "predictions"):
                held.enter_context(self.lock("runs", wait_s=RUN_COMMIT_WAIT_S, holder=f"dropping table {name}"))
            for lock in self._embedding_locks_of(name):
                held.enter_context(self.lock(lock, holder=f"dropping table {name}"))
            for table in tables:
                with self._writing(table):
                    _fault_point()
                    self.db.drop_table(table)
                    _fault_point()
            if name in ("runs", "predictions"):
                for entry in self._journal_entries():  # they name runs that are gone now
                    self._journal_remove(entry)
        return tables

    def _embedding_locks_of(self, name: str) -> list[str]:
        """The embedding-slice locks (``embed-<model>-<key>``) of the model whose emb_/prompts_/localsim_ table
        ``name`` is: table names spell the model with '_' for '-', so models are compared that way."""
        prefix = next((p for p in ("emb_", "prompts_", "localsim_") if name.startswith(p)), None)
        folder = self.path / LOCKS_DIR
        if prefix is None or not (self.remote or folder.is_dir()):
            return []
        model = name[len(prefix):]
        if self.remote:  # the leases that exist now (one is there only while its pass runs, or its holder died)
            stems = (k.rsplit("/", 1)[-1][:-len(".lock")] for k in self.objects.list(f"{LOCKS_DIR}/embed-")
                     if k.endswith(".lock"))
        else:
            stems = (p.stem for p in folder.glob("embed-*.lock"))
        # embed-<model>-<16 hex digits>: the model is what lies between
        return sorted(s for s in stems if s[len("embed-"):-17].replace("-", "_") == model)

    def dataset(self, name: str):
        """The table as a pyarrow-compatible Lance dataset (for DuckDB; filters are pushed down)."""
        return self.open(name).to_lance()

    @contextmanager
    def _writing(self, name: str):
        """Turn the operating system's refusal of a write (a full disk, a read-only store, no permission), raised
        by Lance as a RuntimeError naming 'os error N' or by Python as an OSError, into one StoreError line."""
        try:
            yield
        except (OSError, RuntimeError) as exc:
            code = getattr(exc, "errno", None)
            match = re.search(r"\(os error (\d+)\)", str(exc))
            code = int(match.group(1)) if match and code is None else code
            if code not in _WRITE_REFUSALS:
                raise
            raise StoreError(f"{_WRITE_REFUSALS[code]} while writing table '{name}' in {self.path}: this write was "
                             "not recorded, and a run is stored whole or not at all; "
                             f"{_WRITE_FIXES[code]} and run the command again (it picks up where it stopped)") from exc

    # ---- locks ----------------------------------------------------------------------------------
    @contextmanager
    def lock(self, name: str, wait_s: float = 0.0, holder: str = ""):
        """Hold the exclusive lock ``_locks/<name>.lock`` for the block; wait up to ``wait_s`` seconds for it.

        ``flock`` locks die with their process, so a killed writer never leaves the store locked. Raises
        StoreBusy naming the holder (its pid and what it does) when the lock stays taken. On object storage the lock
        is a lease (:meth:`embedkit.store.objectstore.Objects.lease`).
        """
        if self.remote:
            with self.objects.lease(name, wait_s, holder or name, StoreBusy):
                yield
            return
        folder = self.path / LOCKS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        other = _lock_holder(fd)
                        raise StoreBusy(f"{other} holds {path}; wait for it to finish (a killed process releases "
                                        f"it at once)") from None
                    time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} ({holder or name}, since {datetime.now():%H:%M:%S})".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def embedding_lock(self, model: str, weights_id: str, cohort: str):
        """The lock of one embedding slice (model, weights_id, cohort): one pass, or one repair, at a time."""
        key = hashlib.sha256(f"{weights_id}\0{cohort}".encode()).hexdigest()[:16]
        return self.lock(f"embed-{model}-{key}", holder=f"an embedding pass of {model} on cohort '{cohort}'")

    # ---- runs and predictions -----------------------------------------------------------------
    def write_run(self, run: dict, predictions: pa.Table) -> str:
        """Record one finished run and its predictions as a unit (see :meth:`write_runs`)."""
        return self.write_runs([run], predictions)[0]

    def write_runs(self, runs: list[dict], predictions: pa.Table) -> list[str]:
        """Commit runs and their predictions as a unit: after any kill or I/O error either every run of the batch
        is visible with all its predictions, or none is (their leftovers are removed by the next commit).

        A run whose fingerprint (:func:`run_fingerprint`) is already stored is not stored again: its place in the
        returned ids holds the stored run's id, so a rerun after a kill reports what the first attempt committed.
        """
        rows = [_run_row(run) for run in runs]
        if not rows:
            return []
        ids = [r["run_id"] for r in rows]
        with self.lock("runs", wait_s=RUN_COMMIT_WAIT_S, holder=f"committing run {ids[0]}"):
            self._recover_journal()
            stored = self.read("runs").to_pylist() if self.has("runs") else []
            taken = sorted(set(ids) & {r["run_id"] for r in stored})
            if taken:
                raise StoreError(f"run {taken[0]} is already recorded in {self.path}; a run is written once "
                                 f"(delete it first with `embedkit runs delete {taken[0]}`)")
            known = {run_fingerprint(r): r["run_id"] for r in stored}
            known.pop(None, None)
            result = [known.get(run_fingerprint(r), r["run_id"]) for r in rows]
            rows = [r for r, kept in zip(rows, result) if kept == r["run_id"]]
            if not rows:
                return result
            ids = [r["run_id"] for r in rows]
            if len(rows) < len(result):
                import pyarrow.compute as pc

                predictions = predictions.filter(pc.is_in(predictions["run_id"], pa.array(ids)))
            entry = self._journal_open(ids)
            # leftovers of an attempt with the same ids (a resumed fine-tuning run); counted first, since a
            # delete is a commit of its own even when it matches nothing
            if self.count("predictions", sql_in("run_id", ids)):
                self.delete("predictions", sql_in("run_id", ids))
            self.append("predictions", predictions, schemas.PREDICTIONS)
            self.append("runs", pa.Table.from_pylist(rows, schema=schemas.RUNS), schemas.RUNS)
            self._journal_remove(entry)
        return result

    def delete_run(self, run_id: str) -> None:
        """Delete a run and its predictions: the run row first (the run vanishes at once), then its predictions."""
        if not self.count("runs", sql_eq("run_id", run_id)):
            raise StoreError(f"no run '{run_id}' in {self.path}")
        with self.lock("runs", wait_s=RUN_COMMIT_WAIT_S, holder=f"deleting run {run_id}"):
            self._recover_journal()
            entry = self._journal_open([run_id])
            self.delete("runs", sql_eq("run_id", run_id))
            self.delete("predictions", sql_eq("run_id", run_id))
            self._journal_remove(entry)

    def _journal_open(self, run_ids: list[str]):
        """Write (and fsync) the journal entry naming runs whose predictions are about to change; returns what
        :meth:`_journal_remove` takes. On object storage the entry is one object (a put is atomic)."""
        if self.remote:
            relative = f"{JOURNAL_DIR}/{uuid.uuid4().hex}.json"
            self.objects.put(relative, json.dumps({"run_ids": run_ids, "pid": os.getpid()}).encode())
            return relative
        folder = self.path / JOURNAL_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4().hex}.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"run_ids": run_ids, "pid": os.getpid()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def _journal_entries(self) -> list:
        """The journal's entries (local paths, or object keys relative to a remote store), torn ones included."""
        if self.remote:
            return sorted(self.objects.list(f"{JOURNAL_DIR}/"))
        folder = self.path / JOURNAL_DIR
        return sorted(folder.glob("*.json")) + sorted(folder.glob("*.tmp")) if folder.is_dir() else []

    def _journal_remove(self, entry) -> None:
        if self.remote:
            self.objects.delete(entry)
        else:
            Path(entry).unlink(missing_ok=True)

    def pending_runs(self) -> list[str]:
        """Run ids named by journal entries of writers that did not finish (killed, or failed on I/O)."""
        ids: list[str] = []
        for entry in self._journal_entries():
            try:
                if self.remote:
                    found = self.objects.get(entry)
                    text = found[0].decode() if found else "{}"
                else:
                    text = "{}" if entry.suffix == ".tmp" else entry.read_text()
                ids += json.loads(text).get("run_ids", [])
            except (OSError, ValueError, AttributeError):
                pass  # a torn entry: the writer died before its first commit (os.replace makes this rare)
        return ids

    def _recover_journal(self) -> int:
        """Delete the predictions of unfinished writers' runs that never got a ``runs`` row; clear the journal.
        Call with the ``runs`` lock held. Returns how many runs' leftovers were removed."""
        entries = self._journal_entries()
        if not entries:
            return 0
        ids = self.pending_runs()
        if ids and self.has("predictions"):
            committed = set(self.read("runs", sql_in("run_id", ids), ["run_id"])["run_id"].to_pylist()) \
                if self.has("runs") else set()
            orphans = [i for i in ids if i not in committed]
            if orphans:
                self.delete("predictions", sql_in("run_id", orphans))
        else:
            orphans = []
        for entry in entries:
            self._journal_remove(entry)
        return len(orphans)


# Config keys that label a run (which study or sweep asked for it, the class order it reports) rather than change
# what it computes: two runs that differ only here, and in the seed, are seeds of one arm.
# A multi-label run's thresholds are chosen from its own val predictions (an outcome, like its metrics), not set.
NOT_A_SETTING = frozenset({"seed", "study_id", "sweep_id", "sweep_grid", "sweep_select", "trainer", "classes",
                           "thresholds"})


def run_setting(config: str | dict | None) -> dict:
    """A run's settings: its config without seed-like and bookkeeping keys (includes the cohort fingerprint)."""
    if isinstance(config, str) or config is None:
        try:
            config = json.loads(config or "{}")
        except json.JSONDecodeError:
            return {"config": config}
    return {k: v for k, v in config.items() if k not in NOT_A_SETTING}


def run_fingerprint(run: dict) -> str | None:
    """What a run computed from: model, weights, cohort (and its fingerprint), method, settings and seed, within
    one study (a study owns its runs: another study's identical run is its own row). Two runs with one fingerprint
    are the same run; storing the second would only count it twice. None for a run whose config does not
    fingerprint its cohort rows: nothing proves two such runs saw the same inputs."""
    setting = run_setting(run.get("config"))
    if "cohort_fingerprint" not in setting:
        return None
    key = {k: run.get(k) for k in ("model", "weights_id", "cohort", "method", "seed", "study_id")}
    key["setting"] = setting
    return "sha256:" + hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _run_row(run: dict) -> dict:
    """A ``runs`` row from a run dict: every column present, config and metrics as JSON text."""
    row = {name: run.get(name) for name in schemas.RUNS.names}
    row["created_at"] = row["created_at"] or datetime.now(timezone.utc)
    for key in ("config", "metrics"):
        if not isinstance(row[key], str):
            row[key] = json.dumps(row[key] or {}, sort_keys=True)
    if row["run_id"] is None:
        raise StoreError("a run needs a run_id")
    return row

"""Runs in the store: building a run's rows, recording them, selecting and deleting runs.

Every head (embedkit/heads) and fine-tuning run (embedkit/finetune) writes through here: one ``runs`` row and one
``predictions`` row per cohort row, committed as a unit by :meth:`embedkit.store.store.Store.write_runs`. Every
command that picks runs (``embedkit runs``, ``fairness``, ``report``, ``study``) selects them with
:func:`select_runs`. A run stores what its training reports (iterations, best epoch, ...); every metric of its
predictions, the accuracy and macro-F1 a listing shows included, is read from the SQL views (one definition of
each number).
"""

from __future__ import annotations

import functools
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from embedkit import __version__
from embedkit.store import schemas
from embedkit.store.store import Store, StoreError, new_run_id, sql_eq, sql_in

if TYPE_CHECKING:  # the heads' slice of the store; only its attributes are read here
    from embedkit.heads.vectors import CohortVectors


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """embedkit's version plus the git short hash of the source tree when it is a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
        return f"{__version__}+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable), returned as float32 like the store's probs column."""
    z = scores.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def predictions_table(run_ids: Sequence[str], rows: pd.DataFrame, y_true: np.ndarray, probs: np.ndarray,
                      y_pred: np.ndarray | None = None) -> pa.Table:
    """Predictions of several runs over the same cohort rows: ``probs`` [R, N, C] -> R*N ``predictions`` rows.

    ``rows`` holds the N rows' ``row_id``, ``image_id`` and ``split``; ``y_true`` their class indices (-1: no single
    label, stored as null); ``y_pred`` defaults to the argmax of ``probs`` (-1: no single prediction, stored as
    null: multi-label runs, whose ``probs`` are one sigmoid per label). Built without Python loops.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim == 2:
        probs = probs[None]
    n_runs, n, n_classes = probs.shape
    if n != len(rows) or n_runs != len(run_ids):
        raise ValueError(f"probs {probs.shape} do not match {len(run_ids)} runs x {len(rows)} rows")
    if y_pred is None:
        y_pred = probs.argmax(axis=-1)
    y_pred = np.asarray(y_pred).reshape(n_runs, n)
    y_true = np.tile(np.asarray(y_true), n_runs)
    offsets = np.arange(0, n_runs * n * n_classes + 1, n_classes, dtype=np.int32)
    tiled = {c: pa.array(np.tile(rows[c].to_numpy(dtype=object), n_runs), pa.string())
             for c in ("row_id", "image_id", "split")}
    return pa.table({
        "run_id": pa.array(np.repeat(np.asarray(run_ids, dtype=object), n), pa.string()),
        **tiled,
        "y_true": pa.array(y_true.astype(np.int32), pa.int32(), mask=y_true < 0),  # null: no single label
        "y_pred": pa.array(y_pred.reshape(-1).astype(np.int32), pa.int32(), mask=y_pred.reshape(-1) < 0),  # null: multi-label
        "probs": pa.ListArray.from_arrays(pa.array(offsets), pa.array(probs.reshape(-1), pa.float32())),
    }, schema=schemas.PREDICTIONS)


def make_run(vectors: CohortVectors, method: str, config: dict, seed: int | None,
             extra_metrics: dict | None = None, run_id: str | None = None) -> dict:
    """A ``runs`` row: ``config`` gets the class order, the cohort fingerprint and how the vectors were computed
    (``embedding``: amp, preprocess); ``metrics`` holds what training reports (iterations, best epoch, ...).
    Accuracy and macro-F1 per split are never stored: they are read from the SQL views (:func:`with_summaries`)."""
    config = {**config, "classes": list(vectors.classes), "cohort_fingerprint": vectors.fingerprint}
    if vectors.embedding:
        config["embedding"] = vectors.embedding
    if vectors.missing_rows:  # --allow-partial: the run says how much of its cohort it never saw
        config["partial"] = {"missing_rows": vectors.missing_rows, "rows": vectors.n}
    metrics = dict(extra_metrics or {})
    return {
        "run_id": run_id or new_run_id(method),
        "model": vectors.model,
        "weights_id": vectors.weights_id,
        "method": method,
        "cohort": vectors.cohort,
        "config": json.dumps(config, sort_keys=True),
        "seed": seed,
        "created_at": datetime.now(timezone.utc),
        "code_version": code_version(),
        "metrics": json.dumps(metrics, sort_keys=True),
        "study_id": config.get("study_id"),
    }


def record_run(store: Store, vectors: CohortVectors, method: str, config: dict, seed: int | None,
               probs: np.ndarray, y_pred: np.ndarray | None = None, extra_metrics: dict | None = None) -> dict:
    """Record one finished run and its per-row predictions; returns the ``runs`` row (config/metrics as JSON)."""
    probs = np.asarray(probs, dtype=np.float32)
    y_pred = probs.argmax(axis=1) if y_pred is None else np.asarray(y_pred)
    run = make_run(vectors, method, config, seed, extra_metrics)
    stored = store.write_run(run, predictions_table([run["run_id"]], vectors.meta, vectors.y, probs, y_pred))
    if stored != run["run_id"]:  # the same inputs, settings and seed were recorded before: report that run
        run = {**store.read("runs", sql_eq("run_id", stored)).to_pylist()[0], "already_recorded": True}
    return with_summaries(store, [run])[0]


def with_summaries(store: Store, runs: list[dict]) -> list[dict]:
    """The runs with accuracy, macro-F1 and n per split, as the SQL views compute them, merged into ``metrics``
    (a JSON string stays a JSON string); a multi-label run's per-label AUC and F1 per split under ``label_metrics``.
    """
    from embedkit.fairness.summary import label_summaries, split_summaries

    summaries = split_summaries(store, [r["run_id"] for r in runs])
    multilabel = [r["run_id"] for r in runs if _task(r.get("config")) == "multilabel"]
    labels = label_summaries(store, multilabel) if multilabel else {}
    out = []
    for run in runs:
        text = isinstance(run["metrics"], str)
        metrics = {**(json.loads(run["metrics"] or "{}") if text else run["metrics"] or {}),
                   **summaries.get(run["run_id"], {})}
        if run["run_id"] in labels:
            metrics["label_metrics"] = labels[run["run_id"]]
        out.append({**run, "metrics": json.dumps(metrics, sort_keys=True) if text else metrics})
    return out


def _task(config) -> str | None:
    """A run's ``task`` (multiclass when absent) from its config, JSON text or dict."""
    config = json.loads(config or "{}") if isinstance(config, str) else (config or {})
    return config.get("task", "multiclass")


def select_runs(store: Store, run_ids: Sequence[str] | None = None, models: Sequence[str] | None = None,
                methods: Sequence[str] | None = None, study: str | None = None) -> pa.Table:
    """The stored ``runs`` rows matching every filter given (none given: every run), oldest first.

    The one selector of runs: ``embedkit runs``, ``fairness``, ``report`` and ``study`` all pick runs here. The
    filters are pushed down to Lance; config and metrics stay JSON text. A store without runs gives an empty table.
    """
    if not store.has("runs"):
        return schemas.RUNS.empty_table()
    where = [sql_in(column, values) for column, values in
             (("run_id", run_ids), ("model", models), ("method", methods), ("study_id", [study] if study else None))
             if values]
    table = store.read("runs", " AND ".join(where) or None)
    return table.sort_by([("created_at", "ascending"), ("run_id", "ascending")])


def prediction_counts(store: Store, run_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """{run_id: {split: prediction rows}} of the given runs (a run without predictions is absent)."""
    if not run_ids or not store.has("predictions"):
        return {}
    table = store.read("predictions", sql_in("run_id", run_ids), columns=["run_id", "split"])
    counts = table.group_by(["run_id", "split"]).aggregate([("run_id", "count")]).to_pylist()
    out: dict[str, dict[str, int]] = {}
    for row in counts:
        out.setdefault(row["run_id"], {})[row["split"]] = row["run_id_count"]
    return out


def list_runs(store: Store, model: str | None = None, method: str | None = None) -> list[dict]:
    """The stored runs (newest first), optionally of one model and/or method; config and metrics parsed."""
    rows = select_runs(store, models=[model] if model else None, methods=[method] if method else None).to_pylist()
    for row in rows:
        row["config"] = json.loads(row["config"] or "{}")
        row["metrics"] = json.loads(row["metrics"] or "{}")
    rows = with_summaries(store, rows) if rows and store.has("predictions") else rows
    return rows[::-1]


def delete_run(store: Store, run_id: str) -> int:
    """Delete a run and its predictions; returns how many prediction rows went. Unknown ids raise StoreError."""
    if not store.has("runs") or not store.count("runs", sql_eq("run_id", run_id)):
        raise StoreError(f"no run '{run_id}' in {store.path}: list them with `embedkit runs`")
    n = store.count("predictions", sql_eq("run_id", run_id))
    store.delete_run(run_id)
    return n

"""Recording runs: one ``runs`` row and one ``predictions`` row per cohort row; listing and deleting them.

The summary metrics stored with a run (accuracy and macro-F1 per split) are a convenience for listings and
sweep tables; the fairness metrics proper come from the SQL views over ``predictions``.
"""

from __future__ import annotations

import functools
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedkit import __version__
from embedkit.heads.vectors import CohortVectors, HeadsError
from embedkit.store.store import Store, new_run_id, sql_eq

METHODS = ("zeroshot", "lp", "mlp", "logreg", "lora", "ft")


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


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-F1 over the classes present in y_true or y_pred, 0 where undefined (sklearn's f1_score defaults)."""
    if len(y_true) == 0:
        return float("nan")
    labels = np.union1d(y_true, y_pred)
    f1 = []
    for c in labels:
        tp = np.sum((y_true == c) & (y_pred == c))
        denom = np.sum(y_true == c) + np.sum(y_pred == c)  # 2tp + fp + fn
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1))


def split_metrics(y_true: np.ndarray, y_pred: np.ndarray, split: np.ndarray) -> dict[str, dict[str, float]]:
    """Accuracy and macro-F1 per split, over labelled rows (y_true >= 0)."""
    out = {}
    for name in sorted({s for s in split if isinstance(s, str)}):
        mask = (split == name) & (y_true >= 0)
        if mask.any():
            out[name] = {"n": int(mask.sum()), "accuracy": float(np.mean(y_true[mask] == y_pred[mask])),
                         "macro_f1": macro_f1(y_true[mask], y_pred[mask])}
    return out


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable), returned as float32 like the store's probs column."""
    z = scores.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def predictions_table(run_ids: list[str], vectors: CohortVectors, probs: np.ndarray,
                      y_pred: np.ndarray | None = None) -> pa.Table:
    """Predictions of several runs over the same rows: ``probs`` [R, N, C] -> R*N rows (built without Python loops)."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim == 2:
        probs = probs[None]
    n_runs, n, n_classes = probs.shape
    if n != vectors.n or n_runs != len(run_ids):
        raise ValueError(f"probs {probs.shape} do not match {len(run_ids)} runs x {vectors.n} rows")
    if y_pred is None:
        y_pred = probs.argmax(axis=-1)
    y_pred = np.asarray(y_pred).reshape(n_runs, n)
    y_true = np.tile(vectors.y, n_runs)
    offsets = np.arange(0, n_runs * n * n_classes + 1, n_classes, dtype=np.int32)
    return pa.table({
        "run_id": pa.array(np.repeat(np.asarray(run_ids, dtype=object), n), pa.string()),
        "row_id": pa.array(np.tile(vectors.row_ids, n_runs), pa.string()),
        "image_id": pa.array(np.tile(vectors.meta["image_id"].to_numpy(dtype=object), n_runs), pa.string()),
        "split": pa.array(np.tile(vectors.split, n_runs), pa.string()),
        "y_true": pa.array(y_true.astype(np.int32), pa.int32(), mask=y_true < 0),  # null: no single label
        "y_pred": pa.array(y_pred.reshape(-1).astype(np.int32), pa.int32()),
        "probs": pa.ListArray.from_arrays(pa.array(offsets), pa.array(probs.reshape(-1))),
    })


def make_run(vectors: CohortVectors, method: str, config: dict, seed: int | None, y_pred: np.ndarray,
             extra_metrics: dict | None = None, run_id: str | None = None) -> dict:
    """A ``runs`` row: ``config`` gets the class order; metrics = accuracy and macro-F1 per split (+ extras)."""
    from embedkit.data.cohort import cohort_fingerprint

    config = {**config, "classes": list(vectors.classes), "cohort_fingerprint": cohort_fingerprint(vectors.meta)}
    if vectors.missing_rows:  # --allow-partial: the run says how much of its cohort it never saw
        config["partial"] = {"missing_rows": vectors.missing_rows, "rows": vectors.n}
    metrics = split_metrics(vectors.y, np.asarray(y_pred), vectors.split)
    if extra_metrics:
        metrics.update(extra_metrics)
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
    run = make_run(vectors, method, config, seed, y_pred, extra_metrics)
    stored = store.write_run(run, predictions_table([run["run_id"]], vectors, probs, y_pred))
    if stored != run["run_id"]:  # the same inputs, settings and seed were recorded before: report that run
        return {**store.read("runs", sql_eq("run_id", stored)).to_pylist()[0], "already_recorded": True}
    return run


def list_runs(store: Store, model: str | None = None, method: str | None = None) -> list[dict]:
    """The stored runs (newest first), optionally of one model and/or method; config and metrics parsed."""
    if not store.has("runs"):
        return []
    where = [sql_eq(k, v) for k, v in (("model", model), ("method", method)) if v]
    rows = store.read("runs", " AND ".join(where) or None).to_pylist()
    for row in rows:
        row["config"] = json.loads(row["config"] or "{}")
        row["metrics"] = json.loads(row["metrics"] or "{}")
    return sorted(rows, key=lambda r: (r["created_at"], r["run_id"]), reverse=True)


def delete_run(store: Store, run_id: str) -> int:
    """Delete a run and its predictions; returns how many prediction rows went. Unknown ids raise."""
    if not store.has("runs") or not store.count("runs", sql_eq("run_id", run_id)):
        raise HeadsError(f"no run '{run_id}' in {store.path}: list them with `embedkit runs`")
    n = store.count("predictions", sql_eq("run_id", run_id))
    store.delete_run(run_id)
    return n

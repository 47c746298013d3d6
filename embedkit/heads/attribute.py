"""Attribute encoding: how much of a demographic the stored vectors carry (`embedkit probe --target sex`).

A head (lp, mlp, logreg) is trained to predict a column of the images table (``sex``, ``age_group``, ``view``, any
other) instead of the label, on the cohort's own splits (patient-level where the cohort's are; the study's are).
Its run is an ordinary run whose classes are the column's values (config ``target``; method ``<head>@<target>``,
e.g. ``lp@sex``), so the SQL views score it: the AUC (macro over the values: for two values the AUC itself) with
its patient bootstrap interval, per model, is :func:`encoding_table` (Glocker et al. 2023; clip_cxr_fairness).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Sequence

import numpy as np

from embedkit.constants import MULTICLASS
from embedkit.heads.vectors import CohortVectors, HeadsError

ENCODING_METRIC = "macro_auc"


def target_vectors(vectors: CohortVectors, target: str) -> CohortVectors:
    """``vectors`` with ``classes`` and ``y`` read from column ``target`` (its distinct values, sorted; -1 where a
    row has none). Rows, splits and demographics stay."""
    if target not in vectors.meta.columns:
        raise HeadsError(f"--target '{target}' is not a column of cohort '{vectors.cohort}'; columns: "
                         f"{[c for c in vectors.meta.columns if c not in ('row_id', 'image_id', 'split')]}")
    values = vectors.meta[target].map(lambda v: None if v is None else str(v))
    classes = tuple(sorted({v for v in values if v is not None}))
    if len(classes) < 2:
        raise HeadsError(f"--target '{target}' has {len(classes)} distinct value(s) in cohort '{vectors.cohort}'; "
                         "a classifier needs at least 2")
    lookup = {c: i for i, c in enumerate(classes)}
    y = values.map(lambda v: lookup.get(v, -1) if v is not None else -1).to_numpy(dtype=np.int64)
    return replace(vectors, classes=classes, y=y, task=MULTICLASS, Y=None)  # one class per row, whatever the cohort


def target_method(head: str, target: str | None) -> str:
    """The run's method: ``lp`` for the label, ``lp@sex`` for an attribute probe."""
    return head if target in (None, "label") else f"{head}@{target}"


def encoding_table(store, run_ids: Sequence[str] | None = None, model: str | None = None, split: str = "test",
                   ci: int = 1000, seed: int = 0) -> list[dict]:
    """One row per attribute-probe run (config ``target``): model, weights, head, target, n, AUC on ``split`` and
    its bootstrap interval (BCa over ``ci`` patient resamples; none when ``ci`` is 0), read from the SQL views."""
    from embedkit.fairness import bootstrap, db
    from embedkit.store.runs import select_runs

    runs = [r for r in select_runs(store, run_ids, [model] if model else None).to_pylist()
            if "target" in json.loads(r["config"] or "{}")]
    if not runs:
        raise HeadsError("no attribute-probe runs: train one with `embedkit probe --model M --target sex`")
    ids = [r["run_id"] for r in runs]
    con = db.connect(store, ["sex"])
    if ci > 0:
        table = bootstrap.bootstrap_intervals(con, ids, split, n_resamples=ci, seed=seed,
                                              families=[ENCODING_METRIC], class_scores=True)
    else:
        with db.scoped(con, ids, split, class_scores=True):
            table = con.sql("SELECT * FROM metric_intervals").to_arrow_table()
    values = {r["run_id"]: r for r in table.to_pylist()
              if r["attribute"] == "all" and r["metric"] == ENCODING_METRIC}
    out = []
    for run in runs:
        config = json.loads(run["config"])
        v = values.get(run["run_id"], {})
        out.append({"run_id": run["run_id"], "model": run["model"], "weights_id": run["weights_id"],
                    "head": config.get("head"), "target": config["target"], "classes": config.get("classes"),
                    "split": split, "n": v.get("n"), "auc": v.get("value"), "ci_low": v.get("ci_low"),
                    "ci_high": v.get("ci_high")})
    return out


def print_encoding_table(rows: list[dict], ci: int, seed: int) -> None:
    """The per-model table: how well each embedding's head recovers each demographic."""
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"attribute encoding: AUC of a head predicting the demographic ({rows[0]['split']} split)",
                  title_justify="left")
    for column in ("model", "weights", "head", "target", "n", "AUC [95% CI]", "run"):
        table.add_column(column, justify="right" if column in ("n", "AUC [95% CI]") else "left")
    for r in rows:
        auc = "-" if r["auc"] is None else f"{r['auc']:.3f}"
        if r["ci_low"] is not None:
            auc += f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        table.add_row(r["model"], r["weights_id"], str(r["head"]), r["target"], str(r["n"] or "-"), auc, r["run_id"])
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    console.print(f"AUC 0.5: the vectors carry none of the attribute a head can read; 1: all of it. Intervals: BCa "
                  f"bootstrap over {ci} resamples of patients (seed {seed})." if ci else "No intervals (--ci 0).")

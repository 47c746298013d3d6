"""Run summaries and sweep selection numbers, read from the SQL views: the one definition of every metric.

``embedkit runs``, the line a head prints, and ``sweep --select`` all show what ``fairness_summary`` says, never a
number computed a second way. Conventions (embedkit/sql/README.md): rows without a single label are not scored;
macro-F1 averages over all of the run's classes.
"""

from __future__ import annotations

from typing import Sequence

from embedkit.fairness import db

SUMMARY_METRICS = ("accuracy", "macro_f1")


def split_summaries(store, run_ids: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``{run_id: {split: {"n", "accuracy", "macro_f1"}}}`` for the committed runs among ``run_ids``."""
    if not run_ids:
        return {}
    con = db.connect(store, ["sex"])  # attribute 'all' is always there; one real attribute keeps the views small
    with db.scoped(con, list(run_ids), class_scores=False):
        rows = con.sql(
            "SELECT run_id, split, metric, value, n FROM fairness_summary "
            "WHERE attribute = 'all' AND list_contains($metrics, metric)",
            params={"metrics": list(SUMMARY_METRICS)},
        ).to_arrow_table().to_pylist()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        cell = out.setdefault(r["run_id"], {}).setdefault(r["split"], {"n": int(r["n"])})
        cell[r["metric"]] = r["value"]
    return out


def label_summaries(store, run_ids: Sequence[str]) -> dict[str, dict[str, dict]]:
    """``{run_id: {split: {"n", "macro_auc", "macro_f1", "auc": {label: v}, "f1": {label: v}}}}`` for the committed
    multi-label runs among ``run_ids``, from ``label_metrics`` (the whole split; F1 at the run's val thresholds).
    The macro values average over the labels whose value is defined (AUC: a label with positives and negatives)."""
    if not run_ids:
        return {}
    con = db.connect(store, ["sex"])
    with db.scoped(con, list(run_ids), class_scores=True):
        rows = con.sql(
            "SELECT run_id, split, label_name, n, auc, f1 FROM label_metrics "
            "WHERE attribute = 'all' AND replicate = 0 ORDER BY run_id, split, label_index").to_arrow_table().to_pylist()
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        cell = out.setdefault(r["run_id"], {}).setdefault(r["split"], {"n": int(r["n"]), "auc": {}, "f1": {}})
        cell["auc"][r["label_name"]], cell["f1"][r["label_name"]] = r["auc"], r["f1"]
    for cell in (c for splits in out.values() for c in splits.values()):
        for metric in ("auc", "f1"):
            kept = [v for v in cell[metric].values() if v is not None]
            cell[f"macro_{metric}"] = sum(kept) / len(kept) if kept else None
    return out


def selection_metrics(store, run_ids: Sequence[str], attributes: Sequence[str], split: str = "val"):
    """Per run on ``split``: macro-F1 (attribute 'all'), and the F1 gap of each attribute with its groups.

    Returns ``(macro_f1, f1_gap, groups)``: ``{run_id: value}``, ``{run_id: {attribute: gap}}`` (absent where the
    attribute has fewer than two groups on the split) and ``{attribute: [group, ...]}``.
    """
    con = db.connect(store, list(attributes))
    with db.scoped(con, list(run_ids), split, class_scores=False):
        rows = con.sql(
            "SELECT run_id, attribute, group_or_gap, metric, value FROM fairness_summary "
            "WHERE (attribute = 'all' AND metric = 'macro_f1') OR (group_or_gap = 'gap' AND metric = 'f1_gap') "
            "OR (attribute <> 'all' AND metric = 'macro_f1')",
        ).to_arrow_table().to_pylist()
    f1: dict[str, float] = {}
    gaps: dict[str, dict[str, float]] = {}
    groups: dict[str, set] = {a: set() for a in attributes}
    for r in rows:
        if r["attribute"] == "all":
            f1[r["run_id"]] = r["value"]
        elif r["metric"] == "f1_gap":
            gaps.setdefault(r["run_id"], {})[r["attribute"]] = r["value"]
        else:
            groups[r["attribute"]].add(r["group_or_gap"])
    return f1, gaps, {a: sorted(g) for a, g in groups.items()}

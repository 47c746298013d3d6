"""`embedkit fairness` on multi-label runs: per-label AUC by group with intervals, underdiagnosis by group and its gap.

A multi-label run (config ``"task": "multilabel"``, one sigmoid score per class, thresholds chosen on validation)
is scored by the label-level views (embedkit/sql/20_..28_, ``label_metric_values``); the intervals come from
:func:`embedkit.fairness.bootstrap.bootstrap_intervals` with ``suite="multilabel"``, the same patient bootstrap as
the multi-class table. Nothing here computes a metric: it selects rows and lays them out.
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from embedkit.fairness import bootstrap, db
from embedkit.fairness.catalogue import OUTSIDE_FLAG, SMALL_FLAG

TASK = "multilabel"  # runs.config "task" of a multi-label run
# The attributes the multi-label audit slices by when asked for all of them (docs/multilabel.md).
ATTRIBUTES: tuple[str, ...] = ("sex", "age_decade", "age_group", "view", "age_group_sex")
# Per-label families of the whole-split table, in display order, with their headers.
LABEL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("positives", "positives"), ("auc", "AUC"), ("tpr", "TPR"), ("fpr", "FPR"), ("fnr", "FNR"),
    ("precision", "precision"), ("f1", "F1"), ("ece", "ECE"),
)
# The families `embedkit fairness` shows (the bootstrap keeps only these replicates).
FAMILIES: tuple[str, ...] = (*(f for f, _ in LABEL_COLUMNS), "auc_gap", "auc_worst", "auc_diff", "underdiagnosis",
                             "underdiagnosis_gap", "underdiagnosis_worst", "underdiagnosis_diff")
# The jackknife behind BCa holds one replicate per patient, each as large as the split: above this many patients
# the intervals are percentile ones (the notes say so).
BCA_MAX_UNITS = 1500


def run_tasks(store, run_ids: Sequence[str]) -> dict[str, str]:
    """``{run_id: task}``: ``"multilabel"`` for the runs whose config says so, ``"multiclass"`` for the others."""
    from embedkit.store.runs import select_runs

    out = {}
    for r in select_runs(store, list(run_ids)).to_pylist():
        config = r["config"]
        config = json.loads(config) if isinstance(config, str) and config else (config or {})
        out[r["run_id"]] = TASK if config.get("task") == TASK else "multiclass"
    return out


def is_multilabel(store, runs: list[dict]) -> bool:
    """Whether the selected ``runs`` are multi-label; raises FairnessError when they mix both kinds."""
    tasks = run_tasks(store, [r["run_id"] for r in runs])
    kinds = set(tasks.values())
    if len(kinds) > 1:
        ml = sorted(r for r, t in tasks.items() if t == TASK)
        raise db.FairnessError(f"the selected runs mix multi-label ({', '.join(ml)}) and multi-class runs: their "
                               "metrics differ, so select one kind with --run, --model or --method")
    return kinds == {TASK}


def patient_count(con, run_ids: Sequence[str], split: str) -> int:
    """Distinct resampling units (patients, else rows) of ``run_ids`` on ``split``."""
    with db.scoped(con, list(run_ids), split):
        return con.sql("SELECT count(DISTINCT unit_id) FROM predictions_base").fetchall()[0][0]


def multilabel_rows(con, runs: list[dict], attributes: list[str], split: str, ci: int, seed: int,
                    min_n: int) -> tuple[list[dict], bool]:
    """The rows of the multi-label layout (run, attribute, group or gap, metric), with intervals when ``ci`` > 0;
    and whether the intervals are BCa (else percentile: more than :data:`BCA_MAX_UNITS` patients)."""
    run_ids = [r["run_id"] for r in runs]
    bca = patient_count(con, run_ids, split) <= BCA_MAX_UNITS
    if ci > 0:
        table = bootstrap.bootstrap_intervals(con, run_ids, split, n_resamples=ci, seed=seed, families=FAMILIES,
                                              suite=TASK, bca=bca)
    else:
        with db.scoped(con, run_ids, split):
            table = con.sql("SELECT * FROM label_metric_intervals WHERE list_contains($f, family) "
                            "ORDER BY run_id, attribute, group_or_gap, metric", params={"f": list(FAMILIES)}) \
                .to_arrow_table()
    shown = set(attributes) | {"all"}
    rows = [r for r in table.to_pylist() if r["attribute"] in shown and r["family"] in FAMILIES]
    for r in rows:
        r["label_name"] = r["metric"][len(r["family"]) + 1:-1] if r["metric"].endswith("]") else None
        r["small"] = r["n"] is not None and r["n"] < min_n
    return rows, bca


def run_labels(con, run_id: str) -> list[tuple[str, Optional[float]]]:
    """(label, threshold) of a multi-label run, in its class order."""
    config = con.sql("SELECT config FROM runs WHERE run_id = $r", params={"r": run_id}).fetchall()[0][0]
    config = json.loads(config) if isinstance(config, str) else config
    thresholds = list(config.get("thresholds") or [])
    return [(c, thresholds[i] if i < len(thresholds) else None) for i, c in enumerate(config.get("classes") or [])]


def group_order(groups) -> list[str]:
    """Groups in reading order: age decades by their first year ('0-9' before '10-19'), the rest by name."""
    def key(g: str):
        head = str(g).split("-", 1)[0]
        return (0, int(head), str(g)) if head.isdigit() else (1, 0, str(g))
    return sorted(groups, key=key)


def print_multilabel(con, rows: list[dict], runs: list[dict], attributes: list[str], split: str, ci: int, seed: int,
                     min_n: int, bca: bool) -> None:
    """Per run: the whole-split table per label, then per attribute AUC by group (labels x groups, the max-min gap
    and the signed difference of two groups) and underdiagnosis by group with its gap."""
    from rich.console import Console

    from embedkit.fairness.table import random_weights_note

    console = Console(width=None if sys.stdout.isatty() else 200)
    for run in runs:
        mine = [r for r in rows if r["run_id"] == run["run_id"]]
        index = {(r["attribute"], r["group_or_gap"], r["metric"]): r for r in mine}
        labels = run_labels(con, run["run_id"])
        console.print(_whole_split(index, run, labels, min_n))
        for attribute in attributes:
            groups = group_order({r["group_or_gap"] for r in mine
                                  if r["attribute"] == attribute and r["family"] == "positives"})
            if not groups:
                continue
            console.print(_auc_by_group(index, run, attribute, groups, labels, min_n))
            console.print(_underdiagnosis_by_group(index, run, attribute, groups, min_n))
    interval = ("BCa" if bca else f"percentile (more than {BCA_MAX_UNITS} patients: no jackknife)")
    notes = [f"split {split}; {SMALL_FLAG} = fewer than {min_n} rows (a gap: its smallest group); underdiagnosis: "
             "the share of patients with a disease predicted No Finding (n: diseased rows)."]
    if ci > 0:
        notes.append(f"[CI]: 95% {interval} bootstrap interval over {ci} resamples of patients within groups "
                     f"(seed {seed}); {OUTSIDE_FLAG} = the estimate lies outside the interval its replicates allow.")
    console.print(" ".join(notes))
    note = random_weights_note(runs)
    if note:
        console.print(note)


def _cell(row: Optional[dict], min_n: int, with_ci: bool) -> str:
    """A value as the multi-class table prints it (:func:`embedkit.fairness.table.format_cell`); a count whole."""
    from embedkit.fairness.table import format_cell

    if row is not None and row["family"] == "positives":
        return "-" if row["value"] is None else f"{int(row['value'])}"
    return format_cell(row, min_n, with_ci)


def _title(run: dict, text: str) -> str:
    return f"{text}  ({run['model']}/{run['method']}, {run['run_id']})"


def _whole_split(index: dict, run: dict, labels, min_n: int):
    from rich.table import Table

    table = Table(title=_title(run, "whole split, per label"), title_justify="left")
    table.add_column("label")
    table.add_column("threshold", justify="right")
    for _, head in LABEL_COLUMNS:
        table.add_column(head, justify="right")
    for label, threshold in labels:
        cells = [_cell(index.get(("all", "all", f"{family}[{label}]")), min_n, family == "auc")
                 for family, _ in LABEL_COLUMNS]
        table.add_row(label, "-" if threshold is None else f"{threshold:.3f}", *cells)
    n = index.get(("all", "all", "underdiagnosis"))
    table.caption = f"underdiagnosis (whole split): {_cell(n, min_n, True)} (n={n['n'] if n else '-'} diseased)"
    return table


def _auc_by_group(index: dict, run: dict, attribute: str, groups: list[str], labels, min_n: int):
    from rich.table import Table

    table = Table(title=_title(run, f"AUC by {attribute}"), title_justify="left")
    table.add_column("label")
    for group in groups:
        n = next((r["n"] for (a, g, m), r in index.items() if a == attribute and g == group
                  and r["family"] == "positives"), None)
        flag = f" {SMALL_FLAG}" if n is not None and n < min_n else ""
        table.add_column(f"{group} (n={n}){flag}", justify="right")
    table.add_column("max-min gap [CI]", justify="right")
    direction = _direction(index, attribute, "auc_diff")
    if direction:
        table.add_column(f"{direction} [CI]", justify="right")
    for label, _ in labels:
        cells = [_cell(index.get((attribute, g, f"auc[{label}]")), min_n, True) for g in groups]
        cells.append(_cell(index.get((attribute, "gap", f"auc_gap[{label}]")), min_n, True))
        if direction:
            cells.append(_cell(index.get((attribute, direction, f"auc_diff[{label}]")), min_n, True))
        table.add_row(label, *cells)
    return table


def _underdiagnosis_by_group(index: dict, run: dict, attribute: str, groups: list[str], min_n: int):
    from rich.table import Table

    table = Table(title=_title(run, f"underdiagnosis by {attribute} (diseased predicted No Finding)"),
                  title_justify="left")
    cells = []
    for group in groups:
        row = index.get((attribute, group, "underdiagnosis"))
        table.add_column(f"{group} (n={row['n'] if row else '-'})", justify="right")
        cells.append(_cell(row, min_n, True))
    table.add_column("max-min gap [CI]", justify="right")
    cells.append(_cell(index.get((attribute, "gap", "underdiagnosis_gap")), min_n, True))
    table.add_column("worst [CI]", justify="right")
    cells.append(_cell(index.get((attribute, "worst", "underdiagnosis_worst")), min_n, True))
    direction = _direction(index, attribute, "underdiagnosis_diff")
    if direction:
        table.add_column(f"{direction} [CI]", justify="right")
        cells.append(_cell(index.get((attribute, direction, "underdiagnosis_diff")), min_n, True))
    table.add_row(*cells)
    return table


def _direction(index: dict, attribute: str, family: str) -> Optional[str]:
    """The 'a-b' of an attribute's signed differences (present for attributes with exactly two groups)."""
    return next((g for (a, g, _), r in index.items() if a == attribute and r["family"] == family), None)

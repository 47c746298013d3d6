"""The paper-style fairness table of `embedkit fairness`: its rows (embedkit/fairness/catalogue.py says which
metrics), their intervals, and the Rich rendering.

Every number comes from the SQL views (``metric_intervals``) through :mod:`embedkit.fairness.bootstrap`.
"""

from __future__ import annotations

import sys
from typing import Optional

from embedkit.constants import RANDOM_WEIGHTS_NOTE, is_random_weights
from embedkit.fairness import bootstrap, catalogue, db
from embedkit.fairness.catalogue import OUTSIDE_FLAG, SMALL_FLAG


def fairness_rows(con, runs: list[dict], attributes: list[str], split: str, ci: int, seed: int,
                  min_n: int) -> list[dict]:
    """The table's rows (one per run, attribute, group or gap, metric) with intervals when ``ci`` > 0."""
    run_ids = [r["run_id"] for r in runs]
    families = set(catalogue.fairness_families())
    # The table shows no AUC: class_scores=False skips the rows x classes pass, most of the bootstrap's time.
    if ci > 0:
        table = bootstrap.bootstrap_intervals(con, run_ids, split, n_resamples=ci, seed=seed, class_scores=False)
    else:
        with db.scoped(con, run_ids, split, class_scores=False):
            table = con.sql("SELECT * FROM metric_intervals ORDER BY run_id, attribute, group_or_gap, metric") \
                .to_arrow_table()
    shown = set(attributes) | {"all"}
    rows = [r for r in table.to_pylist() if r["attribute"] in shown and r["family"] in families]
    for r in rows:
        r["small"] = r["n"] is not None and r["n"] < min_n
    return rows


def print_tables(con, rows: list[dict], runs: list[dict], attributes: list[str], split: str, ci: int, seed: int,
                 min_n: int) -> None:
    """Print the whole-split table and one table per attribute, with the notes that read them."""
    from rich.console import Console

    classes: dict = {}
    for r in con.sql("SELECT run_id, list(class_name ORDER BY class_index) AS c FROM run_classes GROUP BY run_id") \
            .to_arrow_table().to_pylist():
        classes[r["run_id"]] = r["c"]
    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: do not wrap at 80 columns
    for table_ in _fairness_tables(rows, runs, attributes, classes, min_n):
        console.print(table_)
    notes = [f"split {split}; {SMALL_FLAG} = fewer than {min_n} rows (a gap: its smallest group)."]
    if ci > 0:
        notes.append(f"[CI]: 95% BCa bootstrap interval over {ci} resamples of patients within groups (seed {seed}); "
                     f"{OUTSIDE_FLAG} = the estimate lies outside every interval its replicates allow (a max-min gap "
                     "grows under resampling on small groups): read it as the bias, not as a contradiction.")
    console.print(" ".join(notes))
    note = random_weights_note(runs)
    if note:
        console.print(note)


def random_weights_note(runs: list[dict]) -> str | None:
    """The line under a table of ``runs`` (dicts with model, weights_id) when some ran with random weights: as the
    report says it, their numbers measure the pipeline, not a model."""
    random = sorted({r["model"] for r in runs if is_random_weights(r.get("weights_id"))})
    return f"note: {', '.join(random)} {RANDOM_WEIGHTS_NOTE}." if random else None


def format_cell(row: Optional[dict], min_n: int, with_ci: bool) -> str:
    """A value as printed in fairness tables: 3 decimals, [CI] when asked, the small-group flag under ``min_n``."""
    if row is None or row["value"] is None:
        return "-"
    text = f"{row['value']:.3f}"
    if with_ci and row.get("ci_low") is not None:
        text += f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        if row.get("ci_note"):
            text += f" {OUTSIDE_FLAG}"  # the interval excludes its estimate: the notes say why
    if row["n"] is not None and row["n"] < min_n:
        text += f" {SMALL_FLAG}"  # fewer rows than --min-n: flagged, not hidden
    return text


def _fairness_tables(rows: list[dict], runs: list[dict], attributes: list[str], classes: dict, min_n: int) -> list:
    """Rich tables: one for the whole split, one per attribute; runs side by side, n beside every group."""
    from rich.table import Table

    index = {(r["run_id"], r["attribute"], r["group_or_gap"], r["metric"]): r for r in rows}
    one_run = len(runs) == 1
    labels = {m.family: m.label for m in catalogue.METRICS}
    tables = []
    for attribute in ["all", *attributes]:
        groups = sorted({r["group_or_gap"] for r in rows if r["attribute"] == attribute and r["metric"] == "accuracy"})
        title = "whole split" if attribute == "all" else f"by {attribute}"
        if one_run:
            title += f"  ({runs[0]['model']}/{runs[0]['method']}, {runs[0]['run_id']})"
        table = Table(title=title, title_justify="left")
        table.add_column("metric")
        columns: list[tuple[str, Optional[str]]] = []
        for run in runs:
            head = "" if one_run else f"{run['run_id']}\n{run['model']}/{run['method']}\n"
            for group in groups:
                n = index.get((run["run_id"], attribute, group, "accuracy"), {}).get("n")
                flag = f" {SMALL_FLAG}" if n is not None and n < min_n else ""
                name = "" if attribute == "all" else f"{group} "
                table.add_column(f"{head}{name}(n={n}){flag}", justify="right")
                columns.append((run["run_id"], group))
            if attribute != "all":
                table.add_column(f"{head}max-min gap [CI]", justify="right")
                columns.append((run["run_id"], None))
        # (metric, the metric of its max - min gap or None, label): the group-level rows, per-class ones expanded
        lines: list[tuple[str, Optional[str], str]] = []
        for m in catalogue.fairness_rows():
            if m.per_class:
                lines += [(m.metric(c), m.gap and f"{m.gap}[{c}]", m.class_label(c))
                          for c in classes.get(runs[0]["run_id"], [])]
            else:
                gap_label = labels.get(m.gap, m.gap)
                said = m.gap is None or gap_label == f"{m.label} gap"  # the label already names its gap
                lines.append((m.metric(), m.gap, m.label if said else f"{m.label} (gap: {gap_label})"))
        for metric, gap, label in lines:
            cells = []
            for run_id, group in columns:
                if group is None:
                    cells.append(format_cell(index.get((run_id, attribute, "gap", gap)), min_n, True) if gap else "")
                else:
                    cells.append(format_cell(index.get((run_id, attribute, group, metric)), min_n,
                                             attribute == "all"))
            table.add_row(label, *cells)
        if attribute != "all":
            for m in catalogue.fairness_gap_rows():
                found = {r["run_id"]: r for r in rows if r["attribute"] == attribute and r["metric"] == m.family}
                if not found:
                    continue
                cells = []
                for run_id, group in columns:
                    hit = found.get(run_id) if group is None else None
                    text = format_cell(hit, min_n, True) if hit else ""
                    if hit and hit["group_or_gap"] != "gap":
                        text = f"{hit['group_or_gap']}: {text}"  # a signed gap says which way it is taken
                    cells.append(text)
                table.add_row(m.label, *cells)
        tables.append(table)
    return tables

"""Paired comparisons of runs: the difference of every metric and gap between two runs on the same split, with a
paired bootstrap interval (`embedkit compare`).

The bootstrap's draws (embedkit/fairness/bootstrap.py) resample patients within groups and are keyed by split and
row, never by run: loaded once for both runs, replicate r of run A and replicate r of run B see the same patients,
so B - A in replicate r is one draw of the paired bootstrap. The differences themselves are SQL
(``paired_summary`` in embedkit/sql/30_paired_differences.sql) over the same ``metric_values`` rows as every other
number. The interval is the percentile interval of the paired differences (a difference of two runs' values is not
the one-sided max - min statistic whose bias the BCa interval of `embedkit fairness` corrects).

With several pairs (``--matrix``), each metric's p-values are Holm-adjusted over the pairs (family-wise error at
1 - level across the pairs, per metric); ``significant`` then reads the adjusted p-value. Metrics are not corrected
against each other: they are many views of the same predictions, not independent questions.
"""

from __future__ import annotations

from itertools import combinations
from typing import Iterable, Sequence

import numpy as np

from embedkit.fairness import bootstrap
from embedkit.fairness.db import CI_LEVEL, RESAMPLE_WEIGHTS, FairnessError, scoped

_ROWS_SQL = """
SELECT run_id, list(row_id ORDER BY row_id) AS rows
FROM predictions
WHERE split = $split AND list_contains($runs, run_id) AND row_id IN (SELECT row_id FROM images)
GROUP BY run_id
"""
_PAIR_SQL = f"""
SELECT * FROM paired_summary('{bootstrap.REPLICATES}', $run_a, $run_b)
ORDER BY attribute, group_or_gap, metric
"""


def all_pairs(run_ids: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair (A, B) of ``run_ids`` with A listed before B: the matrix of a study's runs."""
    return list(combinations(list(dict.fromkeys(run_ids)), 2))


def paired_differences(
    con,
    pairs: Sequence[tuple[str, str]],
    split: str = "test",
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = CI_LEVEL,
    families: Iterable[str] | None = None,
    class_scores: bool = False,
) -> list[dict]:
    """For each pair (A, B): every metric and gap both runs have on ``split``, A's value, B's, B - A and its paired
    bootstrap interval (``ci_low``, ``ci_high``), ``p_value`` (two-sided), ``p_adjusted`` (Holm over the pairs, per
    metric; equal to ``p_value`` for one pair) and ``significant`` (``p_adjusted < 1 - level``; for one pair the
    interval excludes 0).

    ``con`` from :func:`embedkit.fairness.db.connect`. Raises FairnessError when a pair's runs were not scored on
    the same rows of ``split`` (a paired comparison needs the same patients), or when ``level`` is not in (0, 1).
    """
    if not 0 < level < 1:
        raise FairnessError(f"the confidence level must lie between 0 and 1, got {level}")
    if n_resamples < 1:
        raise FairnessError(f"a paired interval needs at least 1 bootstrap resample, got {n_resamples}")
    pairs = [(a, b) for a, b in pairs]
    if not pairs:
        raise FairnessError("nothing to compare: name two runs (or --matrix with at least two)")
    for a, b in pairs:
        if a == b:
            raise FairnessError(f"run {a} is compared with itself: name two different runs")
    runs = list(dict.fromkeys(r for pair in pairs for r in pair))
    with scoped(con, runs, split, class_scores):
        _check_same_rows(con, pairs, runs, split)
        members = con.sql(bootstrap.MEMBERS_SQL, params={"split": split, "runs": runs}).to_arrow_table()
        try:
            bootstrap.load_weights(con, bootstrap.draw_weights(members, n_resamples, seed))
            con.execute(f"SET VARIABLE ci_level = {float(level)!r}")
            con.execute(bootstrap.REPLICATES_SQL, {"families": list(families) if families is not None else None})
            out: list[dict] = []
            for a, b in pairs:
                for row in con.sql(_PAIR_SQL, params={"run_a": a, "run_b": b}).to_arrow_table().to_pylist():
                    out.append({"run_a": a, "run_b": b, **row})
        finally:
            con.execute(f"DELETE FROM {RESAMPLE_WEIGHTS}")
            con.execute(f"DROP TABLE IF EXISTS {bootstrap.REPLICATES}")
            con.execute(f"SET VARIABLE ci_level = {float(CI_LEVEL)!r}")
    _holm_by_metric(out, 1 - level)
    return out


def _check_same_rows(con, pairs, runs, split) -> None:
    rows = {r["run_id"]: r["rows"] for r in con.sql(_ROWS_SQL, params={"split": split, "runs": runs})
            .to_arrow_table().to_pylist()}
    for run in runs:
        if not rows.get(run):
            raise FairnessError(f"run {run} has no predictions on split {split!r}: nothing to compare there")
    for a, b in pairs:
        if rows[a] != rows[b]:
            only_a, only_b = len(set(rows[a]) - set(rows[b])), len(set(rows[b]) - set(rows[a]))
            raise FairnessError(
                f"runs {a} and {b} were not scored on the same rows of split {split!r} ({only_a} rows only in "
                f"{a}, {only_b} only in {b}): a paired comparison needs the same patients; compare runs of one "
                "cohort and split")


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), in the order given."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def _holm_by_metric(rows: list[dict], alpha: float) -> None:
    """Fill ``p_adjusted`` and ``significant``: Holm over the pairs, within each (attribute, group_or_gap, metric)."""
    families: dict[tuple, list[dict]] = {}
    for r in rows:
        families.setdefault((r["split"], r["attribute"], r["group_or_gap"], r["metric"]), []).append(r)
    for members in families.values():
        defined = [r for r in members if r["p_value"] is not None]
        for r, p in zip(defined, holm([r["p_value"] for r in defined])):
            r["p_adjusted"] = float(p)
            if len(members) == 1:  # one comparison: the interval says it, and agrees with p < alpha up to ties
                r["significant"] = r["ci_low"] is not None and (r["ci_low"] > 0 or r["ci_high"] < 0)
            else:
                r["significant"] = bool(p < alpha)
        for r in members:
            r.setdefault("p_adjusted", None)
            r.setdefault("significant", False)


def print_comparison(rows: list[dict], runs: dict[str, dict], attributes: Sequence[str], level: float,
                     n_resamples: int, seed: int, matrix: bool) -> None:
    """One Rich table per pair: A, B, B - A [interval], p (Holm-adjusted with several pairs), * where significant."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    shown = {"all", *attributes}
    pairs = list(dict.fromkeys((r["run_a"], r["run_b"]) for r in rows))
    for a, b in pairs:
        table = Table(title=f"A = {_name(runs, a)}   B = {_name(runs, b)}", title_justify="left")
        for column in ("attribute", "group / gap", "metric", "n"):
            table.add_column(column, justify="right" if column == "n" else "left")
        for column in ("A", "B", f"B - A [{100 * level:g}% CI]", "p (Holm)" if matrix else "p"):
            table.add_column(column, justify="right")
        for r in rows:
            if (r["run_a"], r["run_b"]) != (a, b) or r["attribute"] not in shown:
                continue
            diff = "-" if r["difference"] is None else f"{r['difference']:+.3f}"
            if r["ci_low"] is not None:
                diff += f" [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
            if r["significant"]:
                diff += " *"
            p = r["p_adjusted"] if matrix else r["p_value"]
            table.add_row(r["attribute"], r["group_or_gap"], r["metric"], str(r["n"]), _fmt(r["value_a"]),
                          _fmt(r["value_b"]), diff, "-" if p is None else f"{p:.3f}")
        console.print(table)
    correction = (f"p and * Holm-adjusted over the {len(pairs)} pairs, per metric (metrics are not corrected "
                  "against each other)" if matrix else "one pair: no multiple-comparison correction")
    console.print(f"B - A with its paired bootstrap percentile interval: {n_resamples} resamples of patients within "
                  f"groups (seed {seed}), the same draws for both runs; * = the difference is significant at "
                  f"{100 * (1 - level):g}% ({correction}).")


def _name(runs: dict[str, dict], run_id: str) -> str:
    run = runs.get(run_id, {})
    return f"{run_id} ({run.get('model')}/{run.get('method')})"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"

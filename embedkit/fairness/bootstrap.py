"""Bootstrap confidence intervals for every metric and gap, computed by the same SQL views as the point estimates.

A replicate redraws the patients of each group of an attribute with replacement (stratified: every group keeps its
number of patients), and gives each prediction row the number of times its patient was drawn. Those multiplicities
go into the ``resample_weights`` table; ``group_rows`` multiplies each row's ``weight`` by them, so every view below
it computes replicate ``r`` beside the observed sample (replicate 0) in one query, and ``metric_intervals`` reads off
percentile intervals. No metric is written a second time in Python.

The interval reported (``ci_low``, ``ci_high``) is the BCa interval (bias-corrected and accelerated; Efron &
Tibshirani 1993, ch. 14): a max - min gap is biased upward (the replicates' gaps sit above the observed one), and a
percentile interval ignores that bias, so it often lies wholly above its own estimate. BCa shifts the quantile
levels by the bias z0 (the share of replicates below the estimate) and the skew a (from a jackknife: one patient
left out at a time, within its group, computed by the same views as negative replicates); unlike the basic
(reverse-percentile) interval it stays inside the range of the replicates (a gap's interval never goes below 0).
It is the interval scipy.stats.bootstrap(method='BCa') computes from the same draws (tests/test_fairness.py).
No interval built from replicate quantiles can contain an estimate that lies below (or above) 95% of the
replicates (BCa, like the percentile interval, then excludes it); ``ci_note`` says so, with the bias, instead of
printing an interval that seems to contradict its estimate. ``pct_low``/``pct_high`` keep the percentile interval.

Patients, not images, are the unit because images of one patient are not independent; the draws depend only on the
seed and on which patients a group holds, so runs scored on the same split share them (a paired comparison), and
adding an attribute does not change another attribute's draws.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedkit.fairness.db import CI_LEVEL, RESAMPLE_WEIGHTS, FairnessError, scoped

_MEMBERS_TEMPLATE = """
SELECT DISTINCT attribute, split, group_name, row_id, unit_id
FROM {rows}
WHERE replicate = 0 AND split = $split AND list_contains($runs, run_id)
ORDER BY attribute, group_name, row_id
"""

REPLICATES = "_embedkit_replicates"
_REPLICATES_TEMPLATE = f"""
CREATE OR REPLACE TEMP TABLE {REPLICATES} AS
SELECT run_id, split, attribute, group_or_gap, family, metric, replicate, value, n
FROM {{values}}
WHERE $families IS NULL OR list_contains($families, family)
"""
# Replicates after the first batch (bootstrap_intervals' ``batch``) are appended; the observed sample is in already.
_MORE_REPLICATES_TEMPLATE = f"""
INSERT INTO {REPLICATES}
SELECT run_id, split, attribute, group_or_gap, family, metric, replicate, value, n
FROM {{values}}
WHERE replicate <> 0 AND ($families IS NULL OR list_contains($families, family))
"""
_INTERVALS_SQL = f"SELECT * FROM interval_summary('{REPLICATES}') ORDER BY run_id, attribute, group_or_gap, metric"
_REPLICATE_VALUES_SQL = f"""
SELECT run_id, attribute, group_or_gap, metric, replicate, value
FROM {REPLICATES}
WHERE replicate <> 0 AND value IS NOT NULL
ORDER BY run_id, attribute, group_or_gap, metric, replicate
"""

# The views a bootstrap reads: the rows it resamples and the values it collects, per kind of run. A multi-label
# run's rows are label_group_rows (its y_true is NULL, so group_rows holds none of them); both join the same
# resample_weights, so a row's draws do not depend on which kind of run it belongs to.
SUITES: dict[str, tuple[str, str]] = {
    "multiclass": ("group_rows", "metric_values"),
    "multilabel": ("label_group_rows", "label_metric_values"),
}

# The multi-class queries, as before the templates. Shared with the paired comparisons
# (embedkit/fairness/compare.py), which load the same draws for two runs.
_MEMBERS_SQL = _MEMBERS_TEMPLATE.format(rows=SUITES["multiclass"][0])
_REPLICATES_SQL = _REPLICATES_TEMPLATE.format(values=SUITES["multiclass"][1])
MEMBERS_SQL, REPLICATES_SQL = _MEMBERS_SQL, _REPLICATES_SQL

WEIGHTS_SCHEMA = pa.schema(
    [
        pa.field("replicate", pa.int32()),
        pa.field("attribute", pa.string()),
        pa.field("split", pa.string()),
        pa.field("row_id", pa.string()),
        pa.field("multiplicity", pa.int64()),
    ]
)


def draw_weights(members: pa.Table, n_resamples: int, seed: int = 0) -> pa.Table:
    """Multiplicities of a stratified patient bootstrap.

    ``members``: one row per (attribute, split, group_name, row_id) with the row's ``unit_id`` (patient). Returns
    one row per (replicate, attribute, split, row_id) drawn at least once: replicate 1..n_resamples, multiplicity =
    how often the row's patient was drawn within its group. Each stratum (attribute, split, group) draws from its own
    generator, seeded by ``seed`` and the stratum's name, so the result does not depend on which other strata exist.
    """
    if n_resamples < 1:
        raise FairnessError(f"n_resamples must be at least 1, got {n_resamples}")
    frame = members.select(["attribute", "split", "group_name", "row_id", "unit_id"]).to_pandas()
    parts: list[pa.Table] = []
    for (attribute, split, group), rows in frame.groupby(["attribute", "split", "group_name"], sort=True):
        rows = rows.sort_values("row_id", kind="stable")
        units, unit_of_row = np.unique(rows["unit_id"].to_numpy(dtype=object).astype(str), return_inverse=True)
        n_units = len(units)
        key = zlib.crc32(f"{attribute}\x1f{split}\x1f{group}".encode())
        rng = np.random.default_rng([int(seed), key])
        draws = rng.integers(0, n_units, size=(n_resamples, n_units))
        # counts[b, u]: times unit u was drawn in replicate b (offset each replicate into its own range of bins)
        offsets = (np.arange(n_resamples)[:, None] * n_units + draws).ravel()
        counts = np.bincount(offsets, minlength=n_resamples * n_units).reshape(n_resamples, n_units)
        multiplicity = counts[:, unit_of_row]  # replicates x rows
        rep, row = np.nonzero(multiplicity)
        row_ids = rows["row_id"].to_numpy(dtype=object)
        parts.append(
            pa.table(
                {
                    "replicate": (rep + 1).astype(np.int32),
                    "attribute": pa.array([attribute] * len(rep), pa.string()),
                    "split": pa.array([split] * len(rep), pa.string()),
                    "row_id": pa.array(row_ids[row], pa.string()),
                    "multiplicity": multiplicity[rep, row].astype(np.int64),
                },
                schema=WEIGHTS_SCHEMA,
            )
        )
    if not parts:
        return WEIGHTS_SCHEMA.empty_table()
    return pa.concat_tables(parts)


def jackknife_weights(members: pa.Table) -> tuple[pa.Table, dict[tuple[str, int], tuple[str, int]]]:
    """Leave-one-patient-out replicates, numbered -1, -2, ... per (attribute, split): replicate -k holds every row of
    the attribute's split except the rows of the k-th patient (within its group: the strata of the bootstrap).

    Returns the multiplicities (as :func:`draw_weights`) and, per (attribute, replicate), the patient's stratum and
    that stratum's number of patients (the jackknife's n in the acceleration).
    """
    frame = members.select(["attribute", "split", "group_name", "row_id", "unit_id"]).to_pandas()
    frame["unit_id"] = frame["unit_id"].astype(str)
    parts: list[pa.Table] = []
    strata: dict[tuple[str, int], tuple[str, int]] = {}
    for (attribute, split), rows in frame.groupby(["attribute", "split"], sort=True):
        rows = rows.sort_values(["group_name", "row_id"], kind="stable").reset_index(drop=True)
        units = rows[["group_name", "unit_id"]].drop_duplicates().reset_index(drop=True)
        sizes = units.groupby("group_name").size()
        row_ids = rows["row_id"].to_numpy(dtype=object)
        for k, (group, unit) in enumerate(units.itertuples(index=False), start=1):
            keep = ~((rows["group_name"] == group) & (rows["unit_id"] == unit)).to_numpy()
            strata[(attribute, -k)] = (group, int(sizes[group]))
            parts.append(pa.table({
                "replicate": pa.array(np.full(int(keep.sum()), -k, dtype=np.int32)),
                "attribute": pa.array([attribute] * int(keep.sum()), pa.string()),
                "split": pa.array([split] * int(keep.sum()), pa.string()),
                "row_id": pa.array(row_ids[keep], pa.string()),
                "multiplicity": pa.array(np.ones(int(keep.sum()), dtype=np.int64)),
            }, schema=WEIGHTS_SCHEMA))
    return (pa.concat_tables(parts) if parts else WEIGHTS_SCHEMA.empty_table()), strata


def bca_bounds(value: float, draws: np.ndarray, jackknife: dict[str, np.ndarray], level: float
               ) -> tuple[float, float, str | None]:
    """The BCa interval of one statistic: ``draws`` its bootstrap replicates, ``jackknife`` its leave-one-out values
    per stratum. Returns (low, high, note); the note says why an interval does not contain the estimate."""
    from scipy.special import ndtr, ndtri

    alpha = (1 - level) / 2
    p0 = (np.count_nonzero(draws < value) + np.count_nonzero(draws <= value)) / (2 * len(draws))
    num = den = 0.0
    for values in jackknife.values():
        n = len(values)
        u = (n - 1) * (values.mean() - values)
        num += float(np.sum(u ** 3)) / n ** 3
        den += float(np.sum(u ** 2)) / n ** 2
    accel = num / (6 * den ** 1.5) if den > 0 else 0.0
    note = None
    if p0 in (0.0, 1.0):
        low, high = np.quantile(draws, [alpha, 1 - alpha])
        side = "below" if p0 == 0 else "above"
        note = (f"the estimate lies {side} every replicate (bias {draws.mean() - value:+.3f}): no bootstrap interval "
                "contains it; percentile interval shown")
        return float(low), float(high), note
    z0 = float(ndtri(p0))
    levels = []
    for z in (float(ndtri(alpha)), -float(ndtri(alpha))):
        levels.append(float(ndtr(z0 + (z0 + z) / (1 - accel * (z0 + z)))))
    low, high = np.quantile(draws, levels)
    if not low <= value <= high:
        note = (f"the estimate lies {'below' if value < low else 'above'} {100 * (1 - p0 if value < low else p0):.0f}% "
                f"of the replicates (bias {draws.mean() - value:+.3f}, typical of a max - min gap on small groups): "
                "no interval built from them can contain it")
    return float(low), float(high), note


def bootstrap_intervals(
    con,
    run_ids: Sequence[str],
    split: str = "test",
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = CI_LEVEL,
    families: Iterable[str] | None = None,
    class_scores: bool = True,
    suite: str = "multiclass",
    bca: bool = True,
    batch: int | None = None,
) -> pa.Table:
    """Every metric and gap of ``run_ids`` on ``split`` with its BCa bootstrap interval (see the module docstring).

    ``con`` comes from :func:`embedkit.fairness.db.connect`. Returns the rows of ``metric_intervals`` (run_id,
    split, attribute, group_or_gap, family, metric, value, n, n_replicates) with ``ci_low``/``ci_high`` the BCa
    interval, ``pct_low``/``pct_high`` the percentile one and ``ci_note`` (why an interval excludes its estimate, else
    null). ``families`` keeps only those metric families (e.g. ``["macro_f1", "f1_gap", "eqodds"]``);
    ``class_scores=False`` skips AUC and classwise ECE, the costly part. ``suite="multilabel"`` resamples the
    multi-label runs' rows and reads ``label_metric_values`` (per-label metrics, underdiagnosis, their gaps) instead.
    ``bca=False`` skips the jackknife (one replicate per patient: on tens of thousands of patients it costs more than
    the bootstrap itself): ``ci_low``/``ci_high`` are then the percentile interval. ``batch`` computes that many
    replicates per query (None: all in one): the same draws and results, in bounded memory (a 200-replicate pass over
    a 100,000-row multi-label split is a few hundred million label rows). Deterministic for a given seed; the
    resample table is emptied afterwards.
    """
    if not 0 < level < 1:
        raise FairnessError(f"the confidence level must lie between 0 and 1, got {level}")
    runs = list(run_ids)
    if not runs:
        raise FairnessError("no run to bootstrap: name at least one run_id")
    if suite not in SUITES:
        raise FairnessError(f"unknown metric suite {suite!r}: one of {', '.join(SUITES)}")
    rows_view, values_view = SUITES[suite]
    with scoped(con, runs, split, class_scores):
        members = con.sql(_MEMBERS_TEMPLATE.format(rows=rows_view),
                          params={"split": split, "runs": runs}).to_arrow_table()
        if members.num_rows == 0:
            raise FairnessError(f"no predictions of run(s) {', '.join(runs)} on split {split!r} to resample")
        jackknife, strata = jackknife_weights(members) if bca else (WEIGHTS_SCHEMA.empty_table(), {})
        draws = draw_weights(members, n_resamples, seed)
        step = n_resamples if not batch else max(1, int(batch))
        params = {"families": list(families) if families is not None else None}
        try:
            con.execute(f"SET VARIABLE ci_level = {float(level)!r}")
            for first in range(1, n_resamples + 1, step):
                if step == n_resamples:
                    part = draws
                else:
                    replicate = draws.column("replicate")
                    part = draws.filter(pc.and_(pc.greater_equal(replicate, first),
                                                pc.less(replicate, first + step)))
                _load_weights(con, pa.concat_tables([part, jackknife]) if first == 1 else part)
                sql = _REPLICATES_TEMPLATE if first == 1 else _MORE_REPLICATES_TEMPLATE
                con.execute(sql.format(values=values_view), params)
            table = con.sql(_INTERVALS_SQL).to_arrow_table()
            replicates = con.sql(_REPLICATE_VALUES_SQL).to_arrow_table()
        finally:
            con.execute(f"DELETE FROM {RESAMPLE_WEIGHTS}")
            con.execute(f"DROP TABLE IF EXISTS {REPLICATES}")
            con.execute(f"SET VARIABLE ci_level = {float(CI_LEVEL)!r}")
    if not bca:
        return _percentile_only(table)
    return _with_bca(table, replicates, strata, level)


def _percentile_only(table: pa.Table) -> pa.Table:
    """``table`` (interval_summary rows) in :func:`bootstrap_intervals`' columns with the percentile interval as
    ci_* (no jackknife: no BCa correction), pct_* the same, and no note."""
    pct = table.rename_columns(["pct_low" if c == "ci_low" else "pct_high" if c == "ci_high" else c
                                for c in table.column_names])
    return (pct.append_column("ci_low", pct.column("pct_low"))
            .append_column("ci_high", pct.column("pct_high"))
            .append_column("ci_note", pa.nulls(pct.num_rows, pa.string())))


def _with_bca(table: pa.Table, replicates: pa.Table, strata: dict, level: float) -> pa.Table:
    """``table`` (interval_summary rows) with the percentile bounds renamed pct_* and the BCa ones as ci_*."""
    import pandas as pd

    keys = ["run_id", "attribute", "group_or_gap", "metric"]
    frame = replicates.to_pandas()
    # one integer per statistic; the replicate rows sorted by it, each statistic a contiguous slice
    codes = frame.groupby(keys, sort=False).ngroup().to_numpy() if len(frame) else np.zeros(0, dtype=int)
    firsts = frame.drop_duplicates(keys)[keys]
    position = {key: i for i, key in enumerate(firsts.itertuples(index=False, name=None))}
    order = np.argsort(codes, kind="stable")
    codes, values = codes[order], frame["value"].to_numpy(dtype=float)[order]
    replicate = frame["replicate"].to_numpy()[order]
    lookup = pd.DataFrame([(a, r, g) for (a, r), (g, _) in strata.items()], columns=["attribute", "replicate", "g"])
    stratum = (frame[["attribute", "replicate"]].iloc[order].merge(lookup, how="left", on=["attribute", "replicate"])
               ["g"].fillna("").to_numpy(dtype=object))
    bounds = np.searchsorted(codes, np.arange(len(position) + 1))
    low, high, notes = [], [], []
    for row in table.select([*keys, "value"]).to_pylist():
        i = position.get(tuple(row[k] for k in keys))
        result = (None, None, None)
        if i is not None and row["value"] is not None:
            part = slice(bounds[i], bounds[i + 1])
            draws = values[part][replicate[part] > 0]
            jack = replicate[part] < 0
            groups = {g: values[part][jack][stratum[part][jack] == g] for g in set(stratum[part][jack])}
            if len(draws):
                result = bca_bounds(float(row["value"]), draws, groups, level)
        low.append(result[0]), high.append(result[1]), notes.append(result[2])
    table = table.rename_columns(["pct_low" if c == "ci_low" else "pct_high" if c == "ci_high" else c
                                  for c in table.column_names])
    return (table.append_column("ci_low", pa.array(low, pa.float64()))
            .append_column("ci_high", pa.array(high, pa.float64()))
            .append_column("ci_note", pa.array(notes, pa.string())))


def _load_weights(con, weights: pa.Table) -> None:
    con.execute(f"DELETE FROM {RESAMPLE_WEIGHTS}")
    con.register("_embedkit_draws", weights)
    try:
        con.execute(f"INSERT INTO {RESAMPLE_WEIGHTS} SELECT * FROM _embedkit_draws")
    finally:
        con.unregister("_embedkit_draws")


load_weights = _load_weights  # the draws as the views read them (compare.py loads them for two runs at once)

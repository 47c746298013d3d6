"""Bootstrap confidence intervals for every metric and gap, computed by the same SQL views as the point estimates.

A replicate redraws the patients of each group of an attribute with replacement (stratified: every group keeps its
number of patients), and gives each prediction row the number of times its patient was drawn. Those multiplicities
go into the ``resample_weights`` table; ``group_rows`` multiplies each row's ``weight`` by them, so every view below
it computes replicate ``r`` beside the observed sample (replicate 0) in one query, and ``metric_intervals`` reads off
percentile intervals. No metric is written a second time in Python.

Patients, not images, are the unit because images of one patient are not independent; the draws depend only on the
seed and on which patients a group holds, so runs scored on the same split share them (a paired comparison), and
adding an attribute does not change another attribute's draws.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from embedkit.fairness.db import CI_LEVEL, RESAMPLE_WEIGHTS, FairnessError, scoped

_MEMBERS_SQL = """
SELECT DISTINCT attribute, split, group_name, row_id, unit_id
FROM group_rows
WHERE replicate = 0 AND split = $split AND list_contains($runs, run_id)
ORDER BY attribute, group_name, row_id
"""

_INTERVALS_SQL = """
SELECT *
FROM metric_intervals
ORDER BY run_id, attribute, group_or_gap, metric
"""

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


def bootstrap_intervals(
    con,
    run_ids: Sequence[str],
    split: str = "test",
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = CI_LEVEL,
    families: Iterable[str] | None = None,
    class_scores: bool = True,
) -> pa.Table:
    """Every metric and gap of ``run_ids`` on ``split`` with its percentile bootstrap interval.

    ``con`` comes from :func:`embedkit.fairness.db.connect`. Returns the rows of ``metric_intervals``: run_id,
    split, attribute, group_or_gap, family, metric, value, n, ci_low, ci_high, n_replicates. ``families`` keeps only
    those metric families (e.g. ``["macro_f1", "f1_gap", "eqodds"]``); ``class_scores=False`` skips AUC and
    classwise ECE, the costly part. Deterministic for a given seed; the resample table is emptied afterwards.
    """
    if not 0 < level < 1:
        raise FairnessError(f"the confidence level must lie between 0 and 1, got {level}")
    runs = list(run_ids)
    if not runs:
        raise FairnessError("no run to bootstrap: name at least one run_id")
    with scoped(con, runs, split, class_scores):
        members = con.sql(_MEMBERS_SQL, params={"split": split, "runs": runs}).to_arrow_table()
        if members.num_rows == 0:
            raise FairnessError(f"no predictions of run(s) {', '.join(runs)} on split {split!r} to resample")
        weights = draw_weights(members, n_resamples, seed)
        try:
            _load_weights(con, weights)
            con.execute(f"SET VARIABLE ci_level = {float(level)!r}")
            table = con.sql(_INTERVALS_SQL).to_arrow_table()
        finally:
            con.execute(f"DELETE FROM {RESAMPLE_WEIGHTS}")
            con.execute(f"SET VARIABLE ci_level = {float(CI_LEVEL)!r}")
    if families is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table["family"], pa.array(list(families), pa.string())))
    return table


def _load_weights(con, weights: pa.Table) -> None:
    con.execute(f"DELETE FROM {RESAMPLE_WEIGHTS}")
    con.register("_embedkit_draws", weights)
    try:
        con.execute(f"INSERT INTO {RESAMPLE_WEIGHTS} SELECT * FROM _embedkit_draws")
    finally:
        con.unregister("_embedkit_draws")

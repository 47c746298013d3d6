"""What a report shows, read from the store: the runs selected, their metrics and intervals, their reliability bins.

Every number comes from the fairness views (``fairness_summary``, ``calibration_bins``) or from
:func:`embedkit.fairness.bootstrap.bootstrap_intervals`, which computes intervals through the same views; this module
only selects, filters and reshapes. Arms (one model, weights, method and cohort, possibly several seeds) are the rows
of the report's tables; pooling seeds (mean and standard deviation) happens in :mod:`embedkit.report.tables`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from embedkit.constants import is_random_weights
from embedkit.errors import EmbedkitError
from embedkit.fairness import catalogue
from embedkit.store.store import Store

RANDOM_LABEL = "random weights"
ARM_SEPARATOR = "\x1f"  # joins an arm's key parts into one string (a plain groupby key)


class ReportError(EmbedkitError):
    pass


@dataclass
class ReportData:
    """Everything a report renders, as frames (one row per run; per metric value; per reliability bin)."""

    runs: pd.DataFrame  # run_id, model, weights_id, method, cohort, seed, study_id, created_at, code_version, n,
    #                     random_weights, setting (config minus seed-like keys), arm (the pooled row's key as
    #                     text: runs pool only when all but the seed is equal), variant (what sets the arm apart
    #                     from arms of the same model and method, e.g. "epochs=20"; "" when nothing needs saying)
    values: pd.DataFrame  # run_id, attribute, group_or_gap, metric, value, n, ci_low, ci_high, ci_note
    bins: pd.DataFrame  # run_id, attribute, group_name, bin, n, confidence, accuracy
    classes: list[str]
    split: str
    attributes: list[str]
    n_resamples: int
    seed: int
    study: str | None = None
    store_path: str = ""
    skipped: list[str] = field(default_factory=list)  # selected runs without predictions on the split
    # The multi-label runs' section (embedkit/report/multilabel.py); None when no multi-label run is selected.
    multilabel: object | None = None

    @property
    def has_multiclass(self) -> bool:
        """Whether multi-class runs are reported (their tables and figures): a selection may hold only
        multi-label runs, which ``runs`` then lists for the header."""
        return self.multilabel is None or not self.values.empty


def select_runs(
    store: Store,
    runs: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    study: str | None = None,
) -> pd.DataFrame:
    """The stored runs matching every filter given (none given: all runs), oldest first
    (:func:`embedkit.store.runs.select_runs`).

    Unknown run ids raise ReportError naming them; a selection that matches nothing raises with what exists.
    """
    from embedkit.store.runs import select_runs as stored_runs

    if not store.has("runs"):
        raise ReportError(f"the store {store.path} has no runs yet: run a head (e.g. `embedkit probe`) first")
    if runs:
        unknown = sorted(set(runs) - set(stored_runs(store, run_ids=runs).column("run_id").to_pylist()))
        if unknown:
            raise ReportError(f"no run {', '.join(map(repr, unknown))} in {store.path}: list them with `embedkit runs`")
    frame = stored_runs(store, runs, models, methods, study).to_pandas()
    if frame.empty:
        everything = stored_runs(store).to_pandas()
        have = "; ".join(
            f"{c}: {', '.join(sorted(map(str, everything[c].dropna().unique()))) or 'none'}"
            for c in ("model", "method", "study_id")
        )
        raise ReportError(f"no run matches the selection (models={models}, methods={methods}, study={study}). "
                          f"The store holds {have}.")
    return frame


def connection_attributes(by: Sequence[str]) -> list[str]:
    """The attributes to slice by: those asked for, plus the age x sex cells when the paper's F1 delta needs them."""
    attrs = catalogue.attributes_to_slice(by)
    if not attrs:
        raise ReportError("name at least one attribute for --by, e.g. sex,age_group")
    return attrs


def collect(
    store: Store,
    run_table: pd.DataFrame,
    split: str = "test",
    ci: int = 1000,
    by: Sequence[str] = ("sex", "age_group"),
    seed: int = 0,
    study: str | None = None,
) -> ReportData:
    """Read the metrics (with ``ci`` bootstrap resamples; 0: point values only) and reliability bins of the runs.

    Runs without predictions on ``split`` are left out (listed in ``ReportData.skipped``); none with any raises.
    """
    from embedkit.fairness.bootstrap import bootstrap_intervals
    from embedkit.fairness.db import connect, scoped

    from embedkit.store.runs import prediction_counts

    attributes = [a for a in dict.fromkeys(a.strip() for a in by) if a and a != "all"]
    counts = prediction_counts(store, run_table["run_id"].tolist())
    scored = {run_id for run_id, splits in counts.items() if splits.get(split)}
    con = connect(store, connection_attributes(attributes))
    skipped = [r for r in run_table["run_id"] if r not in scored]
    run_table = run_table[run_table["run_id"].isin(scored)]
    if run_table.empty:
        raise ReportError(f"the selected run(s) have no predictions on split {split!r}: pick another --split")
    run_ids = run_table["run_id"].tolist()
    multilabel, run_table, run_ids = _multilabel_section(store, con, run_table, attributes, split, ci, seed)
    if not run_ids:  # only multi-label runs: their section, and an empty multi-class part
        return _multilabel_only(store, run_table, multilabel, split, attributes, ci, seed, study, skipped)

    # The report shows no AUC or classwise ECE: class_scores=False skips them, the costly part of every replicate.
    families = catalogue.report_families()
    if ci > 0:
        values = bootstrap_intervals(con, run_ids, split, n_resamples=ci, seed=seed, families=families,
                                     class_scores=False).to_pandas()
    else:
        per_class = [m.family for m in catalogue.METRICS if m.per_class and m.family in families]
        with scoped(con, run_ids, split, class_scores=False):
            values = con.sql(
                "SELECT run_id, attribute, group_or_gap, metric, value, n FROM fairness_summary "
                "WHERE list_contains($metrics, metric) OR list_contains($per_class, split_part(metric, '[', 1))",
                params={"metrics": [f for f in families if f not in per_class], "per_class": per_class},
            ).to_arrow_table().to_pandas()
        values["ci_low"] = float("nan")
        values["ci_high"] = float("nan")
        values["ci_note"] = None
    keep = values["attribute"].isin(["all", *attributes])
    values = values.loc[keep, ["run_id", "attribute", "group_or_gap", "metric", "value", "n", "ci_low", "ci_high",
                               "ci_note"]]

    with scoped(con, run_ids, split, class_scores=False):
        bins = con.sql(
            "SELECT run_id, attribute, group_name, bin, n, confidence, accuracy FROM calibration_bins "
            "WHERE replicate = 0 AND list_contains($attrs, attribute) ORDER BY run_id, attribute, group_name, bin",
            params={"attrs": attributes},
        ).to_arrow_table().to_pandas()
    classes = con.sql("SELECT class_name FROM run_classes WHERE run_id = $r ORDER BY class_index",
                      params={"r": run_ids[0]}).to_arrow_table().column("class_name").to_pylist()
    counts = (values[(values["attribute"] == "all") & (values["metric"] == "accuracy")]
              .set_index("run_id")["n"])

    runs = run_table.reset_index(drop=True).copy()
    runs["n"] = runs["run_id"].map(counts).astype("Int64")
    runs["random_weights"] = runs["weights_id"].map(is_random_weights)
    runs["setting"] = runs["config"].map(_setting)
    runs["arm"] = runs.apply(lambda r: ARM_SEPARATOR.join(map(str, [*arm_key(r), r["setting"]])), axis=1)
    runs["variant"] = _variants(runs)
    return ReportData(runs=runs, values=values.reset_index(drop=True), bins=bins, classes=classes, split=split,
                      attributes=attributes, n_resamples=int(ci), seed=int(seed), study=study,
                      store_path=str(store.path), skipped=skipped, multilabel=multilabel)


def _multilabel_section(store: Store, con, run_table: pd.DataFrame, attributes: list[str], split: str, ci: int,
                        seed: int):
    """The multi-label runs' section (None without any), the multi-label runs' table when they are all the selection
    holds (else the multi-class runs'), and the multi-class run ids."""
    from embedkit.fairness.multilabel import TASK, run_tasks
    from embedkit.report.multilabel import collect_multilabel

    tasks = run_tasks(store, run_table["run_id"].tolist())
    is_ml = run_table["run_id"].map(lambda r: tasks.get(r) == TASK)
    if not is_ml.any():
        return None, run_table, run_table["run_id"].tolist()
    ml = run_table[is_ml]
    section = collect_multilabel(con, ml[["run_id", "model", "method", "weights_id"]].to_dict("records"),
                                 attributes, split, ci, seed, min_n=0)
    rest = run_table[~is_ml]
    return section, (rest if len(rest) else ml), rest["run_id"].tolist()


def _multilabel_only(store: Store, run_table: pd.DataFrame, section, split: str, attributes: list[str], ci: int,
                     seed: int, study: str | None, skipped: list[str]) -> ReportData:
    """ReportData of a selection of multi-label runs only: the runs for the header, no multi-class values."""
    runs = run_table.reset_index(drop=True).copy()
    n = {r["run_id"]: r["n"] for r in section.rows if r["attribute"] == "all" and r["family"] == "positives"}
    runs["n"] = runs["run_id"].map(n).astype("Int64")
    runs["random_weights"] = runs["weights_id"].map(is_random_weights)
    runs["setting"] = runs["config"].map(_setting)
    runs["arm"] = [ARM_SEPARATOR.join(map(str, [*arm_key(r), r["setting"]])) for _, r in runs.iterrows()]
    runs["variant"] = ""
    values = pd.DataFrame(columns=["run_id", "attribute", "group_or_gap", "metric", "value", "n", "ci_low", "ci_high",
                                   "ci_note"])
    bins = pd.DataFrame(columns=["run_id", "attribute", "group_name", "bin", "n", "confidence", "accuracy"])
    return ReportData(runs=runs, values=values, bins=bins, classes=[], split=split, attributes=attributes,
                      n_resamples=int(ci), seed=int(seed), study=study, store_path=str(store.path), skipped=skipped,
                      multilabel=section)


def arm_key(run: pd.Series) -> tuple:
    """The pooled row a run belongs to: its cohort, model, weights (every random init counts as one) and method."""
    weights = RANDOM_LABEL if is_random_weights(run["weights_id"]) else run["weights_id"]
    return (run["cohort"], run["model"], weights, run["method"])


def _setting(config: str | None) -> str:
    """The run's settings as text (embedkit.store.store.run_setting): runs that differ here are different arms."""
    from embedkit.store.store import run_setting

    return json.dumps(run_setting(config), sort_keys=True, default=str)


def _variants(runs: pd.DataFrame) -> pd.Series:
    """Per run, the settings that tell its arm from the other arms of the same (cohort, model, weights, method):
    ``"epochs=20, lr=0.001"``; the cohort's fingerprint shows as "cohort rows <hash>" (a re-imported cohort)."""
    keys = runs.apply(arm_key, axis=1)
    out = pd.Series("", index=runs.index, dtype=object)
    for _, members in runs.groupby(keys.map(str)):
        if members["arm"].nunique() < 2:
            continue
        settings = {i: json.loads(s) for i, s in members["setting"].items()}
        names = sorted({k for s in settings.values() for k in s})
        differ = [k for k in names if len({json.dumps(s.get(k), sort_keys=True) for s in settings.values()}) > 1]
        for i, s in settings.items():
            out[i] = ", ".join(f"cohort rows {str(s.get(k))[-8:]}" if k == "cohort_fingerprint" else f"{k}={s.get(k)}"
                               for k in differ)
    return out

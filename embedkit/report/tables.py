"""The report's tables: the paper's utility and fairness tables, and per-group values, one row per arm.

An arm is one (cohort, model, weights, method); its runs are seeds. A cell of a one-run arm reads "value [lo, hi]"
(the bootstrap interval); a cell of a several-run arm reads "mean ± std", the standard deviation (ddof = 1)
over its runs' values. Cells whose group (or, for a gap, smallest compared group) holds fewer than ``min_n`` rows carry
a flag. Values are the views' own: pooling over seeds is the only arithmetic here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from embedkit.constants import MIN_GROUP_N
from embedkit.fairness import catalogue
from embedkit.fairness.catalogue import OUTSIDE_FLAG, SMALL_FLAG
from embedkit.fairness.db import CI_LEVEL, ECE_BINS
from embedkit.report.data import RANDOM_LABEL, ReportData, arm_key

METHOD_LABELS: dict[str, str] = {
    "zeroshot": "zero-shot", "lp": "linear probe", "mlp": "MLP head", "logreg": "logistic regression",
    "lora": "LoRA", "ft": "full fine-tuning",
}
ATTRIBUTE_LABELS: dict[str, str] = {"sex": "sex", "age_group": "age", "age_group_sex": "age x sex", "view": "view"}
PAPER_ATTRIBUTES = ("age_group", "sex")  # the paper's variants are defined for these attributes only
RUN_COLUMNS: tuple[str, ...] = ("Run", "Model", "Weights", "Method", "Seed", "Cohort", "Study", "n")


@dataclass
class Cell:
    """One number of a table: a run's value with its interval, or the mean and spread over an arm's seeds."""

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    std: float | None = None
    k: int = 1  # runs pooled
    n: int | None = None  # rows of the group (smallest over the pooled runs)
    digits: int = 3
    small: bool = False
    show_n: bool = False
    outside: bool = False  # the bootstrap interval excludes the value (ci_note of embedkit.fairness.bootstrap)

    def text(self) -> str:
        """The cell as text: value [lo, hi] or mean ± std, then (n=..) when asked and the small-group flag."""
        if self.value is None or _missing(self.value):
            return "—"
        d = self.digits
        if self.k > 1:
            spread = "" if self.std is None or _missing(self.std) else f" ± {self.std:.{d}f}"
            out = f"{self.value:.{d}f}{spread}"  # the row's Runs column says how many seeds
        elif self.ci_low is not None and not _missing(self.ci_low) and not _missing(self.ci_high):
            out = f"{self.value:.{d}f} [{self.ci_low:.{d}f}, {self.ci_high:.{d}f}]"
            out += f" {OUTSIDE_FLAG}" if self.outside else ""
        else:
            out = f"{self.value:.{d}f}"
        if self.show_n and self.n is not None:
            out += f" (n={self.n})"
        return out + (f" {SMALL_FLAG}" if self.small else "")


@dataclass
class Table:
    """A titled table: label columns (text) then value columns (Cells); notes print under it."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[str | Cell]]
    notes: list[str] = field(default_factory=list)

    def text_rows(self) -> list[list[str]]:
        return [[c.text() if isinstance(c, Cell) else str(c) for c in row] for row in self.rows]


Pool = dict[tuple[str, str, str, str], dict]  # (arm, attribute, group_or_gap, metric) -> pooled row


def pooled(data: ReportData, per_run: bool = False) -> Pool:
    """Every (arm, attribute, group_or_gap, metric): mean and std over the arm's runs (ddof 1), k runs, the smallest
    n, and the interval of a one-run arm. ``per_run``: keyed by run_id instead, every run its own row."""
    if per_run:
        frame = data.values.assign(arm=data.values["run_id"])
    else:
        frame = data.values.merge(data.runs[["run_id", "arm"]], on="run_id")
    grouped = frame.groupby(["arm", "attribute", "group_or_gap", "metric"], sort=False)
    out = grouped.agg(value=("value", "mean"), std=("value", "std"), k=("run_id", "nunique"), n=("n", "min"),
                      ci_low=("ci_low", "first"), ci_high=("ci_high", "first"), ci_note=("ci_note", "first"))
    # an interval belongs to one run: a pooled row shows the spread over seeds instead
    out.loc[out["k"] > 1, ["ci_low", "ci_high"]] = float("nan")
    return dict(zip(out.index, out.to_dict("records")))


def arms(data: ReportData) -> list[str]:
    """The arms in display order: cohort, model (first seen), released weights before random ones, method order."""
    from embedkit.constants import RUN_METHODS as METHODS

    model_order = {m: i for i, m in enumerate(dict.fromkeys(data.runs["model"]))}
    method_order = {m: i for i, m in enumerate(METHODS)}

    def order(arm: str):
        cohort, model, weights, method = arm_parts(data, arm)
        return (str(cohort), model_order[model], weights == RANDOM_LABEL, str(weights),
                method_order.get(method, len(METHODS)), str(method))

    return sorted(dict.fromkeys(data.runs["arm"]), key=order)


def ordered_runs(data: ReportData) -> list[str]:
    """Run ids in the tables' arm order, seeds ascending within an arm."""
    out: list[str] = []
    for arm in arms(data):
        runs = arm_runs(data, arm)
        out += runs.sort_values(["seed", "run_id"], na_position="first")["run_id"].tolist()
    return out


def arm_parts(data: ReportData, arm: str) -> tuple:
    """(cohort, model, weights label, method) of an arm, read off its first run."""
    return arm_key(data.runs[data.runs["arm"] == arm].iloc[0])


def arm_runs(data: ReportData, arm: str) -> pd.DataFrame:
    return data.runs[data.runs["arm"] == arm]


def arm_name(data: ReportData, arm: str) -> str:
    """A short label for figures, one part a line: [cohort,] model, '(random)' for random weights, method."""
    cohort, model, weights, method = arm_parts(data, arm)
    lines = [model] + (["(random)"] if weights == RANDOM_LABEL else []) + [method_label(data, arm)]
    return "\n".join(([str(cohort)] if multiple_cohorts(data) else []) + lines)


def method_label(data: ReportData, arm: str) -> str:
    """The arm's method as a person reads it, with what sets it apart from its siblings: 'MLP head (epochs=20)'."""
    method = arm_parts(data, arm)[3]
    variant = arm_runs(data, arm)["variant"].iloc[0]
    return METHOD_LABELS.get(method, method) + (f" ({variant})" if variant else "")


def arm_labels(data: ReportData, arm: str) -> list[str]:
    """The label cells of an arm's row: [cohort,] model, weights, method, runs."""
    cohort, model, weights, method = arm_parts(data, arm)
    labels = [model, short_weights(weights), method_label(data, arm), seeds_label(arm_runs(data, arm))]
    return ([str(cohort)] if multiple_cohorts(data) else []) + labels


def arm_columns(data: ReportData) -> list[str]:
    return (["Cohort"] if multiple_cohorts(data) else []) + ["Model", "Weights", "Method", "Runs"]


def multiple_cohorts(data: ReportData) -> bool:
    return data.runs["cohort"].nunique(dropna=False) > 1


def short_weights(weights: str | None) -> str:
    """Weights as a table shows them: 'random weights', or the first 12 characters of the content hash."""
    if weights is None or _missing(weights):
        return "—"
    return weights if weights == RANDOM_LABEL or len(weights) <= 14 else weights[:12] + "…"


def seeds_label(runs: pd.DataFrame) -> str:
    """'1 run (seed 77)' or '3 runs (seeds 77, 78, 79)'."""
    seeds = [str(int(s)) for s in runs["seed"].tolist() if not _missing(s)]
    what = f"{len(runs)} run" + ("s" if len(runs) > 1 else "")
    if not seeds:
        return what
    return f"{what} (seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)})"


def cell(pool: Pool, arm: str, attribute: str, group: str, metric: str, min_n: int, show_n: bool = False) -> Cell:
    """The Cell of one arm's metric; an absent value (undefined, or not computed) is an empty Cell."""
    row = pool.get((arm, attribute, group, metric))
    if row is None:
        return Cell(None)
    n = None if _missing(row["n"]) else int(row["n"])
    return Cell(
        value=None if _missing(row["value"]) else float(row["value"]),
        ci_low=None if _missing(row["ci_low"]) else float(row["ci_low"]),
        ci_high=None if _missing(row["ci_high"]) else float(row["ci_high"]),
        std=None if _missing(row["std"]) else float(row["std"]),
        k=int(row["k"]), n=n, digits=catalogue.digits(metric), small=n is not None and n < min_n, show_n=show_n,
        outside=isinstance(row.get("ci_note"), str),
    )


def gap_cell(pool: Pool, arm: str, attribute: str, metric: str, min_n: int) -> Cell:
    """A gap's Cell: max - min gaps sit under group_or_gap 'gap', the paper's signed ones under their direction."""
    for a, attr, group, m in pool:
        if a == arm and attr == attribute and m == metric:
            return cell(pool, arm, attribute, group, metric, min_n)
    return Cell(None)


def gap_direction(data: ReportData, attribute: str, metric: str) -> str | None:
    """The direction a signed paper gap reads in (e.g. 'old-young'), from the values themselves."""
    rows = data.values[(data.values["attribute"] == attribute) & (data.values["metric"] == metric)]
    return rows["group_or_gap"].iloc[0] if len(rows) else None


def groups_of(data: ReportData, attribute: str) -> list[str]:
    """The groups of an attribute in the values, in a stable order (young before old, M before F, else sorted)."""
    from embedkit.constants import AGE_GROUPS, SEXES

    found = data.values.loc[(data.values["attribute"] == attribute) & (data.values["metric"] == "macro_f1"),
                            "group_or_gap"].unique().tolist()
    known = [g for g in (*AGE_GROUPS, *SEXES) if g in found]
    return known + sorted(g for g in found if g not in known)


def build_tables(data: ReportData, min_n: int = MIN_GROUP_N) -> list[Table]:
    """The report's tables in display order: utility, fairness, the paper's variants, F1 and ECE per group."""
    pool = pooled(data)
    order = arms(data)
    labels = arm_columns(data)
    small_note = f"{SMALL_FLAG}: the group (for a gap, the smallest compared group) holds fewer than {min_n} rows."
    spread_note = (f"One run: {_interval_words(data)}. Several seeds: mean ± standard deviation (ddof 1) over "
                   "the seeds.")
    tables: list[Table] = []

    util_cols = _whole_split_columns(data, catalogue.in_report_table("utility"))
    rows = []
    for arm in order:
        n = pool.get((arm, "all", "all", "accuracy"), {}).get("n")
        rows.append(arm_labels(data, arm) + [str(int(n)) if n is not None and not _missing(n) else "—"]
                    + [cell(pool, arm, "all", "all", m, min_n) for _, m, _ in util_cols])
    tables.append(Table("utility", f"Utility on the {data.split} split", labels + ["n"] + [h for _, _, h in util_cols],
                        rows, [spread_note]))

    fair_cols = _columns(data, catalogue.in_report_table("fairness"), data.attributes)
    rows = []
    for arm in order:
        rows.append(arm_labels(data, arm) + [
            cell(pool, arm, "all", "all", m, min_n) if a == "all" else gap_cell(pool, arm, a, m, min_n)
            for a, m, _ in fair_cols
        ])
    tables.append(Table(
        "fairness", "Fairness: spread across diseases and gaps between groups", labels + [h for _, _, h in fair_cols],
        rows,
        ["Var_F1: sample variance (ddof 1) of the per-class F1. F1 gap: max - min over groups of the group's "
         "macro-F1. EqOdds: per class (|ΔTPR| + |ΔFPR|) / 2, mean over classes and worst class. ECE gap: max - min "
         f"of the top-label ECE ({ECE_BINS} bins). Intervals are BCa (bias-corrected and accelerated). A max - min "
         f"gap is biased upwards under resampling: where the observed gap lies below almost every replicate, no "
         f"interval built from them contains it, and the cell is marked {OUTSIDE_FLAG}.", spread_note, small_note],
    ))

    paper_attrs = [a for a in data.attributes if a in PAPER_ATTRIBUTES]
    if paper_attrs:
        cols = _columns(data, catalogue.in_report_table("paper"), paper_attrs)
        rows = [arm_labels(data, arm) + [gap_cell(pool, arm, a, m, min_n) for a, m, _ in cols] for arm in order]
        tables.append(Table(
            "paper", "The paper's fairness variants", labels + [h for _, _, h in cols], rows,
            ["F1 Δ (paper): signed, cell-averaged over the age x sex cells, each cell's macro-F1 with "
             "zero_division = 1 (old minus young; M minus F averaged over age groups). L1-calibration gap: "
             "|g1 - g2| of the mean over classes of |p_c - y_c|, on probabilities.", spread_note, small_note],
        ))

    for metric in catalogue.in_report_table("groups"):
        cols = [(a, g) for a in data.attributes for g in groups_of(data, a)]
        rows = [arm_labels(data, arm) + [cell(pool, arm, a, g, metric.family, min_n, show_n=True) for a, g in cols]
                for arm in order]
        tables.append(Table(
            f"groups_{metric.family}", f"{metric.heading} per group",
            labels + [f"{ATTRIBUTE_LABELS.get(a, a)}: {g}" for a, g in cols], rows, [spread_note, small_note],
        ))
    return tables


def _whole_split_columns(data: ReportData, metrics: list[catalogue.Metric]) -> list[tuple[str, str, str]]:
    """(attribute 'all', metric, header) of group-level families, a per-class family expanded to its classes."""
    out = []
    for m in metrics:
        if m.level != "group":
            continue
        if m.per_class:
            out += [("all", m.metric(c), m.class_label(c)) for c in data.classes]
        else:
            out.append(("all", m.metric(), m.heading))
    return out


def _columns(data: ReportData, metrics: list[catalogue.Metric], attributes: list[str]) -> list[tuple[str, str, str]]:
    """(attribute, metric, header) of a table's columns: group-level families for the whole split, then each
    attribute's gaps (a signed gap's header says its direction, e.g. 'sex, M-F')."""
    cols = _whole_split_columns(data, metrics)
    for a in attributes:
        for m in metrics:
            if m.level != "gap":
                continue
            direction = gap_direction(data, a, m.family)
            where = ATTRIBUTE_LABELS.get(a, a) + (f", {direction}" if direction not in (None, "gap") else "")
            cols.append((a, m.family, f"{m.heading} ({where})"))
    return cols


def runs_table(data: ReportData, min_n: int = MIN_GROUP_N) -> Table:
    """One row per run with its own intervals (seeds are not pooled here): the appendix, and what a study reads."""
    pool = pooled(data, per_run=True)
    cols = _columns(data, catalogue.in_report_table("runs"), data.attributes)
    rows = []
    for run_id in ordered_runs(data):
        r = data.runs[data.runs["run_id"] == run_id].iloc[0]
        weights = RANDOM_LABEL if r["random_weights"] else short_weights(r["weights_id"])
        labels = [r["run_id"], r["model"], weights, METHOD_LABELS.get(r["method"], r["method"]),
                  "—" if _missing(r["seed"]) else str(int(r["seed"])), str(r["cohort"]),
                  "—" if _missing(r["study_id"]) else str(r["study_id"]),
                  "—" if _missing(r["n"]) else str(int(r["n"]))]
        rows.append(labels + [cell(pool, r["run_id"], "all", "all", m, min_n) if a == "all"
                              else gap_cell(pool, r["run_id"], a, m, min_n) for a, m, _ in cols])
    return Table("runs", "Runs", list(RUN_COLUMNS) + [h for _, _, h in cols], rows,
                 [f"Every run on its own: {_interval_words(data)}."])


def _interval_words(data: ReportData) -> str:
    if data.n_resamples:
        return f"value [{CI_LEVEL:.0%} bootstrap interval, {data.n_resamples} resamples]"
    return "value (no bootstrap interval: --ci 0)"


def _missing(value) -> bool:
    try:
        return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
    except TypeError:
        return False

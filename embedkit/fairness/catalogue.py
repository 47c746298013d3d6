"""The metric catalogue: which metric families `embedkit fairness` and the report show, under what label, in what order.

The metrics themselves are defined once, in SQL (embedkit/sql, the ``metric_values`` view and the views under it);
this module only says which of them a person is shown. One line per family, in display order: adding a metric is
a change to the SQL plus one line: in :data:`METRICS` to show it, else in :data:`UNLISTED` (the gaps the views
derive from it are accounted for with it). tests/test_fairness.py checks the catalogue against the views.

A family is ``group``-level (a value per group, and for the whole split at attribute ``all``: accuracy, macro-F1,
ECE, ...) or a ``gap`` (one value per attribute, comparing its groups: ``group_or_gap`` is ``'gap'`` for a
max - min gap, the direction, e.g. ``'M-F'``, for a signed one). A per-class family's metrics are named
``family[class]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from embedkit.fairness.db import ECE_BINS

SMALL_FLAG = "†"  # the group (for a gap, its smallest compared group) holds fewer rows than --min-n
OUTSIDE_FLAG = "‡"  # the bootstrap interval excludes its estimate (a biased max - min gap): notes say why

# The report's tables a family can appear in (embedkit/report/tables.py): the whole-split utility table, the
# fairness table (spread across diseases and gaps per attribute), the paper's variants, one table per group-level
# metric with a column per group, and the appendix of runs.
ReportTable = Literal["utility", "fairness", "paper", "groups", "runs"]


@dataclass(frozen=True)
class Metric:
    """One metric family as the tables show it."""

    family: str  # metric_values.family
    label: str  # short, for terminal tables; a per-class family's metrics read "<label> <class>"
    level: Literal["group", "gap"]
    per_class: bool = False  # metrics named family[class], one per class of the run
    fairness: bool = False  # a row of `embedkit fairness` (and its --json)
    gap: str | None = None  # a group-level family's max - min gap: `embedkit fairness` prints it beside the groups
    report: tuple[ReportTable, ...] = ()
    digits: int = 3
    long_label: str | None = None  # where a table has room (the report's headers and titles); else the label

    @property
    def heading(self) -> str:
        return self.long_label or self.label

    def metric(self, class_name: str | None = None) -> str:
        """The metric name of this family (of one class, for a per-class family)."""
        return f"{self.family}[{class_name}]" if class_name is not None else self.family

    def class_label(self, class_name: str) -> str:
        return f"{self.label} {class_name}"


METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "Accuracy", "group", fairness=True, gap="accuracy_gap", report=("utility", "runs")),
    Metric("macro_f1", "Macro-F1", "group", fairness=True, gap="f1_gap", report=("utility", "groups", "runs")),
    Metric("f1", "F1", "group", per_class=True, fairness=True, gap="f1_gap", report=("utility",)),
    # Var_F1 is a variance of values in [0, 1], typically 1e-3: it needs more decimals than the rest
    Metric("var_f1", "Var_F1", "group", fairness=True, report=("fairness",), digits=4,
           long_label="Var_F1 (across diseases)"),
    Metric("ece", "ECE", "group", fairness=True, gap="ece_gap", report=("groups",),
           long_label=f"ECE (top-label, {ECE_BINS} bins)"),
    Metric("accuracy_gap", "Accuracy gap", "gap", fairness=True),
    Metric("f1_gap", "F1 gap", "gap", fairness=True, report=("fairness", "runs")),
    Metric("f1_diff", "Macro-F1 difference (signed)", "gap", fairness=True),
    Metric("eqodds", "EqOdds", "gap", fairness=True, report=("fairness", "runs")),
    Metric("eqodds_worst", "EqOdds worst class", "gap", fairness=True, report=("fairness",)),
    Metric("ece_gap", "ECE gap", "gap", fairness=True, report=("fairness",)),
    Metric("f1_delta_paper", "F1 Δ paper", "gap", fairness=True, report=("paper",)),
    Metric("eqodds_paper", "EqOdds paper (2 groups)", "gap", fairness=True),
    Metric("l1_calibration_gap", "L1-calibration gap paper", "gap", report=("paper",)),
)

# Families the views compute that no table shows (one `embedkit sql` query away, e.g. in fairness_summary). The gaps
# and signed differences metric_values derives from a family need no line of their own (see accounted_for).
UNLISTED: frozenset[str] = frozenset({
    "macro_f1_zd1", "macro_auc", "classwise_ece", "l1_calibration", "tpr", "fpr", "auc",
    "eqodds_classes", "eqodds_paper_classes",
})

BY_FAMILY: dict[str, Metric] = {m.family: m for m in METRICS}
_DERIVED = ("_gap", "_diff")  # metric_values names a family's gap and difference <family without 'macro_'><suffix>


def accounted_for(family: str) -> bool:
    """Whether the catalogue says what happens to ``family``: listed, unlisted, or the max - min gap or signed
    difference of a family that is (so a new group-level family in the SQL takes one line here, not three)."""
    if family in BY_FAMILY or family in UNLISTED:
        return True
    for suffix in _DERIVED:
        if family.endswith(suffix):
            stem = family[: -len(suffix)]
            return any(f in BY_FAMILY or f in UNLISTED for f in (stem, f"macro_{stem}"))
    return False

# The paper's signed F1 delta (f1_delta_paper) is cell-averaged over age x sex: this attribute must be sliced too
# whenever sex or age group is.
PAPER_CELLS = "age_group_sex"


def family_of(metric: str) -> str:
    """The family of a metric name: ``f1[Edema]`` -> ``f1``."""
    return metric.split("[", 1)[0]


def digits(metric: str) -> int:
    """Decimals a table prints for ``metric`` (a family's, 3 for a family the catalogue does not list)."""
    entry = BY_FAMILY.get(family_of(metric))
    return entry.digits if entry else 3


def fairness_families() -> list[str]:
    """The families `embedkit fairness` reads, in catalogue order."""
    return [m.family for m in METRICS if m.fairness]


def fairness_rows() -> list[Metric]:
    """The group-level families `embedkit fairness` prints a row of, with their gap beside the groups."""
    return [m for m in METRICS if m.fairness and m.level == "group"]


def fairness_gap_rows() -> list[Metric]:
    """The gaps `embedkit fairness` prints a row of: those that are not a group-level row's own gap column."""
    beside = {m.gap for m in fairness_rows()}
    return [m for m in METRICS if m.fairness and m.level == "gap" and m.family not in beside]


def report_families() -> list[str]:
    """Every family the report reads (the bootstrap computes intervals for these only), in catalogue order."""
    return [m.family for m in METRICS if m.report]


def in_report_table(table: ReportTable) -> list[Metric]:
    """The families one of the report's tables shows, in catalogue order."""
    return [m for m in METRICS if table in m.report]


def attributes_to_slice(attributes: Sequence[str]) -> list[str]:
    """The attributes to register on a connection: those asked for (trimmed, once each, without ``all``, which
    every view has), plus the age x sex cells when sex or age group is asked for (:data:`PAPER_CELLS`)."""
    wanted = [a for a in dict.fromkeys(a.strip() for a in attributes) if a and a != "all"]
    if {"sex", "age_group"} & set(wanted) and PAPER_CELLS not in wanted:
        wanted.append(PAPER_CELLS)
    return wanted

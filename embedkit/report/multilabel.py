"""The report's multi-label section: per-label AUC by group with intervals, underdiagnosis by group, and the
underdiagnosis figure.

Its rows are those `embedkit fairness` prints for multi-label runs (:func:`embedkit.fairness.multilabel.
multilabel_rows`: the label-level SQL views and the patient bootstrap); this module only lays them out as the
report's :class:`~embedkit.report.tables.Table` and Cells and draws them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from embedkit.fairness.multilabel import BCA_MAX_UNITS, group_order, multilabel_rows, run_labels
from embedkit.report.tables import ATTRIBUTE_LABELS, Cell, Table

FIGURE_NAME = "underdiagnosis.png"
FIGURE_TITLE = "Underdiagnosis per demographic group"
FIGURE_CAPTION = ("The share of patients with a disease whom the model calls No Finding (No Finding score at or above "
                  "its threshold; Seyyed-Kalantari et al. 2021), per group, one panel per attribute, one bar per "
                  "multi-label run; error bars: the bootstrap interval. Hatched bars rest on a group under the "
                  "minimum size.")


@dataclass
class MultilabelSection:
    """The multi-label runs of a report and their rows (value, n, interval per run, attribute, group, metric)."""

    runs: list[dict]  # run_id, model, method
    rows: list[dict]
    attributes: list[str]
    labels: dict[str, list[tuple[str, float | None]]]  # run_id -> (label, threshold) in class order
    bca: bool = True
    index: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {(r["run_id"], r["attribute"], r["group_or_gap"], r["metric"]): r for r in self.rows}

    def cell(self, run_id: str, attribute: str, group: str, metric: str, min_n: int, show_n: bool = False) -> Cell:
        row = self.index.get((run_id, attribute, group, metric))
        if row is None:
            return Cell(None)
        return Cell(row["value"], row.get("ci_low"), row.get("ci_high"), n=row["n"],
                    small=row["n"] is not None and row["n"] < min_n, show_n=show_n,
                    outside=bool(row.get("ci_note")))

    def groups(self, run_id: str, attribute: str) -> list[str]:
        return group_order({r["group_or_gap"] for r in self.rows if r["run_id"] == run_id
                            and r["attribute"] == attribute and r["family"] == "underdiagnosis"})


def collect_multilabel(con, runs: list[dict], attributes: list[str], split: str, ci: int, seed: int,
                       min_n: int) -> MultilabelSection:
    """The multi-label section's rows for ``runs`` (dicts with run_id, model, method) on ``split``."""
    rows, bca = multilabel_rows(con, runs, attributes, split, ci, seed, min_n)
    labels = {r["run_id"]: run_labels(con, r["run_id"]) for r in runs}
    return MultilabelSection(runs, rows, list(attributes), labels, bca)


def interval_words(section: MultilabelSection, n_resamples: int) -> str:
    if not n_resamples:
        return "value (no bootstrap interval: --ci 0)"
    kind = "BCa" if section.bca else f"percentile (more than {BCA_MAX_UNITS} patients)"
    return f"value [95% {kind} bootstrap interval, {n_resamples} resamples of patients within groups]"


def multilabel_tables(section: MultilabelSection, min_n: int, n_resamples: int) -> list[Table]:
    """Per run: the whole split per label; per attribute, AUC by group (labels x groups, max - min gap); and one
    underdiagnosis table (attribute, group, value, n, and each attribute's gap)."""
    words = interval_words(section, n_resamples)
    tables = []
    for run in section.runs:
        run_id = run["run_id"]
        name = f"{run['model']} / {run['method']} ({run_id})"
        labels = section.labels[run_id]
        columns = ["Label", "Threshold", "Positives", "AUC", "TPR", "FNR", "Precision", "F1", "ECE"]
        rows = []
        for label, threshold in labels:
            positives = section.index.get((run_id, "all", "all", f"positives[{label}]"))
            rows.append([label, "—" if threshold is None else f"{threshold:.3f}",
                         "—" if positives is None else str(int(positives["value"]))]
                        + [section.cell(run_id, "all", "all", f"{family}[{label}]", min_n)
                           for family in ("auc", "tpr", "fnr", "precision", "f1", "ece")])
        tables.append(Table(f"ml-labels-{run_id}", f"Multi-label: per label, whole split — {name}", columns, rows,
                            [f"Thresholds chosen on validation, as recorded with the run; {words}."]))
        for attribute in section.attributes:
            groups = section.groups(run_id, attribute)
            if not groups:
                continue
            first = f"positives[{labels[0][0]}]" if labels else ""
            heads = [f"{g} (n={section.index.get((run_id, attribute, g, first), {}).get('n', '—')})" for g in groups]
            rows = [[label] + [section.cell(run_id, attribute, g, f"auc[{label}]", min_n) for g in groups]
                    + [section.cell(run_id, attribute, "gap", f"auc_gap[{label}]", min_n)] for label, _ in labels]
            tables.append(Table(f"ml-auc-{attribute}-{run_id}",
                                f"Multi-label: AUC by {ATTRIBUTE_LABELS.get(attribute, attribute)} — {name}",
                                ["Label", *heads, "Max - min gap"],
                                rows, [words + "."]))
        rows = []
        for attribute in section.attributes:
            for g in section.groups(run_id, attribute):
                rows.append([attribute, g, section.cell(run_id, attribute, g, "underdiagnosis", min_n, show_n=True)])
            gap = section.cell(run_id, attribute, "gap", "underdiagnosis_gap", min_n)
            if gap.value is not None:
                rows.append([attribute, "max - min gap", gap])
        tables.append(Table(f"ml-underdiagnosis-{run_id}", f"Multi-label: underdiagnosis by group — {name}",
                            ["Attribute", "Group", "Underdiagnosis"], rows,
                            ["Underdiagnosis: among the patients with a disease (any label but No Finding), the "
                             f"share predicted No Finding; n: diseased rows; {words}."]))
    return tables


def underdiagnosis_figure(section: MultilabelSection, min_n: int) -> bytes:
    """One panel per attribute: underdiagnosis per group, a bar per run, with its interval."""
    from embedkit.report.figures import _error, _figure, to_png

    attributes = [a for a in section.attributes if any(section.groups(r["run_id"], a) for r in section.runs)]
    fig = _figure(max(4.0, 3.2 * len(attributes)), 3.2)
    axes = fig.subplots(1, max(len(attributes), 1), squeeze=False)[0]
    width = 0.8 / max(len(section.runs), 1)
    for ax, attribute in zip(axes, attributes):
        groups = group_order({g for r in section.runs for g in section.groups(r["run_id"], attribute)})
        x = np.arange(len(groups))
        for j, run in enumerate(section.runs):
            cells = [section.cell(run["run_id"], attribute, g, "underdiagnosis", min_n) for g in groups]
            values = [c.value if c.value is not None else 0.0 for c in cells]
            errors = np.array([_error(c) for c in cells]).T
            bars = ax.bar(x + (j - (len(section.runs) - 1) / 2) * width, values, width, yerr=errors, capsize=2,
                          color=f"C{j % 10}", label=f"{run['model']}/{run['method']}")
            for bar, c in zip(bars, cells):
                if c.small:
                    bar.set_hatch("//")
        ax.set_xticks(x, groups, rotation=45 if len(groups) > 4 else 0, fontsize=8)
        ax.set_title(ATTRIBUTE_LABELS.get(attribute, attribute), fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_ylabel("diseased predicted No Finding", fontsize=8)
    if attributes:
        axes[0].legend(fontsize=7)
    return to_png(fig)

"""The report's figures, drawn with matplotlib's Agg renderer into PNG bytes.

Figures draw the same Cells the tables print (:mod:`embedkit.report.tables`): error bars are a one-run arm's
bootstrap interval, or the standard deviation over an arm's seeds. ``matplotlib.figure.Figure`` is used directly,
never pyplot, so building a report changes no global state (a notebook's backend stays what it was).
"""

from __future__ import annotations

import io
from typing import Callable, Sequence

import numpy as np

from embedkit.fairness.db import CI_LEVEL
from embedkit.report.data import RANDOM_LABEL, ReportData
from embedkit.report.tables import (
    ATTRIBUTE_LABELS, METHOD_LABELS, Cell, Pool, arm_name, arm_parts, arms, cell, gap_cell, groups_of, method_label,
    multiple_cohorts,
)

DPI = 110
ERROR_NOTE = (f"Error bars: the {CI_LEVEL:.0%} bootstrap interval of a single run, or ± the standard deviation "
              "over seeds. Hatched bars rest on a group under the minimum size.")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def to_png(fig) -> bytes:
    """The figure as PNG bytes (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _error(c: Cell) -> tuple[float, float]:
    """(below, above) error of a Cell: the interval around a run's value, or its seeds' std."""
    if c.value is None:
        return (0.0, 0.0)
    if c.k > 1:
        return (c.std or 0.0, c.std or 0.0)
    if c.ci_low is not None and c.ci_high is not None:
        return (max(c.value - c.ci_low, 0.0), max(c.ci_high - c.value, 0.0))
    return (0.0, 0.0)


def grouped_bars(ax, categories: Sequence[str], series: Sequence[str], get: Callable[[str, str], Cell],
                 category_labels: Sequence[str] | None = None, series_labels: Sequence[str] | None = None) -> None:
    """Bars for every (category, series) pair, side by side within a category, with error bars; empty cells skipped."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(categories))
    colors = [f"C{i % 10}" for i in range(len(series))]
    for j, s in enumerate(series):
        cells = [get(c, s) for c in categories]
        heights = np.array([np.nan if c.value is None else c.value for c in cells], dtype=float)
        if np.all(np.isnan(heights)):
            continue
        label = series_labels[j] if series_labels else s
        centers = x - 0.4 + width * (j + 0.5)
        bars = ax.bar(centers, heights, width * 0.92, color=colors[j], label=label)
        for bar, c in zip(bars, cells):
            if c.small:  # resting on a group under the minimum size: hatched, as the tables flag it
                bar.set_hatch("///")
                bar.set_edgecolor("white")
        errors = np.array([_error(c) for c in cells], dtype=float)
        has = (errors.sum(axis=1) > 0) & ~np.isnan(heights)  # no interval (e.g. --ci 0): no bar, not a flat cap
        if has.any():
            ax.errorbar(centers[has], heights[has], yerr=errors[has].T, fmt="none", ecolor="0.2", elinewidth=0.9,
                        capsize=2.5)
    ax.set_xticks(x, category_labels or categories, fontsize=8)
    ax.grid(axis="y", linewidth=0.4, alpha=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _legend_handles(ax) -> dict[str, object]:
    """label -> a plain colour patch per bar series (a hatched first bar must not make the legend look flagged)."""
    from matplotlib.patches import Patch

    out: dict[str, object] = {}
    for handle, label in zip(*ax.get_legend_handles_labels()):
        out[label] = Patch(facecolor=handle.patches[0].get_facecolor(), label=label)
    return out


def _models_and_methods(data: ReportData) -> tuple[list[tuple], list[str], dict[tuple, str]]:
    """Categories (cohort, model, weights) and series (methods) of the per-model figures, and arm of each pair."""
    order = arms(data)
    models: list[tuple] = []
    methods: list[str] = []
    arm_of: dict[tuple, str] = {}
    for arm in order:
        cohort, model, weights, _ = arm_parts(data, arm)
        key = (cohort, model, weights)
        method = method_label(data, arm)  # a series per method and setting: arms never share a bar
        if key not in models:
            models.append(key)
        if method not in methods:
            methods.append(method)
        arm_of[(key, method)] = arm
    return models, methods, arm_of


def _model_label(data: ReportData, key: tuple) -> str:
    cohort, model, weights = key
    label = model + ("\n(random weights)" if weights == RANDOM_LABEL else "")
    return f"{cohort}\n{label}" if multiple_cohorts(data) else label


def per_model_figure(data: ReportData, pool: Pool, panels: Sequence[tuple[str, str, str]], title: str,
                     min_n: int) -> bytes:
    """One panel per (attribute, metric, y label): models on x, one bar per method.

    For attribute 'all' the value is the whole split's; otherwise the attribute's gap.
    """
    models, methods, arm_of = _models_and_methods(data)
    panel_width = max(4.0, 0.45 * len(models) * len(methods) + 1.5)
    fig = _figure(panel_width * min(len(panels), 2), 3.2 * ((len(panels) + 1) // 2) + 0.4)
    axes = fig.subplots((len(panels) + 1) // 2, min(len(panels), 2), squeeze=False).ravel()
    for ax, (attribute, metric, ylabel) in zip(axes, panels):
        def get(model: tuple, method: str, attribute=attribute, metric=metric) -> Cell:
            arm = arm_of.get((model, method))
            if arm is None:
                return Cell(None)
            if attribute == "all":
                return cell(pool, arm, "all", "all", metric, min_n)
            return gap_cell(pool, arm, attribute, metric, min_n)

        grouped_bars(ax, models, methods, get, [_model_label(data, m) for m in models],
                     methods)
        ax.set_ylabel(ylabel, fontsize=9)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    # panels of one metric share a y range, so a gap by sex and by age compare at a glance
    for metric in {m for _, m, _ in panels}:
        same = [ax for ax, (_, m, _) in zip(axes, panels) if m == metric]
        top = max(ax.get_ylim()[1] for ax in same)
        for ax in same:
            ax.set_ylim(0, top)
    legend: dict[str, object] = {}  # every method that has a bar in any panel, once
    for ax in axes[: len(panels)]:
        for label, handle in _legend_handles(ax).items():
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center", fontsize=8,
                   ncols=min(len(legend), 6), frameon=False)
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    return to_png(fig)


def performance_figure(data: ReportData, pool: Pool, min_n: int) -> bytes:
    """Accuracy and macro-F1 per model (x) and method (bars) on the report's split."""
    return per_model_figure(data, pool, [("all", "accuracy", "accuracy"), ("all", "macro_f1", "macro-F1")],
                            f"Performance per regime ({data.split} split)", min_n)


def var_f1_figure(data: ReportData, pool: Pool, min_n: int) -> bytes:
    """Var_F1 (variance of the per-class F1 across diseases) per model and method."""
    return per_model_figure(data, pool, [("all", "var_f1", "Var_F1 across diseases")], "Var_F1 per model", min_n)


def gaps_figure(data: ReportData, pool: Pool, min_n: int) -> bytes:
    """EqOdds and ECE gaps per model and method, one panel per (gap, attribute)."""
    panels = [(a, m, f"{label} ({ATTRIBUTE_LABELS.get(a, a)})")
              for m, label in (("eqodds", "EqOdds"), ("ece_gap", "ECE gap")) for a in data.attributes]
    return per_model_figure(data, pool, panels, "Equalized odds and calibration gaps", min_n)


def group_f1_figure(data: ReportData, pool: Pool, min_n: int) -> bytes:
    """Macro-F1 of every group (bars) per arm (x), one panel per attribute."""
    order = arms(data)
    attrs = data.attributes
    fig = _figure(max(5.5, 1.05 * len(order) + 2.0), 3.0 * len(attrs) + 0.3)
    axes = fig.subplots(len(attrs), 1, squeeze=False).ravel()
    for ax, attribute in zip(axes, attrs):
        groups = groups_of(data, attribute)
        labels = []
        for g in groups:
            ns = {cell(pool, arm, attribute, g, "macro_f1", min_n).n for arm in order} - {None}
            labels.append(f"{g} (n={ns.pop()})" if len(ns) == 1 else g)
        grouped_bars(ax, order, groups, lambda arm, g, a=attribute: cell(pool, arm, a, g, "macro_f1", min_n),
                     [arm_name(data, arm) for arm in order], labels)
        ax.set_ylabel("macro-F1", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.set_title(f"by {ATTRIBUTE_LABELS.get(attribute, attribute)}", fontsize=9, loc="left")
        handles = _legend_handles(ax)
        ax.legend(list(handles.values()), list(handles), fontsize=7, frameon=False, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"Macro-F1 per demographic group ({data.split} split)", fontsize=10, x=0.01, ha="left")
    return to_png(fig)


def reliability_figure(data: ReportData, run_id: str) -> bytes:
    """Per-group reliability diagrams of one run: mean confidence vs accuracy in each ECE bin, one line per
    group, one panel per attribute; marker area follows the bin's size."""
    from matplotlib.figure import Figure

    run = data.runs[data.runs["run_id"] == run_id].iloc[0]
    bins = data.bins[data.bins["run_id"] == run_id]
    attrs = data.attributes
    # A fixed layout: one of these per run, and constrained layout would draw each twice.
    fig = Figure(figsize=(3.1 * len(attrs) + 0.5, 3.6), dpi=DPI)
    fig.subplots_adjust(left=0.5 / (3.1 * len(attrs) + 0.5), right=0.98, bottom=0.13, top=0.80, wspace=0.12)
    axes = fig.subplots(1, len(attrs), squeeze=False, sharey=True).ravel()
    for ax, attribute in zip(axes, attrs):
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=0.8)
        for i, group in enumerate(groups_of(data, attribute)):
            rows = bins[(bins["attribute"] == attribute) & (bins["group_name"] == group)].sort_values("bin")
            if rows.empty:
                continue
            ece = _run_value(data, run_id, attribute, group, "ece")
            n = int(rows["n"].sum())
            label = f"{group} (n={n}" + (f", ECE {ece:.3f})" if ece is not None else ")")
            sizes = 10 + 150 * rows["n"].to_numpy() / max(n, 1)
            ax.plot(rows["confidence"], rows["accuracy"], color=f"C{i}", linewidth=1.2, label=label)
            ax.scatter(rows["confidence"], rows["accuracy"], s=sizes, color=f"C{i}", alpha=0.6, edgecolors="none")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_xlabel("confidence (mean in bin)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(f"by {ATTRIBUTE_LABELS.get(attribute, attribute)}", fontsize=9, loc="left")
        ax.legend(fontsize=7, frameon=True, framealpha=0.85, edgecolor="none", loc="lower right")
        ax.grid(linewidth=0.4, alpha=0.5)
    axes[0].set_ylabel("accuracy in bin", fontsize=8)
    weights = RANDOM_LABEL if run["random_weights"] else str(run["weights_id"])[:12]
    method = METHOD_LABELS.get(run["method"], run["method"])
    fig.suptitle(f"Reliability: {run['model']} ({weights}), {method}\nrun {run_id}", fontsize=9, x=0.01, y=0.98,
                 ha="left", va="top")
    return to_png(fig)


def _run_value(data: ReportData, run_id: str, attribute: str, group: str, metric: str) -> float | None:
    v = data.values
    rows = v[(v["run_id"] == run_id) & (v["attribute"] == attribute) & (v["group_or_gap"] == group)
             & (v["metric"] == metric)]
    if rows.empty or rows["value"].isna().all():
        return None
    return float(rows["value"].iloc[0])

"""Build the audit report: one self-contained HTML file (figures inlined as data URIs, so it can be mailed) and a
Markdown version (``report.md``) with the PNGs beside it.

Data flows one way: runs -> fairness views / bootstrap (:mod:`embedkit.report.data`) -> tables and figures ->
HTML and Markdown. Nothing here computes a metric.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from embedkit.constants import RANDOM_WEIGHTS_NOTE
from embedkit.fairness.catalogue import SMALL_FLAG
from embedkit.fairness.db import ECE_BINS
from embedkit.markdown import markdown_table
from embedkit.report.data import RANDOM_LABEL, ReportData, ReportError, collect, select_runs
from embedkit.report.tables import (
    METHOD_LABELS, MIN_GROUP_N, Table, build_tables, ordered_runs, pooled, runs_table,
)
from embedkit.store.store import Store

HTML_NAME = "report.html"
MARKDOWN_NAME = "report.md"
RELIABILITY_PREFIX = "reliability-"
RELIABILITY_INTRO = (f"Top-label confidence against accuracy in the {ECE_BINS} equal-width bins of each group, one "
                     "line per group, one panel per attribute; marker area follows the bin's share of the group; the "
                     "dashed diagonal is perfect calibration (above it: under-confident, below: over-confident).")


@dataclass
class FigureFile:
    """A rendered figure: its file name in the out dir, a title, a caption and the PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


def build_report(
    store: Store | str | Path,
    out_dir: str | Path,
    runs: Sequence[str] | None = None,
    study: str | None = None,
    split: str = "test",
    ci: int = 1000,
    by: Sequence[str] = ("sex", "age_group"),
    seed: int = 0,
    *,
    models: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    min_n: int = MIN_GROUP_N,
    title: str = "Fairness audit",
) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` and the figures' PNGs into ``out_dir``.

    Runs: ``runs`` (ids), else every run of the store, narrowed by ``study`` (study_id), ``models`` and ``methods``.
    Metrics are those of ``split``, sliced by the attributes ``by``, with ``ci`` bootstrap resamples (0: none)
    drawn from ``seed``. Several runs of one (cohort, model, weights, method) are pooled as seeds: mean ± std.
    Groups (for a gap, the smallest compared group) under ``min_n`` rows are flagged. Returns the HTML path.
    """
    store = store if isinstance(store, Store) else Store(store)
    if isinstance(by, str):  # "sex,age_group", as typed on the command line
        by = [part.strip() for part in by.split(",")]
    if ci < 0:
        raise ReportError(f"ci is a number of bootstrap resamples, 0 or more; got {ci}")
    run_table = select_runs(store, runs, models, methods, study)
    data = collect(store, run_table, split=split, ci=ci, by=by, seed=seed, study=study)
    return write_report(data, out_dir, min_n=min_n, title=title)


def write_report(data: ReportData, out_dir: str | Path, min_n: int = MIN_GROUP_N,
                 title: str = "Fairness audit") -> Path:
    """Render collected data into ``out_dir`` (HTML, Markdown, PNGs); returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(data, min_n) + what_helps(data) if data.has_multiclass else []
    figures = render_figures(data, min_n) if data.has_multiclass else []
    tables, figures = tables + multilabel_tables(data, min_n), figures + multilabel_figures(data, min_n)
    for stale in out.glob(f"{RELIABILITY_PREFIX}*.png"):  # runs of an earlier report in the same folder
        stale.unlink()
    for fig in figures:
        (out / fig.name).write_bytes(fig.png)
    created = datetime.now(timezone.utc)
    header = header_facts(data, min_n, created)
    _write_atomic(out / MARKDOWN_NAME, render_markdown(data, title, header, tables, figures, min_n))
    html_path = out / HTML_NAME
    _write_atomic(html_path, render_html(data, title, header, tables, figures, min_n))
    return html_path


def what_helps(data: ReportData) -> list[Table]:
    """The "what helps" and attribute-encoding tables (embedkit/report/whathelps.py); none without such runs."""
    from embedkit.report.whathelps import what_helps_tables

    return what_helps_tables(Store(data.store_path), data) if data.store_path else []


def render_figures(data: ReportData, min_n: int) -> list[FigureFile]:
    """Every figure of the report, in display order (reliability diagrams last, one per run)."""
    from embedkit.report import figures as F

    pool = pooled(data)
    out = [
        FigureFile("performance.png", "Performance per regime",
                   f"Accuracy and macro-F1 per model (x) and adaptation regime (bars). {F.ERROR_NOTE}",
                   F.performance_figure(data, pool, min_n)),
        FigureFile("var_f1.png", "Var_F1 per model",
                   "Variance of the per-class F1 across the diseases: lower is more even across diseases. "
                   + F.ERROR_NOTE,
                   F.var_f1_figure(data, pool, min_n)),
        FigureFile("group_f1.png", "F1 per demographic group",
                   f"Macro-F1 of each group per model and regime; n: rows in the group. {F.ERROR_NOTE}",
                   F.group_f1_figure(data, pool, min_n)),
        FigureFile("gaps.png", "EqOdds and ECE gaps",
                   "Equalized-odds gap (mean over classes) and top-label ECE gap (max - min over groups). "
                   + F.ERROR_NOTE,
                   F.gaps_figure(data, pool, min_n)),
    ]
    for run_id in ordered_runs(data):
        run = data.runs[data.runs["run_id"] == run_id].iloc[0]
        weights = RANDOM_LABEL if run["random_weights"] else f"weights {run['weights_id']}"
        seed = "" if run["seed"] is None or run["seed"] != run["seed"] else f", seed {int(run['seed'])}"
        out.append(FigureFile(
            f"{RELIABILITY_PREFIX}{_safe_name(run_id)}.png", f"Reliability: {run_id}",
            f"{run['model']} ({weights}), {METHOD_LABELS.get(run['method'], run['method'])}{seed}.",
            F.reliability_figure(data, run_id)))
    return out


def multilabel_tables(data: ReportData, min_n: int) -> list[Table]:
    """The multi-label section's tables (embedkit/report/multilabel.py); none without multi-label runs."""
    from embedkit.report import multilabel

    return [] if data.multilabel is None else multilabel.multilabel_tables(data.multilabel, min_n, data.n_resamples)


def multilabel_figures(data: ReportData, min_n: int) -> list[FigureFile]:
    """The underdiagnosis figure of the multi-label runs; none without them."""
    from embedkit.report import multilabel

    if data.multilabel is None:
        return []
    return [FigureFile(multilabel.FIGURE_NAME, multilabel.FIGURE_TITLE, multilabel.FIGURE_CAPTION,
                       multilabel.underdiagnosis_figure(data.multilabel, min_n))]


def header_facts(data: ReportData, min_n: int, created: datetime) -> list[tuple[str, str]]:
    """(label, text) pairs saying what was audited and how."""
    from embedkit import __version__
    from embedkit.constants import AGE_GROUPS, AGE_OLD_FROM
    from embedkit.fairness.db import CI_LEVEL

    young, old = AGE_GROUPS
    runs = data.runs
    cohorts = ", ".join(sorted(map(str, runs["cohort"].dropna().unique()))) or "—"
    code_versions = ", ".join(sorted(map(str, runs["code_version"].dropna().unique()))) or "unknown"
    if data.n_resamples:
        boot = (f"{data.n_resamples} resamples of patients within each group (stratified), {CI_LEVEL:.0%} BCa "
                f"intervals, seed {data.seed}")
    else:
        boot = "none (values without intervals)"
    skipped = f"; left out, no predictions on {data.split}: {', '.join(data.skipped)}" if data.skipped else ""
    facts = [
        ("Cohort", cohorts),
        ("Split", data.split),
        ("Runs", f"{len(runs)} run(s) in {runs['arm'].nunique()} model x method arm(s){skipped}"
                 + _multilabel_fact(data)),
        ("Study", data.study or "—"),
        ("Attributes", ", ".join(data.attributes)),
        ("Age boundary", f"{young}: age < {AGE_OLD_FROM}; {old}: age ≥ {AGE_OLD_FROM}"),
        ("Bootstrap", boot),
        ("Minimum group size", f"{min_n} rows (smaller groups flagged {SMALL_FLAG})"),
        ("embedkit", f"{__version__} (runs written by {code_versions})"),
        ("Store", data.store_path),
        ("Date", created.strftime("%Y-%m-%d %H:%M UTC")),
    ]
    return facts


def _multilabel_fact(data: ReportData) -> str:
    """What the Runs line adds for multi-label runs: how many, when multi-class runs are reported beside them."""
    if data.multilabel is None:
        return ""
    if not data.has_multiclass:
        return " (multi-label: per-label metrics and underdiagnosis)"
    return f"; and {len(data.multilabel.runs)} multi-label run(s) (their own section)"


def model_rows(data: ReportData) -> list[list[str]]:
    """One row per (model, weights_id): the weights, labelled 'random weights' where they are random."""
    seen = data.runs.drop_duplicates(["model", "weights_id"])
    return [[r["model"], str(r["weights_id"]), RANDOM_LABEL if r["random_weights"] else "released weights"]
            for _, r in seen.iterrows()]


MODEL_COLUMNS = ["Model", "weights_id", "Weights"]


# ---- HTML ---------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1.5em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.small { background: #fff4e0; } .random { color: #b00020; font-weight: 600; }
.warning { border: 2px solid #b00020; background: #fdecee; padding: 0.6em 1em; margin: 1em 0; }
.facts th { width: 12em; } .note { font-size: 0.8em; color: #555; margin: 0.2em 0; }
.scroll { overflow-x: auto; } figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #444; }
img { max-width: 100%; }
"""


def render_html(data: ReportData, title: str, header: list[tuple[str, str]], tables: list[Table],
                figures: list[FigureFile], min_n: int = MIN_GROUP_N) -> str:
    """The self-contained HTML page: header, tables, figures (PNG data URIs), runs."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
    ]
    if data.runs["random_weights"].any():
        parts.append('<div class="warning"><strong>Random weights.</strong> Model(s) '
                     + e(", ".join(sorted(data.runs.loc[data.runs["random_weights"], "model"].unique())))
                     + " " + e(RANDOM_WEIGHTS_NOTE).replace("random weights", '<span class="random">random weights</span>', 1)
                     + ".</div>")
    parts.append('<table class="facts">' + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in header)
                 + "</table>")
    parts.append("<h3>Models</h3>" + _html_table(MODEL_COLUMNS, model_rows(data)))
    parts.append("<h2>Tables</h2>")
    for table in tables:
        parts.append(f'<h3 id="{e(table.key)}">{e(table.title)}</h3>')
        parts.append(_html_table(table.columns, table.rows))
        parts.extend(f'<p class="note">{e(n)}</p>' for n in table.notes)
    parts.append("<h2>Figures</h2>")
    for fig in figures:
        if fig.name.startswith(RELIABILITY_PREFIX) and fig is _first_reliability(figures):
            parts.append(f"<h3>Reliability diagrams per run</h3><p>{e(RELIABILITY_INTRO)}</p>")
        uri = "data:image/png;base64," + base64.b64encode(fig.png).decode("ascii")
        parts.append(f'<figure><img src="{uri}" alt="{e(fig.title)}"><figcaption><strong>{e(fig.title)}.</strong> '
                     f"{e(fig.caption)}</figcaption></figure>")
    if data.has_multiclass:
        runs = runs_table(data, min_n)
        parts.append("<h2>Runs</h2>" + _html_table(runs.columns, runs.rows))
        parts.extend(f'<p class="note">{e(n)}</p>' for n in runs.notes)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _first_reliability(figures: list[FigureFile]) -> FigureFile | None:
    return next((f for f in figures if f.name.startswith(RELIABILITY_PREFIX)), None)


def _html_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    from embedkit.report.tables import Cell

    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in columns)
    body = []
    for row in rows:
        tds = []
        for c in row:
            if isinstance(c, Cell):
                tds.append(f'<td class="num{" small" if c.small else ""}">{e(c.text())}</td>')
            elif str(c) == RANDOM_LABEL:
                tds.append(f'<td><span class="random">{e(RANDOM_LABEL)}</span></td>')
            else:
                tds.append(f"<td>{e(str(c))}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>' + "".join(body)
            + "</tbody></table></div>")


# ---- Markdown -----------------------------------------------------------------------------------------------------

def render_markdown(data: ReportData, title: str, header: list[tuple[str, str]], tables: list[Table],
                    figures: list[FigureFile], min_n: int = MIN_GROUP_N) -> str:
    """The Markdown version: the same content, figures linked as the PNG files beside it."""
    lines = [f"# {title}", ""]
    if data.runs["random_weights"].any():
        models = ", ".join(sorted(data.runs.loc[data.runs["random_weights"], "model"].unique()))
        note = RANDOM_WEIGHTS_NOTE.replace("random weights", "**random weights**", 1)
        lines += [f"> **Random weights.** Model(s) {models} {note}.", ""]
    lines += markdown_table(["Audited", ""], [[f"**{k}**", v] for k, v in header]) + [""]
    lines += ["### Models", ""] + markdown_table(MODEL_COLUMNS, model_rows(data)) + ["", "## Tables", ""]
    for table in tables:
        lines += [f"### {table.title}", ""] + markdown_table(table.columns, table.text_rows()) + [""]
        lines += [f"_{n}_  " for n in table.notes] + [""]
    lines += ["## Figures", ""]
    for fig in figures:
        if fig is _first_reliability(figures):
            lines += ["### Reliability diagrams per run", "", RELIABILITY_INTRO, ""]
        lines += [f"![{fig.title}]({fig.name})", "", f"**{fig.title}.** {fig.caption}", ""]
    if data.has_multiclass:
        runs = runs_table(data, min_n)
        lines += ["## Runs", ""] + markdown_table(runs.columns, runs.text_rows()) + [""]
        lines += [f"_{n}_" for n in runs.notes] + [""]
    return "\n".join(lines)


def _safe_name(text: str) -> str:
    """A file-name-safe version of a run id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text))


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

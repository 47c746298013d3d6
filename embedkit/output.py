"""How the command line prints results: JSON, query results (a Rich table, CSV or JSON rows), runs.

Formatting only: nothing here reads the store or computes a number. Heavy libraries (rich) are imported inside the
functions so `embedkit --help` stays instant.
"""

from __future__ import annotations

import json
import sys
import textwrap
from enum import Enum
from typing import Any

import typer

from embedkit.constants import NO_SPLIT, RANDOM_WEIGHTS_NOTE


class OutputFormat(str, Enum):
    """``embedkit sql --format``: how query results print."""

    table = "table"
    csv = "csv"
    json = "json"


def echo_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON (dates, paths and the like as strings)."""
    typer.echo(json.dumps(obj, indent=2, default=str))


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)  # piped: do not wrap at 80 columns


def print_result(table, fmt: OutputFormat) -> None:
    """Print an Arrow table as a Rich table (with its row count), CSV (header first) or JSON rows."""
    if fmt is OutputFormat.json:
        echo_json(table.to_pylist())
    elif fmt is OutputFormat.csv:
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(table.column_names)
        for row in table.to_pylist():
            writer.writerow(["" if row[c] is None else row[c] for c in table.column_names])
        typer.echo(buffer.getvalue(), nl=False)
    else:
        from rich.table import Table

        out = Table()
        for name in table.column_names:
            out.add_column(name)
        for row in table.to_pylist():
            out.add_row(*("" if row[c] is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]))
                          for c in table.column_names))
        _console().print(out)
        typer.echo(f"({table.num_rows} rows)")


def _parsed(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _score(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def label_auc_lines(metrics: dict) -> str:
    """A multi-label run's figures: ``val macro-AUC 0.81, test macro-AUC 0.79``, then one line per split of the
    AUC of every label (its ``label_metrics``, embedkit/heads/multilabel.py)."""
    report = metrics.get("label_metrics") or {}
    head = ", ".join(f"{s} macro-AUC {_score(report[s]['macro_auc'])}, macro-F1 {_score(report[s]['macro_f1'])}"
                     for s in ("val", "test") if s in report) or "no labelled val or test rows"
    lines = [head] + [f"  {s} AUC per label: " + ", ".join(f"{k} {_score(v)}" for k, v in report[s]["auc"].items())
                      for s in ("val", "test") if s in report]
    return "\n".join(lines)


def run_line(run: dict) -> str:
    """One line per run: id, what ran, and test (else val) accuracy and macro-F1 (multi-label: per-label AUC)."""
    metrics = _parsed(run["metrics"])
    if "label_metrics" in metrics:
        again = " (already recorded: same inputs, settings and seed; nothing new stored)" \
            if run.get("already_recorded") else ""
        return (f"run {run['run_id']}: {run['method']} {run['model']} on {run['cohort']} (weights "
                f"{run['weights_id']}), multi-label{again}: {label_auc_lines(metrics)}")
    split = _scored_split(metrics)
    score = (f"{split} accuracy {metrics[split]['accuracy']:.4f}, macro-F1 {metrics[split]['macro_f1']:.4f}"
             if split else "no labelled rows")
    if split == NO_SPLIT:
        score = score.removeprefix(f"{split} ") + " (rows without a split)"
    again = " (already recorded: same inputs, settings and seed; nothing new stored)" if run.get("already_recorded") \
        else ""
    return (f"run {run['run_id']}: {run['method']} {run['model']} on {run['cohort']} "
            f"(weights {run['weights_id']}): {score}{again}")


def run_json(run: dict) -> dict:
    """A ``runs`` row ready for JSON: its config and metrics parsed from their stored JSON text."""
    return {**run, **{k: _parsed(run[k]) for k in ("config", "metrics")}}


def print_run(run: dict, as_json: bool) -> None:
    """What a head command prints for the run it recorded: one line, or the whole row as JSON."""
    if as_json:
        echo_json(run_json(run))
    else:
        typer.echo(run_line(run))


def _scored_split(metrics: dict) -> str | None:
    """The split a run's one-line summaries show: test, else val, train, or the rows without a split."""
    return next((s for s in ("test", "val", "train", NO_SPLIT) if s in metrics), None)


def print_runs(runs: list[dict], where: str) -> None:
    """`embedkit runs`: one row per run (newest first), its method and accuracy and macro-F1 on its test split (else
    the split it has); narrow enough for 80 columns: random weights mark the model with *, the rest is in --json."""
    from rich.console import Console
    from rich.table import Table

    from embedkit.constants import is_random_weights

    def score(value) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) else "-"

    typer.echo(textwrap.fill(f"{len(runs)} run(s) in {where}, newest first (--json: weights, seeds, configs, every "
                             "metric)", 80, break_long_words=False, break_on_hyphens=False))
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    table.add_column("run_id", no_wrap=True)
    for col in ("method", "model", "cohort", "split"):
        table.add_column(col, overflow="fold")
    for col in ("acc", "F1"):
        table.add_column(col, justify="right", no_wrap=True)
    multilabel = any("label_metrics" in r["metrics"] for r in runs)
    if multilabel:  # multi-label runs: macro-AUC over the labels (per label: --json, label_metrics)
        table.add_column("AUC", justify="right", no_wrap=True)
    random = False
    for r in runs:
        split = _scored_split(r["metrics"])
        scores = r["metrics"].get(split, {}) if split else {}
        labels = r["metrics"].get("label_metrics")
        if labels:
            split = next((s for s in ("test", "val", "train") if s in labels), split)
            scores = {"macro_f1": labels[split]["macro_f1"], "auc": labels[split]["macro_auc"]} if split else {}
        mark = "*" if is_random_weights(r["weights_id"]) else ""
        random = random or bool(mark)
        table.add_row(r["run_id"], r["method"], r["model"] + mark, r["cohort"], split or "-",
                      score(scores.get("accuracy")), score(scores.get("macro_f1")),
                      *([score(scores.get("auc"))] if multilabel else []))
    Console().print(table)
    if random:
        typer.echo(textwrap.fill(f"* the model {RANDOM_WEIGHTS_NOTE}", 80, subsequent_indent="  "))

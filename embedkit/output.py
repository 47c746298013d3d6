"""How the command line prints results: JSON, query results (a Rich table, CSV or JSON rows), runs.

Formatting only: nothing here reads the store or computes a number. Heavy libraries (rich) are imported inside the
functions so `embedkit --help` stays instant.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Any

import typer

from embedkit.constants import NO_SPLIT


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


def run_line(run: dict) -> str:
    """One line per run: id, what ran, and test (else val) accuracy and macro-F1."""
    metrics = _parsed(run["metrics"])
    split = next((s for s in ("test", "val", "train", NO_SPLIT) if s in metrics), None)
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


def print_runs(runs: list[dict], where: str) -> None:
    """`embedkit runs`: one table row per run (newest first) with its test accuracy and macro-F1."""
    from rich.console import Console
    from rich.table import Table

    def score(value) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) else "-"

    table = Table(title=f"{len(runs)} runs in {where} (newest first; --json for configs and all metrics)")
    table.add_column("run_id", no_wrap=True)
    for col in ("model", "cohort", "weights_id", "seed", "test acc", "test F1"):
        table.add_column(col, overflow="fold")
    for r in runs:
        test = r["metrics"].get("test", {})
        seed = "-" if r["seed"] is None else str(r["seed"])
        table.add_row(r["run_id"], r["model"], r["cohort"], r["weights_id"], seed, score(test.get("accuracy")),
                      score(test.get("macro_f1")))
    Console().print(table)

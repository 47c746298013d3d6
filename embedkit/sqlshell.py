"""`embedkit sql`: one read-only DuckDB query over the store, or a small REPL reading statements from stdin.

Every store table and fairness view is registered (:mod:`embedkit.fairness.db`); ``db.lock_down`` makes the
connection read-only. A statement's error is one ``error:`` line; the REPL goes on with the next statement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, TextIO

import typer

from embedkit.output import OutputFormat, print_result

PROMPT, CONTINUATION = "embedkit> ", "     ...> "


def _one_line(exc: Exception) -> str:
    """DuckDB's message without its multi-line caret excerpt: the first line says what and where."""
    return str(exc).strip().splitlines()[0]


def connect(store, attributes: Sequence[str] | None, allow_read: Iterable[Path] = ()):
    """A locked-down connection with the fairness views sliced by ``attributes`` (None: db's default); a store
    without predictions yet gets its tables only (and a note saying so)."""
    from embedkit.fairness import db

    try:
        con = db.connect(store, attributes)
    except db.FairnessError:
        if not store.table_names():
            raise
        # Before any run there are no predictions to build the fairness views on; the tables still answer.
        typer.secho("note: the store has no predictions yet, so only its tables are registered (no fairness views)",
                    err=True)
        con = db.connect(store, views=False)
    db.lock_down(con, allow_read)
    return con


def answer(con, text: str, fmt: OutputFormat) -> bool:
    """Run one statement and print its result; False (after one ``error:`` line) when DuckDB or the read-only
    check refuses it."""
    import duckdb

    from embedkit.fairness import db
    from embedkit.store.store import missing_data_file

    try:
        db.check_read_only(text)
        result = con.sql(text)
        if result is not None:
            print_result(result.to_arrow_table(), fmt)  # inside the try: some errors surface only here
    except (duckdb.Error, db.FairnessError) as exc:
        damaged = missing_data_file(exc)  # a table whose file is gone, not a mistake in the query
        typer.secho(f"error: {damaged or _one_line(exc)}", fg=typer.colors.RED, err=True)
        return False
    return True


def repl(con, fmt: OutputFormat, stdin: TextIO) -> None:
    """Read statements until end of input or ``.quit``: a statement ends at a line ending with ';', at a blank
    line or at the end of input; ``.tables`` lists the tables and views. A prompt shows only on a terminal."""
    from embedkit.fairness import db

    prompt = stdin.isatty()
    buffer: list[str] = []

    def run_buffer() -> None:
        text = "\n".join(buffer).strip()
        buffer.clear()
        if text.rstrip(";").strip():
            answer(con, text, fmt)

    while True:
        if prompt:
            typer.echo(CONTINUATION if buffer else PROMPT, nl=False)
        line = stdin.readline()
        if not line:
            break
        stripped = line.strip()
        if not buffer and stripped in (".quit", ".exit"):
            break
        if not buffer and stripped == ".tables":
            for name, kind in db.table_names(con):
                typer.echo(f"{kind:5}  {name}")
            continue
        if stripped:
            buffer.append(line.rstrip("\n"))
        if buffer and (not stripped or stripped.endswith(";")):
            run_buffer()
    if buffer:
        run_buffer()

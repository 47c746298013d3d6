"""`embedkit demo`: the embedded default, end to end, with no downloads.

Synthetic X-rays for the NIH 6x200 cohort (its real ages and sexes) with a planted bias, embedded by tiny models
of each family at random init; zero-shot, linear-probe and MLP runs off the stored vectors; the fairness table;
the report. Everything lands in one folder (store, images, report) so the demo never touches a user's store.

Every stage says when it starts and ends, and the embedding pass how far it got at least every
PROGRESS_SECONDS: one plain line each, at most STATUS_WIDTH characters, so a pipe or a log shows them as they
come, unwrapped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from embedkit.store.store import Store

DEMO_MODELS = ("tiny-clip", "tiny-biomedclip", "tiny-medclip-rn50", "tiny-medclip-vit", "tiny-gloria")
DEMO_METHODS = ("zeroshot", "lp", "mlp")
DEMO_BIAS = "sex=F:signal=0.3"
STATUS_WIDTH = 80
PROGRESS_SECONDS = 10.0


@dataclass
class DemoResult:
    store: Store
    report: Path
    run_ids: list[str] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)


def _say(stage: str, message: str) -> None:
    """One status line, ``stage`` in a column of its own, cut to STATUS_WIDTH (a long name must not wrap it)."""
    line = f"{stage:<9} {message}"
    print(line if len(line) <= STATUS_WIDTH else line[: STATUS_WIDTH - 1] + "…", flush=True)


def _embed_progress(name: str):
    """The embedding pass's lines: its start, then images done at most every PROGRESS_SECONDS, and the last batch."""
    start = time.perf_counter()
    last = [-float("inf")]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if done not in (0, total) and now - last[0] < PROGRESS_SECONDS:
            return
        last[0] = now
        rate = f", {done / (now - start):.1f} img/s" if done else ""
        _say("embed", f"{name}: {done}/{total} images ({100 * done // max(total, 1)}%){rate}, {now - start:.0f} s")

    return report


def run_demo(
    out: Path,
    models: tuple[str, ...] = DEMO_MODELS,
    methods: tuple[str, ...] = DEMO_METHODS,
    bias: str | None = DEMO_BIAS,
    size: int = 256,
    seed: int = 0,
    ci: int = 1000,
    epochs: int = 100,
    workers: int = 2,
) -> DemoResult:
    """Run the demo into ``out`` (re-running reuses what is already there: the store resumes)."""
    from embedkit.data.build import SYNTHETIC_COHORT, import_synthetic
    from embedkit.data.cohort import cohort_names
    from embedkit.embed import ToEmbed, embed_models
    from embedkit.heads.probe import HeadConfig, run_probe
    from embedkit.heads.zeroshot import run_zeroshot
    from embedkit.models.registry import get_spec, instantiate
    from embedkit.report import build_report
    from embedkit.store.runs import select_runs

    out = Path(out)
    store = Store(out / "store")
    result = DemoResult(store, out / "report" / "report.html")

    def step(stage: str, name: str, start: float, what: str = "done") -> None:
        result.steps.append((f"{stage} {name}", time.perf_counter() - start))
        _say(stage, f"{name}: {what} ({result.steps[-1][1]:.1f} s)")

    _say("demo", f"{len(models)} tiny model(s) at random init, {', '.join(methods)}; into {out}")
    start = time.perf_counter()
    if SYNTHETIC_COHORT not in cohort_names(store):
        _say("cohort", f"drawing 1200 synthetic X-rays, planted bias {bias or 'none'}")
        import_synthetic(store, out / "images", size=size, seed=seed, bias=bias)
    step("cohort", SYNTHETIC_COHORT, start, "1200 rows in the store")

    # One pass for every model: each image decoded once (docs: the embedding pass).
    start = time.perf_counter()
    to_embed = [ToEmbed(get_spec(name), *instantiate(get_spec(name), random_init=True, seed=seed)) for name in models]
    summaries = embed_models(store, to_embed, SYNTHETIC_COHORT, device="auto", workers=workers,
                             progress=_embed_progress(f"{len(models)} model{'s' * (len(models) > 1)}"))
    for summary in summaries:
        _say("embed", f"{summary.model}: {summary.images} images embedded, {summary.skipped} already there")
    step("embed", f"{len(models)} model{'s' * (len(models) > 1)}", start, "one pass, each image decoded once")

    done = {(r["model"], r["method"]) for r in select_runs(store).to_pylist()}
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # heads are small: one thread avoids the threads waiting on each other at every step
    for name in models:
        for method in methods:
            if (name, method) in done:
                _say("heads", f"{name} {method}: already in the store")
                continue
            start = time.perf_counter()
            if method == "zeroshot":
                run = run_zeroshot(store, name, cohort=SYNTHETIC_COHORT)
            else:
                _say("heads", f"{name} {method}: training, {epochs} epochs")
                run = run_probe(store, name, HeadConfig(head=method, epochs=epochs), seed=77, cohort=SYNTHETIC_COHORT)
            result.run_ids.append(run["run_id"])
            step("heads", f"{name} {method}", start)
    torch.set_num_threads(threads)

    start = time.perf_counter()
    _say("fairness", f"the table: {ci} bootstrap resamples per run")
    _print_fairness(store, ci, seed)
    step("fairness", "table", start)
    start = time.perf_counter()
    _say("report", f"writing {out / 'report'} ({ci} bootstrap resamples)")
    result.report = build_report(store, out / "report", ci=ci, seed=seed, title="embedkit demo: synthetic cohort")
    step("report", "report.html and report.md", start)
    return result


def _print_fairness(store: Store, ci: int, seed: int) -> None:
    """One line per run: utility, and the sex and age gaps with their bootstrap intervals."""
    from rich.console import Console
    from rich.table import Table

    from embedkit.constants import MIN_GROUP_N
    from embedkit.fairness import catalogue, db, table as fairness_table

    attributes = ["sex", "age_group"]
    con = db.connect(store, catalogue.attributes_to_slice(attributes))
    runs = db.scored_runs(store, split="test")
    rows = fairness_table.fairness_rows(con, runs, attributes, "test", ci, seed, MIN_GROUP_N)
    index = {(r["run_id"], r["attribute"], r["group_or_gap"], r["metric"]): r for r in rows}

    def cell(run_id: str, attribute: str, group: str, metric: str, with_ci: bool = False) -> str:
        return fairness_table.format_cell(index.get((run_id, attribute, group, metric)), MIN_GROUP_N, with_ci)

    table = Table(title=f"test split, 95% BCa bootstrap intervals over {ci} patient resamples", title_justify="left",
                  caption=f"{catalogue.OUTSIDE_FLAG}: the gap lies below almost every resampled gap (a max - min "
                          "gap is biased upward on small groups), so no interval from them contains it",
                  caption_justify="left")
    for column in ("model", "method", "accuracy", "macro-F1", "F1 F", "F1 M", "F1 gap sex [CI]",
                   "F1 gap age [CI]", "EqOdds sex"):
        table.add_column(column, justify="left" if column in ("model", "method") else "right")
    for run in runs:
        rid = run["run_id"]
        table.add_row(run["model"], run["method"], cell(rid, "all", "all", "accuracy"),
                      cell(rid, "all", "all", "macro_f1"), cell(rid, "sex", "F", "macro_f1"),
                      cell(rid, "sex", "M", "macro_f1"), cell(rid, "sex", "gap", "f1_gap", True),
                      cell(rid, "age_group", "gap", "f1_gap", True), cell(rid, "sex", "gap", "eqodds"))
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
    note = fairness_table.random_weights_note(runs)
    if note:
        console.print(note)

"""`embedkit demo`: the embedded default, end to end, with no downloads.

Synthetic X-rays for the NIH 6x200 cohort (its real ages and sexes) with a planted bias, embedded by tiny models
of each family at random init; zero-shot, linear-probe and MLP runs off the stored vectors; the fairness table;
the report. Everything lands in one folder (store, images, report) so the demo never touches a user's store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from embedkit.store.store import Store

DEMO_MODELS = ("tiny-clip", "tiny-biomedclip", "tiny-medclip-rn50", "tiny-medclip-vit", "tiny-gloria")
DEMO_METHODS = ("zeroshot", "lp", "mlp")
DEMO_BIAS = "sex=F:signal=0.3"


@dataclass
class DemoResult:
    store: Store
    report: Path
    run_ids: list[str] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=False, highlight=False).print(message)


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
    from embedkit.embed import embed_cohort
    from embedkit.heads.probe import HeadConfig, run_probe
    from embedkit.heads.zeroshot import run_zeroshot
    from embedkit.models.registry import get_spec, instantiate
    from embedkit.report import build_report
    from embedkit.store.runs import select_runs

    out = Path(out)
    store = Store(out / "store")
    result = DemoResult(store, out / "report" / "report.html")

    def step(name: str, start: float) -> None:
        result.steps.append((name, time.perf_counter() - start))
        _say(f"[green]done[/green] {name} ({result.steps[-1][1]:.1f} s)")

    start = time.perf_counter()
    if SYNTHETIC_COHORT not in cohort_names(store):
        import_synthetic(store, out / "images", size=size, seed=seed, bias=bias)
    step(f"synthetic NIH 6x200 cohort, 1200 images, planted bias: {bias or 'none'}", start)

    for name in models:
        start = time.perf_counter()
        spec = get_spec(name)
        model, weights_id, source = instantiate(spec, random_init=True, seed=seed)
        summary = embed_cohort(store, spec, model, weights_id, source, SYNTHETIC_COHORT, device="auto",
                               workers=workers, progress=False)
        step(f"embed {name}: {summary.line()}", start)

    done = {(r["model"], r["method"]) for r in select_runs(store).to_pylist()}
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # heads are small: one thread avoids the threads waiting on each other at every step
    for name in models:
        start = time.perf_counter()
        for method in methods:
            if (name, method) in done:
                continue
            if method == "zeroshot":
                run = run_zeroshot(store, name, cohort=SYNTHETIC_COHORT)
            else:
                run = run_probe(store, name, HeadConfig(head=method, epochs=epochs), seed=77, cohort=SYNTHETIC_COHORT)
            result.run_ids.append(run["run_id"])
        step(f"heads {name}: {', '.join(methods)}", start)
    torch.set_num_threads(threads)

    start = time.perf_counter()
    _print_fairness(store, ci, seed)
    step("fairness table", start)
    start = time.perf_counter()
    result.report = build_report(store, out / "report", ci=ci, seed=seed, title="embedkit demo: synthetic cohort")
    step("report", start)
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

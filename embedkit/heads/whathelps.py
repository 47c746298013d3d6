"""What helps: a baseline head beside its mitigations, each compared with the baseline by the paired bootstrap.

:func:`mitigation_study` trains the baseline head, every in-processing mitigation (same head, settings and seed,
:mod:`embedkit.heads.mitigate`) and applies every post-hoc correction to the baseline run
(:mod:`embedkit.heads.posthoc`); :func:`what_helps` then reads, for each of those runs against the baseline, the
test macro-F1 (the utility) and each attribute's F1 gap with the paired differences B - A and their intervals from
`embedkit compare` (:func:`embedkit.fairness.compare.paired_differences`: the same patient draws for both runs).
``significant``: compare's rule for several pairs: the p-value Holm-adjusted over the methods compared (per
metric) is below 1 - level; with one method, the interval excludes 0.
"""

from __future__ import annotations

from typing import Sequence

from embedkit.heads.mitigate import Mitigation
from embedkit.heads.posthoc import run_posthoc
from embedkit.heads.probe import HeadConfig, run_probe
from embedkit.store.store import Store

UTILITY = ("all", "macro_f1")


def mitigation_study(store: Store, model: str, base: HeadConfig, mitigations: Sequence[str] = (),
                     posthoc: Sequence[str] = (), by: str = "sex", seed: int = 77,
                     cohort: str | None = None) -> dict[str, str]:
    """Train the baseline and each mitigation (``"groupdro:eta=0.1"``, grouped by ``by``) and apply each post-hoc
    method (``"thresholds"``, ``"thresholds:tpr"``, ``"temperature"``) to the baseline; {label: run_id}, the
    baseline first (label ``baseline``)."""
    runs = {"baseline": run_probe(store, model, base, seed, cohort)["run_id"]}
    for text in mitigations:
        m = Mitigation.parse(text, by)
        runs[f"{base.head}+{text}"] = run_probe(store, model, base.with_(mitigate=m), seed, cohort)["run_id"]
    for text in posthoc:
        method, _, metric = text.partition(":")
        runs[f"{base.head}+{text}"] = run_posthoc(store, runs["baseline"], method, by=by,
                                                  metric=metric or "f1")["run_id"]
    return runs


def what_helps(store: Store, runs: dict[str, str], attributes: Sequence[str] = ("sex",), split: str = "test",
               ci: int = 1000, seed: int = 0, level: float = 0.95) -> list[dict]:
    """One row per (method, metric): the baseline's value, the method's, B - A with its paired interval and
    whether the interval excludes 0; metrics: test macro-F1 and each attribute's F1 gap."""
    from embedkit.fairness import catalogue, compare, db

    labels = list(runs)
    baseline = runs[labels[0]]
    pairs = [(baseline, runs[k]) for k in labels[1:]]
    con = db.connect(store, catalogue.attributes_to_slice(list(attributes)))
    rows = compare.paired_differences(con, pairs, split, ci, seed, level, families=["macro_f1", "f1_gap"],
                                      class_scores=False)
    label_of = {v: k for k, v in runs.items()}
    wanted = {UTILITY, *((a, "f1_gap") for a in attributes)}
    out = []
    for r in rows:
        if (r["attribute"], r["metric"]) not in wanted or r["group_or_gap"] not in ("all", "gap"):
            continue
        out.append({"method": label_of[r["run_b"]], "run_id": r["run_b"], "baseline_run": baseline,
                    "attribute": r["attribute"], "metric": r["metric"], "baseline": r["value_a"],
                    "value": r["value_b"], "difference": r["difference"], "ci_low": r["ci_low"],
                    "ci_high": r["ci_high"], "significant": bool(r["significant"])})
    return out


def print_what_helps(rows: list[dict], ci: int, level: float = 0.95, title: str = "what helps") -> None:
    """One line per method: utility change and each gap change, with paired intervals (* excludes 0)."""
    import sys

    from rich.console import Console
    from rich.table import Table

    def cell(r):
        if r is None or r["difference"] is None:
            return "-"
        text = f"{r['value']:.3f} ({r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}])"
        return text + (" *" if r["significant"] else "")

    metrics = list(dict.fromkeys((r["attribute"], r["metric"]) for r in rows))
    table = Table(title=title, title_justify="left")
    table.add_column("method")
    for attribute, metric in metrics:
        base = next(r["baseline"] for r in rows if (r["attribute"], r["metric"]) == (attribute, metric))
        name = "macro-F1" if metric == "macro_f1" else f"F1 gap {attribute}"
        table.add_column(f"{name} (baseline {base:.3f})", justify="right")
    for method in dict.fromkeys(r["method"] for r in rows):
        index = {(r["attribute"], r["metric"]): r for r in rows if r["method"] == method}
        table.add_row(method, *(cell(index.get(m)) for m in metrics))
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    console.print(f"value (B - baseline [{100 * level:g}% paired bootstrap interval over {ci} patient resamples, "
                  "the same draws for both runs]); * = significant: p Holm-adjusted over the methods compared, per "
                  f"metric, below {1 - level:g} (one method: the interval excludes 0).")


def demo_cohort(folder, bias: str | None, size: int = 96, model: str = "tiny-clip", seed: int = 0) -> Store:
    """The demo's cohort (the NIH 6x200 protocol's rows, ages and sexes, synthetic X-rays with ``bias`` planted,
    e.g. the demo's ``sex=F:signal=0.3``, or none), embedded by ``model`` at random init, in ``folder/store``."""
    from pathlib import Path

    from embedkit.data.build import SYNTHETIC_COHORT, import_synthetic
    from embedkit.data.cohort import cohort_names
    from embedkit.embed import ToEmbed, embed_models
    from embedkit.models.registry import get_spec, instantiate

    folder = Path(folder)
    store = Store(folder / "store")
    if SYNTHETIC_COHORT not in cohort_names(store):
        import_synthetic(store, folder / "images", size=size, seed=seed, bias=bias)
    spec = get_spec(model)
    embed_models(store, [ToEmbed(spec, *instantiate(spec, random_init=True, seed=seed))], SYNTHETIC_COHORT,
                 device="cpu", workers=0)
    return store

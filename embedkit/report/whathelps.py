"""The report's "what helps" tables: each mitigation beside its baseline, and how much each embedding encodes.

Pairs are read from the runs' configs, never guessed from names: a post-hoc run's baseline is its ``source_run``; a
mitigated run's is the selected run of the same model, weights, cohort and seed whose config is the mitigated
one's without ``mitigation``. Each baseline's pairs are compared by :func:`embedkit.heads.whathelps.what_helps`
(the paired bootstrap of `embedkit compare`). Runs of attribute probes (config ``target``) fill the encoding table
(:func:`embedkit.heads.attribute.encoding_table`).
"""

from __future__ import annotations

import json

from embedkit.report.data import ReportData
from embedkit.report.tables import Table


def baseline_pairs(runs: list[dict]) -> dict[str, list[str]]:
    """{baseline run_id: [derived run_ids]} among ``runs`` (rows of ``runs`` with config as JSON text)."""
    configs = {r["run_id"]: json.loads(r["config"] or "{}") for r in runs}
    by_id = {r["run_id"]: r for r in runs}
    out: dict[str, list[str]] = {}
    for run in runs:
        config = configs[run["run_id"]]
        base = None
        if config.get("source_run") in by_id:
            base = config["source_run"]
        elif "mitigation" in config:
            plain = {k: v for k, v in config.items() if k != "mitigation"}
            base = next((r["run_id"] for r in runs if configs[r["run_id"]] == plain and all(
                r[k] == run[k] for k in ("model", "weights_id", "cohort", "seed"))), None)
        if base is not None:
            out.setdefault(base, []).append(run["run_id"])
    return out


def what_helps_tables(store, data: ReportData) -> list[Table]:
    """The "what helps" table (when the selection holds baselines with mitigated or corrected runs) and the
    attribute-encoding table (when it holds attribute probes)."""
    from embedkit.heads.attribute import encoding_table
    from embedkit.heads.whathelps import what_helps
    from embedkit.store.runs import select_runs

    ids = list(data.runs["run_id"])
    if not ids:
        return []
    runs = select_runs(store, ids).to_pylist()
    methods = {r["run_id"]: r["method"] for r in runs}
    attributes = [a for a in data.attributes if a != "all"]
    tables = []
    pairs = baseline_pairs(runs)
    if pairs:
        rows, columns = [], ["model", "baseline", "method", "macro-F1 (B - A [CI])",
                             *(f"F1 gap {a} (B - A [CI])" for a in attributes)]
        for base, derived in pairs.items():
            labelled = {"baseline": base, **{f"{methods[r]} ({r})": r for r in derived}}
            found = what_helps(store, labelled, attributes, data.split, max(data.n_resamples, 1), data.seed)
            model = next(r["model"] for r in runs if r["run_id"] == base)
            for label in list(labelled)[1:]:
                index = {(r["attribute"], r["metric"]): r for r in found if r["method"] == label}
                cells = [_cell(index.get(("all", "macro_f1")))]
                cells += [_cell(index.get((a, "f1_gap"))) for a in attributes]
                rows.append([model, f"{methods[base]} ({base})", label.split(" (")[0], *cells])
        tables.append(Table("what-helps", "What helps: each mitigation against its baseline", columns, rows, [
            f"{data.split} split. B - A: the method's value minus its baseline's, with the paired bootstrap "
            f"interval of `embedkit compare` ({max(data.n_resamples, 1)} patient resamples, the same draws for "
            "both runs); * = significant after Holm's correction over the methods sharing a baseline, per metric. "
            "In-processing methods are trained with the baseline's settings and seed; post-hoc corrections are "
            "fitted on the baseline's val rows (docs/mitigation.md)."]))
    if any("target" in json.loads(r["config"] or "{}") for r in runs):
        found = encoding_table(store, ids, split=data.split, ci=data.n_resamples, seed=data.seed)
        rows = [[r["model"], r["weights_id"], str(r["head"]), r["target"], str(r["n"] or "-"), _auc(r)]
                for r in found]
        tables.append(Table("attribute-encoding", "Attribute encoding: how much of each demographic the vectors "
                            "carry", ["model", "weights", "head", "target", "n", "AUC [95% CI]"], rows, [
                                "A head trained to predict the demographic from the stored vectors (`embedkit "
                                "probe --target`); AUC 0.5: nothing a head can read, 1: all of it."]))
    return tables


def _cell(r: dict | None) -> str:
    if r is None or r["difference"] is None:
        return "-"
    text = f"{r['value']:.3f} ({r['difference']:+.3f}"
    if r["ci_low"] is not None:
        text += f" [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
    return text + ")" + (" *" if r["significant"] else "")


def _auc(r: dict) -> str:
    if r["auc"] is None:
        return "-"
    return f"{r['auc']:.3f}" + (f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r["ci_low"] is not None else "")

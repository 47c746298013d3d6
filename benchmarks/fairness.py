"""Benchmark: the fairness metric suite through the SQL views against fairlearn MetricFrame + pandas, same run.

    .venv/bin/python benchmarks/fairness.py                       # 1 M and 10 M rows, then the bootstrap
    .venv/bin/python benchmarks/fairness.py --rows 1000000 --bootstrap-only

For each size: one run's predictions with demographics (sex, age -> age_group, view), six classes. The rows are held
as Arrow tables registered in DuckDB (writing 10 M rows into a Lance store first would time LanceDB, not the
metrics); the SQL is the same as over a store: ``embedkit.fairness.db.connect_tables`` is what ``connect`` calls.
Both sides compute, for the attributes sex, age_group, age_group_sex and view: accuracy, per-class F1, macro-F1
(zero_division 0 and 1), Var_F1, per-class TPR/FPR, equalized odds, per-class and macro AUC, top-label ECE,
classwise ECE, L1 calibration, every gap between groups, and the paper's signed F1 deltas. The script checks that
both agree before it prints the ratio. Then: 1000 bootstrap resamples of a 240-row NIH-6x200-like test split held
in a real (LanceDB) store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from embedkit.constants import AGE_OLD_FROM, NIH_CLASSES  # noqa: E402
from embedkit.fairness import bootstrap, db  # noqa: E402
from embedkit.store import schemas  # noqa: E402

K = len(NIH_CLASSES)
ATTRIBUTES = ["sex", "age_group", "age_group_sex", "view"]
ECE_BINS = db.ECE_BINS


# ---- data ---------------------------------------------------------------------------------------------------------


def make_tables(n: int, seed: int = 0, run_id: str = "bench") -> dict[str, pa.Table]:
    """images, predictions and runs for ``n`` predictions of one run: informative but imperfect, a bit unfair."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, K, n).astype(np.int32)
    sex = np.where(rng.random(n) < 0.5, "M", "F")
    age = rng.integers(18, 95, n).astype(np.int32)
    view = np.where(rng.random(n) < 0.6, "PA", "AP")
    logits = rng.normal(size=(n, K)).astype(np.float32)
    # the true class gets a boost, smaller for old patients: a group gap to find
    boost = np.where(age >= AGE_OLD_FROM, 1.0, 1.4).astype(np.float32)
    logits[np.arange(n), y_true] += boost
    logits -= logits.max(1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(1, keepdims=True)
    ids = pc.binary_join_element_wise("img", pa.array(np.arange(n).astype(str)), "")
    row_ids = pc.binary_join_element_wise("bench/", ids, "")
    images = pa.table(
        {
            "row_id": row_ids,
            "cohort": pa.array(np.full(n, "bench")),
            "image_id": ids,
            "path": pa.nulls(n, pa.string()),
            "labels": pa.nulls(n, pa.list_(pa.string())),
            "label": pa.array(np.asarray(NIH_CLASSES)[y_true]),
            "age": age,
            "age_group": pa.nulls(n, pa.string()),
            "sex": sex,
            "view": view,
            "patient_id": pc.binary_join_element_wise("p", pa.array((np.arange(n) // 2).astype(str)), ""),
            "split": pa.array(np.full(n, "test")),
            "extra": pa.nulls(n, pa.string()),
        },
        schema=schemas.IMAGES,
    )
    predictions = pa.table(
        {
            "run_id": pa.array(np.full(n, run_id)),
            "row_id": row_ids,
            "image_id": ids,
            "split": pa.array(np.full(n, "test")),
            "y_true": y_true,
            "y_pred": probs.argmax(1).astype(np.int32),
            "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), K).cast(pa.list_(pa.float32())),
        },
        schema=schemas.PREDICTIONS,
    )
    runs = pa.Table.from_pylist(
        [{"run_id": run_id, "model": "bench", "method": "lp", "config": json.dumps({"classes": list(NIH_CLASSES)})}],
        schema=schemas.RUNS,
    )
    return {"images": images, "predictions": predictions, "runs": runs}


# ---- the baseline: fairlearn MetricFrame + pandas ------------------------------------------------------------------


def _ece(y_true, y_pred, conf, hit) -> float:
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, ECE_BINS - 1)  # (lo, hi], 0 in the first
    gap = np.bincount(bins, weights=hit - conf, minlength=ECE_BINS)
    return float(np.abs(gap).sum() / len(conf))


def _var_f1(y_true, y_pred) -> float:
    from sklearn.metrics import f1_score

    return float(np.var(f1_score(y_true, y_pred, labels=list(range(K)), average=None, zero_division=0), ddof=1))


def _one_vs_rest(metric, c: int):
    def wrapped(y_true, y_pred):
        return metric(np.asarray(y_true) == c, np.asarray(y_pred) == c)

    return wrapped


def _auc(y_true, y_pred, score, c: int) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true) == c
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else np.nan


def _classwise_ece(y_true, y_pred, score, c: int) -> float:
    return _ece(y_true, y_pred, np.asarray(score, dtype=np.float64), (np.asarray(y_true) == c).astype(np.float64))


def baseline(tables: dict[str, pa.Table], attributes: list[str] = ATTRIBUTES, only: list[str] | None = None) -> dict:
    """The same metrics with fairlearn MetricFrame (one per attribute) on a pandas frame.

    ``only`` keeps those metrics (and skips the derived gaps that need others): for the 10 M check, where every
    MetricFrame call converts each row to an array (np.stack), some 70 s per metric and attribute here.
    """
    from fairlearn.metrics import MetricFrame, false_positive_rate, true_positive_rate
    from sklearn.metrics import accuracy_score, f1_score

    p = tables["predictions"].to_pandas()
    i = tables["images"].select(["row_id", "age", "sex", "view"]).to_pandas()
    df = p.merge(i, on="row_id")
    P = np.stack(df.pop("probs").to_numpy()).astype(np.float64)
    df["age_group"] = np.where(df.age >= AGE_OLD_FROM, "old", "young")
    df["age_group_sex"] = df.age_group + "_" + df.sex
    conf = P.max(1)
    hit = (df.y_pred == df.y_true).to_numpy(np.float64)
    onehot = np.eye(K)[df.y_true.to_numpy()]
    l1 = np.abs(P - onehot).mean(1)

    labels = list(range(K))
    metrics = {
        "accuracy": accuracy_score,
        "macro_f1": partial(f1_score, labels=labels, average="macro", zero_division=0),
        "macro_f1_zd1": partial(f1_score, labels=labels, average="macro", zero_division=1),
        "var_f1": _var_f1,
        "ece": lambda y, yp, conf, hit: _ece(y, yp, np.asarray(conf), np.asarray(hit)),
        "l1_calibration": lambda y, yp, l1: float(np.mean(l1)),
    }
    params: dict = {"ece": {"conf": conf, "hit": hit}, "l1_calibration": {"l1": l1}}
    for c, name in enumerate(NIH_CLASSES):
        metrics[f"f1[{name}]"] = partial(f1_score, labels=[c], average="macro", zero_division=0)
        metrics[f"tpr[{name}]"] = _one_vs_rest(true_positive_rate, c)
        metrics[f"fpr[{name}]"] = _one_vs_rest(false_positive_rate, c)
        metrics[f"auc[{name}]"] = partial(_auc, c=c)
        metrics[f"classwise_ece[{name}]"] = partial(_classwise_ece, c=c)
        params[f"auc[{name}]"] = {"score": P[:, c]}
        params[f"classwise_ece[{name}]"] = {"score": P[:, c]}

    if only is not None:
        metrics = {k: v for k, v in metrics.items() if k in only}
        params = {k: v for k, v in params.items() if k in only}
        return {a: MetricFrame(metrics=metrics, y_true=df.y_true, y_pred=df.y_pred, sensitive_features=df[a],
                               sample_params=params).by_group for a in attributes}
    out: dict = {}
    for attribute in attributes:
        mf = MetricFrame(metrics=metrics, y_true=df.y_true, y_pred=df.y_pred, sensitive_features=df[attribute],
                         sample_params=params)
        by_group = mf.by_group
        by_group["macro_auc"] = by_group[[f"auc[{n}]" for n in NIH_CLASSES]].mean(axis=1)
        by_group["classwise_ece"] = by_group[[f"classwise_ece[{n}]" for n in NIH_CLASSES]].mean(axis=1)
        gaps = by_group.max() - by_group.min()
        eo = {n: (gaps[f"tpr[{n}]"] + gaps[f"fpr[{n}]"]) / 2 for n in NIH_CLASSES}
        out[attribute] = {
            "by_group": by_group,
            "overall": mf.overall,
            "f1_gap": gaps["macro_f1"],
            "ece_gap": gaps["ece"],
            "auc_gap": gaps["macro_auc"],
            "l1_calibration_gap": gaps["l1_calibration"],
            "eqodds": float(np.mean(list(eo.values()))),
            "eqodds_worst": float(np.max(list(eo.values()))),
        }
    cells = out["age_group_sex"]["by_group"]["macro_f1_zd1"]
    out["f1_delta_paper"] = {
        "age_group": (cells["old_M"] + cells["old_F"]) / 2 - (cells["young_M"] + cells["young_F"]) / 2,
        "sex": ((cells["young_M"] - cells["young_F"]) + (cells["old_M"] - cells["old_F"])) / 2,
    }
    return out


def sql_suite(tables: dict[str, pa.Table], class_scores: bool = True, attributes: list[str] = ATTRIBUTES) -> dict:
    """Every metric and gap through the views: fairness_summary, as a {(attribute, group_or_gap, metric): value}."""
    con = db.connect_tables(tables, attributes)
    con.execute("SET enable_progress_bar = false")
    with db.scoped(con, class_scores=class_scores):
        rows = con.sql("SELECT attribute, group_or_gap, metric, value FROM fairness_summary").to_arrow_table()
    return {(a, g, m): v for a, g, m, v in zip(*(rows.column(c).to_pylist() for c in rows.column_names[:3]),
                                                rows.column("value").to_pylist())}


def max_difference(sql: dict, base: dict) -> float:
    """Largest absolute difference over the metrics both computed (every group, every gap)."""
    worst = 0.0
    for attribute in ATTRIBUTES:
        by_group = base[attribute]["by_group"]
        for group, row in by_group.iterrows():
            for metric, value in row.items():
                got = sql.get((attribute, group, metric))
                if got is not None and not np.isnan(value):
                    worst = max(worst, abs(got - value))
        for gap in ("f1_gap", "ece_gap", "auc_gap", "l1_calibration_gap", "eqodds", "eqodds_worst"):
            worst = max(worst, abs(sql[(attribute, "gap", gap)] - base[attribute][gap]))
    worst = max(worst, abs(sql[("age_group", "old-young", "f1_delta_paper")] - base["f1_delta_paper"]["age_group"]))
    worst = max(worst, abs(sql[("sex", "M-F", "f1_delta_paper")] - base["f1_delta_paper"]["sex"]))
    return worst


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# ---- bootstrap on an NIH-6x200-like test split -------------------------------------------------------------------


def nih_like_store(path: str):
    """240 test rows: 6 classes x (young, old) x (M, F) x 10, one image per patient, in a LanceDB store."""
    from embedkit.store.store import Store

    rng = np.random.default_rng(42)
    rows = []
    for c in range(K):
        for age_lo, age_hi in ((20, AGE_OLD_FROM), (AGE_OLD_FROM, 90)):
            for sex in ("M", "F"):
                for _ in range(10):
                    rows.append((c, int(rng.integers(age_lo, age_hi)), sex))
    n = len(rows)
    tables = make_tables(n, seed=1, run_id="nih-like")
    y_true = np.array([r[0] for r in rows], dtype=np.int32)
    images = tables["images"].to_pandas()
    images["age"] = np.array([r[1] for r in rows], dtype=np.int32)
    images["sex"] = [r[2] for r in rows]
    preds = tables["predictions"]
    P = np.stack(preds.column("probs").to_numpy(zero_copy_only=False))
    logits = np.log(P) + 1.5 * np.eye(K)[y_true]
    P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    preds = preds.set_column(preds.schema.get_field_index("y_true"), "y_true", pa.array(y_true))
    preds = preds.set_column(preds.schema.get_field_index("y_pred"), "y_pred", pa.array(P.argmax(1).astype(np.int32)))
    preds = preds.set_column(preds.schema.get_field_index("probs"), "probs",
                             pa.array([list(p) for p in P.astype(np.float32)], pa.list_(pa.float32())))
    store = Store(path)
    store.upsert("images", pa.Table.from_pandas(images, schema=schemas.IMAGES, preserve_index=False), ["row_id"],
                 schemas.IMAGES)
    store.write_run({"run_id": "nih-like", "model": "bench", "method": "lp",
                     "config": {"classes": list(NIH_CLASSES)}}, preds)
    return store


def bench_bootstrap(n_resamples: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = nih_like_store(os.path.join(tmp, "store"))
        for attributes in (["sex", "age_group", "age_group_sex"], ATTRIBUTES):
            con = db.connect(store, attributes)
            con.execute("SET enable_progress_bar = false")
            for class_scores, what in ((True, "every metric (AUC, classwise ECE too)"),
                                       (False, "without AUC and classwise ECE (embedkit fairness)")):
                table, seconds = timed(bootstrap.bootstrap_intervals, con, ["nih-like"], "test", n_resamples, 0,
                                       class_scores=class_scores)
                print(f"bootstrap: {n_resamples} resamples, 240 rows, attributes {'+'.join(attributes)}, {what}: "
                      f"{seconds:.2f} s ({table.num_rows} intervals)")


# ---- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--full-up-to", type=int, default=2_000_000,
                        help="run the full suite on both sides up to this many rows (above: see the docstring)")
    parser.add_argument("--bootstrap-only", action="store_true")
    parser.add_argument("--no-bootstrap", action="store_true")
    args = parser.parse_args()
    import duckdb

    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}, duckdb {duckdb.__version__}")
    if not args.bootstrap_only:
        for n in args.rows:
            tables, seconds = timed(make_tables, n)
            print(f"\n{n:,} prediction rows (Arrow tables registered in DuckDB), made in {seconds:.1f} s")
            _, t_counts = timed(sql_suite, tables, class_scores=False)
            print(f"  SQL views, every metric but AUC and classwise ECE, 4 attributes: {t_counts:.1f} s")
            if n <= args.full_up_to:
                sql_all, t_sql = timed(sql_suite, tables)
                print(f"  SQL views, full suite, 4 attributes: {t_sql:.1f} s")
                base, t_base = timed(baseline, tables)
                print(f"  fairlearn MetricFrame + pandas, full suite, 4 attributes: {t_base:.1f} s")
                print(f"  largest difference between the two: {max_difference(sql_all, base):.2e}")
                print(f"  RATIO (baseline / SQL), full suite: {t_base / t_sql:.1f}x")
                del sql_all, base
            else:
                # Both full suites are out of reach here: the SQL AUC window over rows x attributes x classes
                # (300 M rows) outgrows this machine's memory, and MetricFrame needs hours. Measured instead, same
                # rows, same run: one attribute; SQL computes all its metrics but AUC / classwise ECE, the baseline
                # only three of them, so the ratio is a lower bound.
                only = ["accuracy", "macro_f1", "ece"]
                sql_sex, t_sql = timed(sql_suite, tables, class_scores=False, attributes=["sex"])
                print(f"  SQL views, attribute sex, every metric but AUC and classwise ECE: {t_sql:.1f} s")
                base, t_base = timed(baseline, tables, attributes=["sex"], only=only)
                print(f"  fairlearn MetricFrame + pandas, attribute sex, {', '.join(only)} only: {t_base:.1f} s")
                diff = max(abs(sql_sex[("sex", g, m)] - v) for g, row in base["sex"].iterrows() for m, v in row.items())
                print(f"  largest difference between the two: {diff:.2e}")
                print(f"  RATIO (baseline / SQL), attribute sex, lower bound: {t_base / t_sql:.1f}x")
                del sql_sex, base
            del tables
    if not args.no_bootstrap:
        print()
        bench_bootstrap(args.resamples)


if __name__ == "__main__":
    main()

"""Benchmark: the multi-label audit at NIH scale: import, a head, and the multi-label fairness suite with a
200-resample patient bootstrap, against fairlearn MetricFrame looped over the labels on the same inputs.

    .venv/bin/python benchmarks/multilabel.py                      # all 112,120 NIH rows, d=512, 200 resamples
    .venv/bin/python benchmarks/multilabel.py --limit 20000 --resamples 50

Stages, each timed:
1. import: ``data synth --cohort nih --vectors 512`` (embedkit.data.build.import_synthetic_multilabel) on the real
   NIH metadata (../shared/data/nih/Data_Entry_2017_v2020.csv.gz unless --metadata): every image's label list, age,
   sex and view, split by patient, vectors synthesised directly (no images), with a planted under-diagnosis of
   women on Effusion.
2. head: embedkit's multi-label logreg (`probe --head logreg`: one binary logistic regression per label by the
   batched L-BFGS, thresholds at max F1 on val), recorded by the multi-label contract of docs/multilabel.md.
3. fairness: the SQL suite (label_metric_values: per label and group n, positives, AUC, TPR, FPR, FNR, precision,
   F1, ECE; underdiagnosis; gaps, worst groups, signed differences) for sex, age_decade, age_group, view and
   age_group_sex on the test split: observed, then with 200 bootstrap resamples of patients (percentile intervals,
   batches of 25 replicates).
4. baseline: fairlearn MetricFrame, one per label and attribute (the same metrics, AUC and ECE as MetricFrame
   metrics on the scores), plus underdiagnosis per attribute, on the same arrays; checked against the SQL values
   (1e-9) before the ratio is printed. fairlearn has no bootstrap: its 200-resample time is the time of a few
   reweighted replicates (rows repeated as the same draws say) times 200 / that few, and printed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embedkit.constants import NO_FINDING  # noqa: E402
from embedkit.fairness import bootstrap, db  # noqa: E402
from embedkit.store.store import Store  # noqa: E402

METADATA = ROOT.parent / "shared" / "data" / "nih" / "Data_Entry_2017_v2020.csv.gz"
ATTRIBUTES = ["sex", "age_decade", "age_group", "view", "age_group_sex"]
BIAS = "sex=F:signal=0.5:label=Effusion"
TOL = 1e-9


def stage(name: str, times: dict, start: float) -> None:
    times[name] = time.perf_counter() - start
    print(f"  {name}: {times[name]:.1f} s", flush=True)


# ---- 2. the head ------------------------------------------------------------------------------------------------


def head_stage(store: Store, cohort: str) -> tuple[str, str]:
    """embedkit's multi-label logreg on the stored vectors (one binary L-BFGS model per label, thresholds at max
    F1 on val), recorded as `embedkit probe --head logreg` records it. Returns (run_id, description)."""
    from embedkit.data.synth_multilabel import VECTOR_MODEL
    from embedkit.heads.probe import HeadConfig, run_probe

    run = run_probe(store, VECTOR_MODEL, HeadConfig("logreg"), cohort=cohort)
    return run["run_id"], "embedkit probe --head logreg (multi-label: one binary logistic regression per label)"


# ---- 4. fairlearn baseline --------------------------------------------------------------------------------------


def _ece(y: np.ndarray, score: np.ndarray, bins: int = db.ECE_BINS) -> float:
    """The label's ECE (metric(y_true, y_pred) as MetricFrame calls it): bins (b/B, (b+1)/B], 0 in the first."""
    y = np.asarray(y, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    b = np.clip(np.ceil(score * bins).astype(int) - 1, 0, bins - 1)
    gap = np.bincount(b, weights=y - score, minlength=bins)
    return float(np.abs(gap).sum() / len(score))


def fairlearn_suite(frame: pd.DataFrame, S: np.ndarray, Y: np.ndarray, thresholds: np.ndarray,
                    labels: tuple[str, ...]) -> dict:
    """The same per-label metrics, per attribute, with MetricFrame; keyed as label_metric_values."""
    from fairlearn.metrics import MetricFrame, false_negative_rate, false_positive_rate
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    def auc(y, s):
        return roc_auc_score(y, s) if 0 < np.sum(y) < len(y) else np.nan

    out = {}
    nf = labels.index(NO_FINDING)
    diseased = np.array([any(label != NO_FINDING for label in row) for row in frame["labels"]])
    for attribute in ["all", *ATTRIBUTES]:
        groups = frame[attribute] if attribute != "all" else pd.Series(["all"] * len(frame))
        for k, label in enumerate(labels):
            y, s = Y[:, k], S[:, k]
            pred = s >= thresholds[k]
            # undefined is NaN as in the views (fairlearn's rates say 0 for a group without positives or negatives)
            counts = MetricFrame(
                metrics={"tpr": lambda a, p: recall_score(a, p, zero_division=np.nan),
                         "fpr": lambda a, p: false_positive_rate(a, p) if (~a).any() else np.nan,
                         "fnr": lambda a, p: false_negative_rate(a, p) if a.any() else np.nan,
                         "precision": lambda a, p: precision_score(a, p, zero_division=np.nan),
                         "f1": lambda a, p: f1_score(a, p, zero_division=0)},
                y_true=y, y_pred=pred, sensitive_features=groups)
            scored = MetricFrame(metrics={"auc": auc, "ece": _ece}, y_true=y, y_pred=s, sensitive_features=groups)
            table = pd.concat([counts.by_group, scored.by_group], axis=1)
            for family in table.columns:
                for group, value in table[family].items():
                    out[(attribute, str(group), f"{family}[{label}]")] = value
                if attribute != "all" and table[family].notna().sum() >= 2:  # a gap needs two defined groups
                    out[(attribute, "gap", f"{family}_gap[{label}]")] = table[family].max() - table[family].min()
        rows = diseased
        under = MetricFrame(metrics={"underdiagnosis": lambda a, p: float(np.mean(p))},
                            y_true=Y[rows, nf], y_pred=S[rows, nf] >= thresholds[nf],
                            sensitive_features=groups[rows].reset_index(drop=True))
        for group, value in under.by_group["underdiagnosis"].items():
            out[(attribute, str(group), "underdiagnosis")] = value
    return out


def compare(sql: dict, reference: dict) -> tuple[int, float, tuple | None]:
    """(values compared, largest absolute difference, its key) over the keys with a defined reference value."""
    worst, n, where = 0.0, 0, None
    for key, want in reference.items():
        if want is None or (isinstance(want, float) and np.isnan(want)):
            continue
        got = sql.get(key)
        if got is None:
            raise SystemExit(f"the SQL suite has no value for {key} (fairlearn: {want})")
        if abs(got - want) > worst:
            worst, where = abs(got - want), key
        n += 1
    return n, worst, where


# ---- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metadata", type=Path, default=METADATA)
    parser.add_argument("--limit", type=int, default=None, help="first N metadata rows (default: all 112,120)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--batch", type=int, default=25, help="bootstrap replicates per query")
    parser.add_argument("--fairlearn-replicates", type=int, default=3,
                        help="reweighted replicates fairlearn is timed on (its 200-resample time is extrapolated)")
    parser.add_argument("--store", type=Path, default=None, help="store folder (default: a temporary one)")
    args = parser.parse_args()
    if not args.metadata.exists():
        raise SystemExit(f"error: no NIH metadata at {args.metadata} (pass --metadata)")
    from embedkit.data.build import import_synthetic_multilabel

    times: dict[str, float] = {}
    tmp = tempfile.TemporaryDirectory(prefix="embedkit-bench-ml-")
    store = Store(args.store or Path(tmp.name) / "store")
    print(f"metadata {args.metadata} ({'all rows' if args.limit is None else f'first {args.limit}'}), d={args.dim}, "
          f"{args.resamples} resamples; {os.cpu_count()} CPUs", flush=True)

    start = time.perf_counter()
    built = import_synthetic_multilabel(store, args.metadata, None, limit=args.limit, cohort="nih-synth",
                                        vectors=args.dim, bias=BIAS)
    stage("1 import (cohort + synthesised vectors)", times, start)
    print(f"    {built.result.imported} rows imported, bias {built.bias}")

    start = time.perf_counter()
    run_id, how = head_stage(store, "nih-synth")
    stage("2 head", times, start)
    print(f"    {how}; run {run_id}")

    start = time.perf_counter()
    con = db.connect(store, ATTRIBUTES)
    with db.scoped(con, [run_id], "test"):
        observed = con.sql("SELECT attribute, group_or_gap, metric, value FROM label_metric_values "
                           "WHERE replicate = 0").fetchall()
    stage("3a SQL suite, observed (every label, group, metric, gap)", times, start)
    sql_values = {(a, g, m): v for a, g, m, v in observed}
    print(f"    {len(observed)} values")

    start = time.perf_counter()
    intervals = bootstrap.bootstrap_intervals(con, [run_id], "test", n_resamples=args.resamples, seed=0,
                                              suite="multilabel", bca=False, batch=args.batch)
    stage(f"3b SQL suite with {args.resamples} bootstrap resamples", times, start)
    rows = {(r["attribute"], r["group_or_gap"], r["metric"]): r for r in intervals.to_pylist()}
    for key in [("sex", "F-M", "fnr_diff[Effusion]"), ("sex", "F-M", "auc_diff[Effusion]"),
                ("sex", "F-M", "fnr_diff[Mass]"), ("sex", "F-M", "underdiagnosis_diff"),
                ("age_decade", "gap", "underdiagnosis_gap")]:
        r = rows.get(key)
        if r:
            print(f"    {key[0]} {key[1]} {key[2]}: {r['value']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]")

    # the same inputs as arrays: the test split's scores, truth and groups, read once (not timed)
    with db.scoped(con, [run_id], "test"):
        frame = con.sql("SELECT row_id, unit_id, labels, probs, " + ", ".join(ATTRIBUTES)
                        + " FROM predictions_base ORDER BY row_id").df()
        config = json.loads(con.sql("SELECT config FROM runs WHERE run_id = $r", params={"r": run_id}).fetchall()[0][0])
    S = np.stack(frame["probs"].map(lambda p: np.asarray(p, dtype=np.float32))).astype(np.float64)
    labels = tuple(config["classes"])  # the run's label order: its probs and thresholds follow it
    Y = np.array([[label in set(row) for label in labels] for row in frame["labels"]])
    thresholds = np.asarray(config["thresholds"])

    start = time.perf_counter()
    reference = fairlearn_suite(frame, S, Y, thresholds, labels)
    stage("4a fairlearn MetricFrame over the labels, observed", times, start)
    n, worst, where = compare(sql_values, reference)
    print(f"    agreement: {n} values, largest |SQL - fairlearn| = {worst:.2e}")
    if worst > TOL:
        raise SystemExit(f"error: the SQL suite and fairlearn disagree by {worst:.2e} (> {TOL}) at {where}: "
                         f"SQL {sql_values.get(where)}, fairlearn {reference.get(where)}")

    k = max(1, args.fairlearn_replicates)
    members = frame[["row_id", "unit_id"]]
    start = time.perf_counter()
    for r in range(k):  # a replicate: patients redrawn (unstratified here: the cost is what is timed), rows repeated
        units = members["unit_id"].unique()
        drawn = pd.Series(np.random.default_rng(r).choice(units, len(units))).value_counts()
        repeat = members["unit_id"].map(drawn).fillna(0).astype(int).to_numpy()
        idx = np.repeat(np.arange(len(frame)), repeat)
        fairlearn_suite(frame.iloc[idx].reset_index(drop=True), S[idx], Y[idx], thresholds, labels)
    per_replicate = (time.perf_counter() - start) / k
    times[f"4b fairlearn, {args.resamples} resamples (extrapolated)"] = per_replicate * args.resamples
    print(f"  4b fairlearn MetricFrame per reweighted replicate: {per_replicate:.1f} s (timed on {k}); "
          f"x {args.resamples} = {per_replicate * args.resamples:.0f} s (extrapolated)")

    print("\nresults")
    for name, seconds in times.items():
        print(f"  {name:60s} {seconds:9.1f} s")
    observed_ratio = times["4a fairlearn MetricFrame over the labels, observed"] / \
        times["3a SQL suite, observed (every label, group, metric, gap)"]
    boot_ratio = times[f"4b fairlearn, {args.resamples} resamples (extrapolated)"] / \
        times[f"3b SQL suite with {args.resamples} bootstrap resamples"]
    print(f"  observed suite: SQL {observed_ratio:.1f}x faster than fairlearn MetricFrame looped over "
          f"{len(labels)} labels (target >= 10x)")
    print(f"  {args.resamples}-resample bootstrap: SQL {boot_ratio:.1f}x faster than fairlearn (extrapolated from {k})")
    tmp.cleanup()


if __name__ == "__main__":
    main()

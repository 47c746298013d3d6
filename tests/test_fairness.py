"""Fairness views, bootstrap and CLI: every metric cross-checked against scikit-learn, fairlearn or numpy to 1e-9."""

from __future__ import annotations

import json
from functools import partial

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from typer.testing import CliRunner

from embedkit.constants import AGE_OLD_FROM, NIH_CLASSES
from embedkit.fairness import bootstrap, catalogue, db
from embedkit.fairness.catalogue import SMALL_FLAG
from embedkit.store import schemas
from embedkit.store.store import Store

K = len(NIH_CLASSES)
TOL = 1e-9
ATTRIBUTES = ["sex", "age_group", "age_group_sex", "view"]


def _images(n_test: int, n_train: int, rng: np.random.Generator) -> pd.DataFrame:
    n = n_test + n_train
    ages = rng.integers(20, 90, n)
    ages[:6] = [59, 60, 61, 59, 60, 61]  # the boundary: 60 is old
    frame = pd.DataFrame(
        {
            "row_id": [f"toy/img{i}" for i in range(n)],
            "cohort": "toy",
            "image_id": [f"img{i}" for i in range(n)],
            "path": None,
            "labels": [[NIH_CLASSES[0]]] * n,
            "label": NIH_CLASSES[0],
            "age": ages.astype("int32"),
            "age_group": "stale",  # the views recompute it from age
            "sex": rng.choice(["M", "F"], n),
            "view": rng.choice(["PA", "AP"], n),
            # two images per patient for the first rows: the bootstrap resamples patients, not images
            "patient_id": [f"p{i // 2}" if i < 80 else f"p{i}" for i in range(n)],
            "split": ["test"] * n_test + ["train"] * n_train,
            "extra": "{}",
        }
    )
    return frame


def _predictions(images: pd.DataFrame, run_id: str, rng: np.random.Generator, ties: bool) -> pa.Table:
    n = len(images)
    logits = rng.normal(size=(n, K)) * 1.3
    probs = np.exp(logits)
    probs /= probs.sum(1, keepdims=True)
    if ties:  # coarse scores: many exact ties inside every class, as scores of a quantised model would have
        probs = np.round(probs * 20) / 20
    probs = probs.astype(np.float32)
    y_true = rng.integers(0, K, n).astype(np.int32)
    y_true[: 2 * K] = np.arange(2 * K) % K
    return pa.table(
        {
            "run_id": [run_id] * n,
            "row_id": images["row_id"],
            "image_id": images["image_id"],
            "split": images["split"],
            "y_true": y_true,
            "y_pred": probs.argmax(1).astype(np.int32),
            "probs": [list(p) for p in probs],
        },
        schema=schemas.PREDICTIONS,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    rng = np.random.default_rng(7)
    images = _images(360, 60, rng)
    s = Store(tmp_path_factory.mktemp("fairness") / "store")
    s.upsert("images", pa.Table.from_pandas(images, schema=schemas.IMAGES, preserve_index=False), ["row_id"],
             schemas.IMAGES)
    for run_id, ties in (("run-a", False), ("run-b", True)):
        config = {"classes": list(NIH_CLASSES)}
        s.write_run({"run_id": run_id, "model": "toy", "method": "lp", "config": config},
                    _predictions(images, run_id, rng, ties))
    return s


@pytest.fixture(scope="module")
def con(store):
    return db.connect(store, ATTRIBUTES)


@pytest.fixture(scope="module")
def frame(con) -> pd.DataFrame:
    """The test split as the reference implementations see it: one row per prediction, numpy probabilities."""
    df = con.sql("SELECT * FROM predictions_base WHERE split = 'test' ORDER BY run_id, row_id").df()
    df["P"] = df["probs"].map(lambda p: np.asarray(p, dtype=np.float32))
    return df


def _summary(con, run_id: str) -> dict:
    rows = con.sql(
        "SELECT attribute, group_or_gap, metric, value, n FROM fairness_summary WHERE run_id = $r AND split = 'test'",
        params={"r": run_id},
    ).to_arrow_table().to_pylist()
    return {(r["attribute"], r["group_or_gap"], r["metric"]): (r["value"], r["n"]) for r in rows}


def _groups(df: pd.DataFrame, attribute: str):
    if attribute == "all":
        yield "all", df
    else:
        yield from df.groupby(attribute)


def _ece(conf: np.ndarray, hit: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error, bins (lo, hi] on [0, 1], 0 in the first bin: the textbook loop."""
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        inside = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if inside.any():
            total += abs(np.sum(hit[inside] - conf[inside]))
    return total / len(conf)


# ---- the base view ---------------------------------------------------------------------------------------------


def test_age_group_uses_the_one_boundary(con):
    rows = con.sql("SELECT DISTINCT age, age_group FROM predictions_base WHERE age IN (59, 60, 61)").fetchall()
    assert AGE_OLD_FROM == 60
    assert dict(rows) == {59: "young", 60: "old", 61: "old"}
    cells = con.sql("SELECT DISTINCT age_group_sex FROM predictions_base ORDER BY 1").fetchall()
    assert [c[0] for c in cells] == ["old_F", "old_M", "young_F", "young_M"]


def test_groups_and_sizes(con, frame):
    summary = _summary(con, "run-a")
    df = frame[frame.run_id == "run-a"]
    for attribute in ["all", *ATTRIBUTES]:
        for group, part in _groups(df, attribute):
            assert summary[(attribute, group, "accuracy")][1] == len(part)
    # a gap carries the smallest compared group's size
    assert summary[("sex", "gap", "f1_gap")][1] == df.groupby("sex").size().min()


# ---- utility against scikit-learn and fairlearn ----------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["run-a", "run-b"])
def test_utility_matches_sklearn(con, frame, run_id):
    summary = _summary(con, run_id)
    df = frame[frame.run_id == run_id]
    labels = list(range(K))
    for attribute in ["all", *ATTRIBUTES]:
        for group, part in _groups(df, attribute):
            y, yp = part.y_true.to_numpy(), part.y_pred.to_numpy()
            P = np.stack(part.P.to_numpy())
            assert summary[(attribute, group, "accuracy")][0] == pytest.approx(accuracy_score(y, yp), abs=TOL)
            per_class = f1_score(y, yp, labels=labels, average=None, zero_division=0)
            for c, name in enumerate(NIH_CLASSES):
                assert summary[(attribute, group, f"f1[{name}]")][0] == pytest.approx(per_class[c], abs=TOL)
                auc = roc_auc_score(y == c, P[:, c])
                assert summary[(attribute, group, f"auc[{name}]")][0] == pytest.approx(auc, abs=TOL)
            macro = f1_score(y, yp, labels=labels, average="macro", zero_division=0)
            assert summary[(attribute, group, "macro_f1")][0] == pytest.approx(macro, abs=TOL)
            assert summary[(attribute, group, "var_f1")][0] == pytest.approx(np.var(per_class, ddof=1), abs=TOL)
            macro_auc = np.mean([roc_auc_score(y == c, P[:, c]) for c in labels])
            assert summary[(attribute, group, "macro_auc")][0] == pytest.approx(macro_auc, abs=TOL)


def test_auc_handles_ties_like_sklearn(con, frame):
    df = frame[frame.run_id == "run-b"]
    P = np.stack(df.P.to_numpy())
    assert len(np.unique(P[:, 0])) < len(P) / 4  # the fixture really has ties
    summary = _summary(con, "run-b")
    for c, name in enumerate(NIH_CLASSES):
        assert summary[("all", "all", f"auc[{name}]")][0] == pytest.approx(
            roc_auc_score(df.y_true == c, P[:, c]), abs=TOL
        )


def test_group_metrics_match_fairlearn_metricframe(con, frame):
    from fairlearn.metrics import MetricFrame, count

    df = frame[frame.run_id == "run-a"]
    summary = _summary(con, "run-a")
    metrics = {"accuracy": accuracy_score, "n": count}
    for c, name in enumerate(NIH_CLASSES):
        metrics[f"f1[{name}]"] = partial(f1_score, labels=[c], average="macro", zero_division=0)
    for attribute in ATTRIBUTES:
        mf = MetricFrame(metrics=metrics, y_true=df.y_true, y_pred=df.y_pred, sensitive_features=df[attribute])
        for group, row in mf.by_group.iterrows():
            assert summary[(attribute, group, "accuracy")][1] == row["n"]
            for metric in metrics:
                if metric != "n":
                    assert summary[(attribute, group, metric)][0] == pytest.approx(row[metric], abs=TOL)
        gaps = mf.difference(method="between_groups")
        assert summary[(attribute, "gap", "accuracy_gap")][0] == pytest.approx(gaps["accuracy"], abs=TOL)
        for name in NIH_CLASSES:
            assert summary[(attribute, "gap", f"f1_gap[{name}]")][0] == pytest.approx(gaps[f"f1[{name}]"], abs=TOL)


def test_equalized_odds_matches_fairlearn(con, frame):
    from fairlearn.metrics import MetricFrame, equalized_odds_difference, false_positive_rate, true_positive_rate

    df = frame[frame.run_id == "run-a"]
    summary = _summary(con, "run-a")
    for attribute in ATTRIBUTES:
        per_class = []
        for c, name in enumerate(NIH_CLASSES):
            y, yp = (df.y_true == c).to_numpy(), (df.y_pred == c).to_numpy()
            s = df[attribute].to_numpy()
            rates = MetricFrame(
                metrics={"tpr": true_positive_rate, "fpr": false_positive_rate},
                y_true=y.astype(int), y_pred=yp.astype(int), sensitive_features=s,
            ).difference(method="between_groups")
            assert summary[(attribute, "gap", f"tpr_gap[{name}]")][0] == pytest.approx(rates["tpr"], abs=TOL)
            assert summary[(attribute, "gap", f"fpr_gap[{name}]")][0] == pytest.approx(rates["fpr"], abs=TOL)
            # fairlearn's EOD is the larger of the two differences; embedkit's EO_c is their mean
            eod = equalized_odds_difference(y.astype(int), yp.astype(int), sensitive_features=s)
            assert max(rates["tpr"], rates["fpr"]) == pytest.approx(eod, abs=TOL)
            # the mean form, computed directly from counts
            tpr = [np.mean(yp[y & (s == g)]) for g in np.unique(s)]
            fpr = [np.mean(yp[~y & (s == g)]) for g in np.unique(s)]
            eo = ((max(tpr) - min(tpr)) + (max(fpr) - min(fpr))) / 2
            assert summary[(attribute, "gap", f"eqodds[{name}]")][0] == pytest.approx(eo, abs=TOL)
            per_class.append(eo)
        assert summary[(attribute, "gap", "eqodds")][0] == pytest.approx(np.mean(per_class), abs=TOL)
        assert summary[(attribute, "gap", "eqodds_worst")][0] == pytest.approx(np.max(per_class), abs=TOL)


# ---- calibration against numpy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["run-a", "run-b"])
def test_calibration_matches_numpy(con, frame, run_id):
    df = frame[frame.run_id == run_id]
    summary = _summary(con, run_id)
    for attribute in ["all", *ATTRIBUTES]:
        values = {}
        for group, part in _groups(df, attribute):
            P = np.stack(part.P.to_numpy()).astype(np.float64)
            y = part.y_true.to_numpy()
            onehot = np.eye(K)[y]
            conf = P.max(1)
            hit = (part.y_pred.to_numpy() == y).astype(float)
            ece = _ece(conf, hit)
            assert summary[(attribute, group, "ece")][0] == pytest.approx(ece, abs=TOL)
            classwise = [_ece(P[:, c], onehot[:, c]) for c in range(K)]
            for c, name in enumerate(NIH_CLASSES):
                assert summary[(attribute, group, f"classwise_ece[{name}]")][0] == pytest.approx(classwise[c], abs=TOL)
            assert summary[(attribute, group, "classwise_ece")][0] == pytest.approx(np.mean(classwise), abs=TOL)
            l1 = np.mean([np.mean(np.abs(P[:, c] - onehot[:, c])) for c in range(K)])
            assert summary[(attribute, group, "l1_calibration")][0] == pytest.approx(l1, abs=TOL)
            values[group] = (ece, l1)
        if attribute != "all":
            eces, l1s = zip(*values.values())
            assert summary[(attribute, "gap", "ece_gap")][0] == pytest.approx(max(eces) - min(eces), abs=TOL)
            assert summary[(attribute, "gap", "l1_calibration_gap")][0] == pytest.approx(max(l1s) - min(l1s), abs=TOL)


# ---- the paper's variants ---------------------------------------------------------------------------------------


def test_paper_variants_match_their_formulas(con, frame):
    df = frame[frame.run_id == "run-a"]
    summary = _summary(con, "run-a")

    def cell_f1(age: str, sex: str) -> float:
        part = df[(df.age_group == age) & (df.sex == sex)]
        return f1_score(part.y_true, part.y_pred, labels=list(range(K)), average="macro", zero_division=1)

    f1 = {(a, s): cell_f1(a, s) for a in ("young", "old") for s in ("M", "F")}
    age_delta = (f1["old", "M"] + f1["old", "F"]) / 2 - (f1["young", "M"] + f1["young", "F"]) / 2
    sex_delta = ((f1["young", "M"] - f1["young", "F"]) + (f1["old", "M"] - f1["old", "F"])) / 2
    assert summary[("age_group", "old-young", "f1_delta_paper")][0] == pytest.approx(age_delta, abs=TOL)
    assert summary[("sex", "M-F", "f1_delta_paper")][0] == pytest.approx(sex_delta, abs=TOL)

    y, yp, sex = df.y_true.to_numpy(), df.y_pred.to_numpy(), df.sex.to_numpy()
    terms = []
    for c in range(K):
        tpr = {g: np.mean(yp[(y == c) & (sex == g)] == c) for g in ("F", "M")}
        fpr = {g: np.mean(yp[(y != c) & (sex == g)] == c) for g in ("F", "M")}
        terms.append((abs(tpr["F"] - tpr["M"]) + abs(fpr["F"] - fpr["M"])) / 2)
    assert summary[("sex", "F|M", "eqodds_paper")][0] == pytest.approx(np.mean(terms), abs=TOL)
    assert ("age_group_sex", "F|M", "eqodds_paper") not in summary  # four groups: no two-group variant


# ---- weights: the same SQL computes a weighted replicate --------------------------------------------------------


def test_weighted_rows_match_sklearn_sample_weight(con, frame):
    df = frame[frame.run_id == "run-a"].reset_index(drop=True)
    rng = np.random.default_rng(3)
    mult = rng.integers(0, 4, len(df))
    weights = pa.table(
        {
            "replicate": pa.array([1] * len(df), pa.int32()),
            "attribute": ["sex"] * len(df),
            "split": ["test"] * len(df),
            "row_id": df.row_id,
            "multiplicity": pa.array(mult, pa.int64()),
        }
    )
    try:
        bootstrap._load_weights(con, weights.filter(pa.compute.greater(weights["multiplicity"], 0)))
        rows = con.sql(
            "SELECT group_name, metric, value, n FROM group_metrics "
            "WHERE replicate = 1 AND run_id = 'run-a' AND attribute = 'sex'"
        ).to_arrow_table().to_pylist()
    finally:
        con.execute("DELETE FROM resample_weights")
    got = {(r["group_name"], r["metric"]): (r["value"], r["n"]) for r in rows}
    for group, part in df.groupby("sex"):
        w = mult[part.index]
        y, yp, P = part.y_true.to_numpy(), part.y_pred.to_numpy(), np.stack(part.P.to_numpy())
        assert got[(group, "accuracy")] == (pytest.approx(accuracy_score(y, yp, sample_weight=w), abs=TOL), w.sum())
        per_class = f1_score(y, yp, labels=list(range(K)), average=None, sample_weight=w, zero_division=0)
        for c, name in enumerate(NIH_CLASSES):
            assert got[(group, f"f1[{name}]")][0] == pytest.approx(per_class[c], abs=TOL)
            assert got[(group, f"auc[{name}]")][0] == pytest.approx(
                roc_auc_score(y == c, P[:, c], sample_weight=w), abs=TOL
            )


# ---- the metric catalogue: what the tables show is what the views compute ---------------------------------------


@pytest.fixture(scope="module")
def computed_families(con) -> set[str]:
    """Every family metric_values emits on the toy store (two-group and four-group attributes, AUC included)."""
    table = con.sql("SELECT DISTINCT family FROM metric_values WHERE replicate = 0").to_arrow_table()
    return set(table.column("family").to_pylist())


@pytest.mark.parametrize("family", [m.family for m in catalogue.METRICS])
def test_every_catalogued_family_is_computed_by_the_views(computed_families, family):
    assert family in computed_families


@pytest.mark.parametrize("family", sorted(catalogue.UNLISTED))
def test_every_unlisted_family_is_computed_by_the_views(computed_families, family):
    assert family in computed_families  # a stale name here would hide a family that is gone


def test_every_family_the_views_compute_is_catalogued_or_deliberately_unlisted(computed_families):
    listed = {m.family for m in catalogue.METRICS}
    assert {f for f in computed_families if not catalogue.accounted_for(f)} == set()
    assert {"var_f1_gap", "auc_gap", "f1_zd1_gap", "ece_diff"} <= computed_families  # derived: accounted for
    assert not catalogue.accounted_for("made_up") and not catalogue.accounted_for("made_up_gap")  # it can fail
    assert listed & catalogue.UNLISTED == set()
    assert len(listed) == len(catalogue.METRICS)  # one line per family
    for m in catalogue.METRICS:  # a group-level family's gap column names a catalogued gap
        assert m.gap is None or (m.level == "group" and catalogue.BY_FAMILY[m.gap].level == "gap")


# ---- bootstrap ---------------------------------------------------------------------------------------------------


def test_draw_weights_resamples_patients_within_groups():
    members = pa.table(
        {
            "attribute": ["sex"] * 6 + ["all"] * 6,
            "split": ["test"] * 12,
            "group_name": ["F", "F", "F", "M", "M", "M"] + ["all"] * 6,
            "row_id": [f"r{i}" for i in range(6)] * 2,
            "unit_id": ["a", "a", "b", "c", "d", "e"] * 2,  # patient a has two images
        }
    )
    draws = bootstrap.draw_weights(members, 200, seed=1).to_pandas()
    assert draws.replicate.min() == 1 and draws.replicate.max() == 200
    merged = draws.merge(members.to_pandas(), on=["attribute", "split", "row_id"])
    # both images of patient a always carry the same multiplicity
    a = merged[merged.unit_id == "a"].groupby(["replicate", "attribute"]).multiplicity.nunique()
    assert (a == 1).all()
    # every replicate draws as many patients as each group holds: F 2 (a, b), M 3, all 5
    per_unit = merged.drop_duplicates(["replicate", "attribute", "group_name", "unit_id"])
    sizes = per_unit.groupby(["replicate", "attribute", "group_name"]).multiplicity.sum()
    assert set(sizes.xs("F", level="group_name")) == {2}
    assert set(sizes.xs("M", level="group_name")) == {3}
    assert set(sizes.xs("all", level="group_name")) == {5}
    # a stratum's draws depend on the seed and its name only
    again = bootstrap.draw_weights(members.filter(pa.compute.equal(members["attribute"], "sex")), 200, seed=1)
    assert again.equals(bootstrap.draw_weights(members, 200, seed=1).filter(
        pa.compute.equal(pa.compute.field("attribute"), "sex")))


def test_bootstrap_is_deterministic_and_brackets_estimates(con):
    first = bootstrap.bootstrap_intervals(con, ["run-a"], "test", n_resamples=120, seed=5)
    second = bootstrap.bootstrap_intervals(con, ["run-a"], "test", n_resamples=120, seed=5)
    other = bootstrap.bootstrap_intervals(con, ["run-a"], "test", n_resamples=120, seed=6)
    # same seed, same draws; the intervals agree up to the order in which parallel sums add floating-point numbers
    assert first.select(["run_id", "attribute", "group_or_gap", "metric", "n_replicates"]).equals(
        second.select(["run_id", "attribute", "group_or_gap", "metric", "n_replicates"]))
    for column in ("value", "ci_low", "ci_high"):
        a = np.array(first.column(column).to_pylist(), dtype=float)
        b = np.array(second.column(column).to_pylist(), dtype=float)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
        c = np.array(other.column(column).to_pylist(), dtype=float)
        if column != "value":
            assert np.nanmax(np.abs(a - c)) > 1e-3  # another seed, other draws
    rows = first.to_pylist()
    point = _summary(con, "run-a")
    assert {(r["attribute"], r["group_or_gap"], r["metric"]) for r in rows} == set(point)
    for r in rows:
        expected = point[(r["attribute"], r["group_or_gap"], r["metric"])]
        assert r["n"] == expected[1]
        assert (r["value"] is None and expected[0] is None) or r["value"] == pytest.approx(expected[0], abs=TOL)
    assert con.sql("SELECT count(*) FROM resample_weights").fetchall() == [(0,)]  # cleaned up
    # a group's metric, or a signed gap, lies inside its percentile interval; an absolute max - min gap need not:
    # resampling inflates |difference| (its bootstrap distribution sits above the estimate), a known bias.
    checked = 0
    for r in rows:
        if r["value"] is None or (r["group_or_gap"] == "gap" and not r["metric"].startswith("f1_delta")):
            continue
        if r["family"] in ("accuracy", "macro_f1", "f1", "ece", "l1_calibration", "auc", "f1_delta_paper"):
            assert r["n_replicates"] == 120
            assert r["ci_low"] - TOL <= r["value"] <= r["ci_high"] + TOL, r
            checked += 1
    assert checked > 100
    gaps = [r for r in rows if r["metric"] == "f1_gap"]
    assert gaps and all(0 <= r["ci_low"] <= r["ci_high"] for r in gaps)


def test_bootstrap_intervals_pair_runs_and_skip_class_scores(con):
    both = bootstrap.bootstrap_intervals(con, ["run-a", "run-b"], "test", n_resamples=50, seed=2, class_scores=False)
    alone = bootstrap.bootstrap_intervals(con, ["run-a"], "test", n_resamples=50, seed=2, class_scores=False)
    # the draws depend on the patients, not on which runs are compared: run-a's intervals are the same
    a = both.filter(pa.compute.equal(both["run_id"], "run-a"))
    assert a.column("metric").equals(alone.column("metric"))
    for column in ("ci_low", "ci_high"):
        np.testing.assert_allclose(np.array(a.column(column).to_pylist(), dtype=float),
                                   np.array(alone.column(column).to_pylist(), dtype=float), rtol=0, atol=1e-12)
    aucs = [r for r in alone.to_pylist() if r["family"] == "auc"]
    assert aucs and all(r["ci_low"] is None for r in aucs)  # skipped, not wrong


# ---- errors -------------------------------------------------------------------------------------------------------


def test_store_without_predictions_says_so(tmp_path):
    with pytest.raises(db.FairnessError, match="no predictions yet"):
        db.connect(Store(tmp_path / "empty"))


def test_unknown_attribute_names_the_columns(store):
    with pytest.raises(db.FairnessError, match="unknown attribute 'ethnicity'.*Available: .*sex"):
        db.connect(store, ["sex", "ethnicity"])


def test_other_image_columns_are_attributes(store):
    con = db.connect(store, ["cohort"])
    rows = con.sql("SELECT group_or_gap, n FROM fairness_summary WHERE attribute = 'cohort' AND metric = 'accuracy' "
                   "AND run_id = 'run-a' AND split = 'test'").fetchall()
    assert rows == [("toy", 360)]


def test_boolean_and_few_valued_number_columns_are_attributes_and_continuous_ones_are_refused(store, frame):
    con = db.connect(store, ["correct", "y_true", "split"])  # columns group_rows also carries, of other types
    rows = con.sql("SELECT attribute, group_or_gap, value, n FROM fairness_summary WHERE metric = 'accuracy' "
                   "AND run_id = 'run-a' AND split = 'test' AND attribute <> 'all'").fetchall()
    test = frame[frame["run_id"] == "run-a"]
    hits = int(test["correct"].sum())
    got = {(a, g): (v, n) for a, g, v, n in rows}
    assert got[("correct", "true")] == (1.0, hits) and got[("correct", "false")] == (0.0, len(test) - hits)
    assert got[("split", "test")] == (pytest.approx(hits / len(test)), len(test))
    assert sum(n for (a, _), (_, n) in got.items() if a == "y_true") == len(test)
    with pytest.raises(db.FairnessError, match=r"^--by age: 'age' is a number with \d+ distinct values.*"
                                                r"slice by age_group \(old from 60\)"):
        db.connect(store, ["sex", "age"])


# ---- CLI -----------------------------------------------------------------------------------------------------------


def _cli(*args: str, input: str | None = None):
    from embedkit.cli import app

    return CliRunner().invoke(app, list(args), input=input)


def test_cli_sql_json_and_csv(store, con):
    query = ("SELECT attribute, metric, value FROM fairness_summary WHERE run_id = 'run-a' AND split = 'test' "
             "AND group_or_gap = 'gap' AND metric IN ('f1_gap', 'eqodds', 'ece_gap') ORDER BY attribute, metric")
    result = _cli("--store", str(store.path), "sql", query, "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    summary = _summary(con, "run-a")
    assert len(rows) == 3 * len(ATTRIBUTES)
    for r in rows:
        assert r["value"] == pytest.approx(summary[(r["attribute"], "gap", r["metric"])][0], abs=TOL)
    csv_out = _cli("--store", str(store.path), "sql", query, "--format", "csv")
    lines = csv_out.output.strip().splitlines()
    assert lines[0] == "attribute,metric,value" and len(lines) == 1 + len(rows)
    assert float(lines[1].split(",")[2]) == pytest.approx(rows[0]["value"], abs=TOL)


def test_cli_sql_reads_statements_from_stdin(store):
    result = _cli("--store", str(store.path), "sql", "--format", "csv",
                  input="SELECT count(*) AS n\nFROM predictions;\n.tables\nSELECT 41 + 1 AS x;\n.quit\nSELECT 0;\n")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:2] == ["n", "840"]
    assert "view   fairness_summary" in result.output and "table  predictions" in result.output
    assert lines[-2:] == ["x", "42"]  # nothing after .quit ran


def test_cli_sql_error_is_one_message(store):
    result = _cli("--store", str(store.path), "sql", "SELECT nope FROM fairness_summary")
    assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output


def test_cli_fairness_json(store, con):
    result = _cli("--store", str(store.path), "fairness", "--model", "toy", "--by", "sex,age_group", "--ci", "40",
                  "--min-n", "200", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [r["run_id"] for r in out["runs"]] == ["run-a", "run-b"]
    rows = {(r["run_id"], r["attribute"], r["group_or_gap"], r["metric"]): r for r in out["rows"]}
    summary = _summary(con, "run-a")
    gap = rows[("run-a", "sex", "gap", "f1_gap")]
    assert gap["value"] == pytest.approx(summary[("sex", "gap", "f1_gap")][0], abs=TOL)
    assert gap["ci_low"] <= gap["ci_high"] and gap["small"] is True  # the smaller sex group has fewer than 200 rows
    assert rows[("run-a", "all", "all", "accuracy")]["small"] is False
    assert {r["attribute"] for r in out["rows"]} == {"all", "sex", "age_group"}


def test_cli_fairness_table_flags_small_groups(store):
    result = _cli("--store", str(store.path), "fairness", "--run", "run-a", "--by", "age_group_sex", "--ci", "0",
                  "--min-n", "95")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "by age_group_sex" in out and "F1 gap" in out and "EqOdds" in out and "max-min gap" in out
    sizes = _summary(db.connect(store, ["age_group_sex"]), "run-a")
    for cell in ("old_F", "old_M", "young_F", "young_M"):
        n = sizes[("age_group_sex", cell, "accuracy")][1]
        assert f"{cell} (n={n}){' ' + SMALL_FLAG if n < 95 else ''}" in out


def test_cli_fairness_tables_say_when_weights_are_random(store, tmp_path):
    assert "random weights" not in _cli("--store", str(store.path), "fairness", "--run", "run-a", "--ci", "0").output
    rng = np.random.default_rng(3)
    images = _images(40, 0, rng)
    s = Store(tmp_path / "store")
    s.upsert("images", pa.Table.from_pandas(images, schema=schemas.IMAGES, preserve_index=False), ["row_id"],
             schemas.IMAGES)
    s.write_run({"run_id": "run-r", "model": "toy", "method": "zeroshot", "weights_id": "random-init:toy:0",
                 "config": {"classes": list(NIH_CLASSES)}}, _predictions(images, "run-r", rng, False))
    result = _cli("--store", str(s.path), "fairness", "--ci", "0", "--by", "sex")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith(
        "note: toy ran with random weights (--random-init), not released weights: their numbers test the pipeline")


def test_cli_fairness_unknown_run(store):
    result = _cli("--store", str(store.path), "fairness", "--run", "nope")
    assert isinstance(result.exception, db.FairnessError) and "run-a" in str(result.exception)


# ---- export -------------------------------------------------------------------------------------------------------


def test_export_round_trip(store, con, tmp_path, monkeypatch):
    out = tmp_path / "export"
    result = _cli("--store", str(store.path), "export", "--parquet", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "tables" / "predictions.parquet").exists() and (out / "views" / "fairness_summary.parquet").exists()
    assert not (out / "views" / "class_scores.parquet").exists()  # row x attribute views stay SQL

    # views.sql in a fresh DuckDB, over the Parquet files only
    monkeypatch.chdir(out)
    fresh = duckdb.connect()
    fresh.execute((out / "views.sql").read_text())
    query = "SELECT * FROM fairness_summary ORDER BY run_id, split, attribute, group_or_gap, metric"
    again = fresh.sql(query).df()
    original = con.sql(query).df()
    pd.testing.assert_frame_equal(again, original, check_exact=False, rtol=0, atol=1e-12)
    # the Parquet copy of a view holds the same rows
    saved = fresh.sql("SELECT * FROM read_parquet('views/fairness_summary.parquet') ORDER BY "
                      "run_id, split, attribute, group_or_gap, metric").df()
    pd.testing.assert_frame_equal(saved, original, check_exact=False, rtol=0, atol=1e-12)


def test_cli_sql_is_read_only_towards_the_store_and_the_host(store, tmp_path):
    """No statement writes a file, attaches a database, loads an extension or reads outside --allow-read."""
    manifest = next((store.path / "runs.lance" / "_versions").iterdir())
    extra = tmp_path / "extra.csv"
    extra.write_text("row_id,score\nx,1\n")
    refused = {
        f"COPY (SELECT 'x') TO '{manifest}'": "COPY",
        f"COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'": "COPY",
        f"EXPORT DATABASE '{tmp_path / 'dump'}'": "EXPORT",
        f"ATTACH '{tmp_path / 'other.db'}'": "ATTACH",
        "INSTALL httpfs": "INSTALL",
        "LOAD httpfs": "INSTALL",
        "SELECT * FROM read_text('/etc/hostname')": "disabled",
        "SELECT * FROM 'https://example.invalid/a.csv'": "disabled",
        f"SELECT * FROM read_csv('{extra}')": "disabled",
        "SET enable_external_access = true": "locked",
    }
    before = manifest.read_bytes()
    for query, reason in refused.items():
        result = _cli("--store", str(store.path), "sql", query)
        assert result.exit_code == 1, query
        assert result.output.startswith("error:") and reason in result.output, (query, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert manifest.read_bytes() == before and not (tmp_path / "out.csv").exists()
    allowed = _cli("--store", str(store.path), "sql", "--allow-read", str(extra), "--format", "csv",
                   f"SELECT score FROM read_csv('{extra}')")
    assert allowed.exit_code == 0 and allowed.output.splitlines() == ["score", "1"], allowed.output
    assert _cli("--store", str(store.path), "sql", "SELECT 'abc'::INTEGER").output.startswith("error: Conversion")


def test_eqodds_and_the_paper_variant_agree_on_a_class_absent_from_one_group():
    """Class 2 never occurs among the women: its TPR is undefined there, so neither variant may average it (the
    paper variant once took the men's TPR twice and counted a zero difference)."""
    rows, preds = [], []
    rng = np.random.default_rng(3)
    for i in range(120):
        sex = "MF"[i % 2]
        y = int(rng.integers(0, 3)) if sex == "M" else int(rng.choice([0, 1]))
        p = rng.dirichlet(np.ones(3))
        rows.append({"row_id": f"r{i}", "cohort": "c", "image_id": f"{i}.png", "label": "ABC"[y], "labels": ["ABC"[y]],
                     "age": 40, "sex": sex, "split": "test", "patient_id": f"p{i}"})
        preds.append({"run_id": "r", "row_id": f"r{i}", "image_id": f"{i}.png", "split": "test", "y_true": y,
                      "y_pred": int(p.argmax()), "probs": p.astype(np.float32).tolist()})
    images = pa.Table.from_pylist([{k: r.get(k) for k in schemas.IMAGES.names} for r in rows], schema=schemas.IMAGES)
    runs = pa.Table.from_pylist([{"run_id": "r", "model": "m", "method": "lp",
                                  "config": json.dumps({"classes": list("ABC")})}], schema=schemas.RUNS)
    con = db.connect_tables({"images": images, "runs": runs,
                             "predictions": pa.Table.from_pylist(preds, schema=schemas.PREDICTIONS)}, ["sex"])
    got = dict(con.sql("SELECT metric, value FROM fairness_summary WHERE attribute = 'sex' AND metric IN "
                       "('eqodds', 'eqodds_paper', 'eqodds_classes', 'eqodds_paper_classes')").fetchall())
    assert got["eqodds_classes"] == got["eqodds_paper_classes"] == 2
    assert got["eqodds"] == pytest.approx(got["eqodds_paper"], abs=1e-12)
    df = pd.DataFrame(preds).merge(pd.DataFrame(rows)[["row_id", "sex"]], on="row_id")
    terms = []
    for c in (0, 1):  # the classes defined in both groups, by hand
        groups = dict(list(df.groupby("sex")))
        rate = {s: ((g["y_pred"] == c) & (g["y_true"] == c)).sum() / (g["y_true"] == c).sum() for s, g in groups.items()}
        fpr = {s: ((g["y_pred"] == c) & (g["y_true"] != c)).sum() / (g["y_true"] != c).sum() for s, g in groups.items()}
        terms.append((abs(rate["M"] - rate["F"]) + abs(fpr["M"] - fpr["F"])) / 2)
    assert got["eqodds"] == pytest.approx(np.mean(terms), abs=1e-12)


def test_bca_interval_equals_scipy_on_the_same_draws(con):
    """The accuracy gap by sex: our BCa bounds are scipy.stats.bootstrap(method='BCa')'s, given our draws.

    scipy resamples each sample (group) on its own, as the stratified patient bootstrap does; its samples here are
    the patients of each group, and its statistic counts their rows (a patient may have several images)."""
    from scipy import stats

    n_resamples, level = 300, 0.95
    rows = bootstrap.bootstrap_intervals(con, ["run-a"], "test", n_resamples=n_resamples, seed=4,
                                         families=["accuracy_gap"], class_scores=False).to_pylist()
    (ours,) = [r for r in rows if r["attribute"] == "sex"]
    with db.scoped(con, ["run-a"], "test", class_scores=False):  # our draws again (same seed: same replicates)
        members = con.sql(bootstrap._MEMBERS_SQL, params={"split": "test", "runs": ["run-a"]}).to_arrow_table()
        bootstrap._load_weights(con, bootstrap.draw_weights(members, n_resamples, 4))
        draws = np.array([v for (v,) in con.sql(
            "SELECT value FROM metric_values WHERE replicate > 0 AND attribute = 'sex' AND metric = 'accuracy_gap' "
            "ORDER BY replicate").fetchall()])
        con.execute("DELETE FROM resample_weights")
    frame = con.sql("SELECT unit_id, sex, correct FROM predictions_base WHERE run_id = 'run-a' AND split = 'test'").df()
    per = frame.groupby(["sex", "unit_id"]).agg(k=("correct", "sum"), n=("correct", "size")).reset_index()
    k = {s: g["k"].to_numpy(float) for s, g in per.groupby("sex")}
    n = {s: g["n"].to_numpy(float) for s, g in per.groupby("sex")}

    def gap(f_idx, m_idx, axis=-1):
        f_idx, m_idx = f_idx.astype(int), m_idx.astype(int)
        acc_f = k["F"][f_idx].sum(axis) / n["F"][f_idx].sum(axis)
        acc_m = k["M"][m_idx].sum(axis) / n["M"][m_idx].sum(axis)
        return np.abs(acc_f - acc_m)

    data = (np.arange(len(k["F"]), dtype=float), np.arange(len(k["M"]), dtype=float))
    assert gap(*data) == pytest.approx(ours["value"], abs=1e-12)
    prior = stats.bootstrap(data, gap, n_resamples=2, rng=0, method="percentile")
    prior.bootstrap_distribution = draws
    ref = stats.bootstrap(data, gap, n_resamples=0, bootstrap_result=prior, method="BCa", confidence_level=level)
    assert ours["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert ours["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=1e-12)
    percentile = np.quantile(draws, [0.025, 0.975])
    assert (ours["pct_low"], ours["pct_high"]) == pytest.approx(tuple(percentile), abs=1e-12)


def test_every_gap_interval_contains_its_estimate_or_says_why_not(con):
    rows = bootstrap.bootstrap_intervals(con, ["run-a", "run-b"], "test", n_resamples=200, seed=0,
                                         class_scores=False).to_pylist()
    gaps = [r for r in rows if r["group_or_gap"] == "gap" and r["value"] is not None and r["ci_low"] is not None]
    assert len(gaps) > 20
    for r in gaps:
        assert r["ci_low"] - TOL <= r["value"] <= r["ci_high"] + TOL or "no" in (r["ci_note"] or ""), r


def test_two_group_attributes_get_the_signed_difference_beside_the_gap(con):
    point = _summary(con, "run-a")
    f, m = point[("sex", "F", "macro_f1")][0], point[("sex", "M", "macro_f1")][0]
    diff = point[("sex", "F-M", "f1_diff")][0]
    assert diff == pytest.approx(f - m, abs=TOL) and abs(diff) == pytest.approx(point[("sex", "gap", "f1_gap")][0])
    acc = point[("sex", "F", "accuracy")][0] - point[("sex", "M", "accuracy")][0]
    assert point[("sex", "F-M", "accuracy_diff")][0] == pytest.approx(acc, abs=TOL)
    assert not any(k[2] == "f1_diff" for k in point if k[0] == "age_group_sex")  # four groups: no signed difference

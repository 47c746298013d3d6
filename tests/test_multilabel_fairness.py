"""Multi-label fairness views: every per-label metric against scikit-learn and fairlearn to 1e-9, underdiagnosis
against a numpy transcription of Seyyed-Kalantari et al.'s definition, a planted under-diagnosis recovered by the
bootstrap, and `embedkit fairness` on a multi-label run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from fairlearn.metrics import MetricFrame, false_negative_rate, false_positive_rate
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.constants import NIH_FINDINGS, NO_FINDING
from embedkit.fairness import bootstrap, db
from embedkit.store import schemas
from embedkit.store.store import Store
from conftest import main_cli

TOL = 1e-9
LABELS = (*NIH_FINDINGS, NO_FINDING)
ATTRIBUTES = ["sex", "age_group", "age_decade", "view", "age_group_sex", "age_decade_sex", "view*sex"]
PLANTED = "Effusion"


def _images(n: int, rng: np.random.Generator, prefix: str = "ml") -> pd.DataFrame:
    """n test rows, two images per patient for the first half; findings drawn per label, No Finding when none."""
    have = rng.random((n, len(NIH_FINDINGS))) < 0.18
    labels = [[f for f, h in zip(NIH_FINDINGS, row) if h] or [NO_FINDING] for row in have]
    ages = rng.integers(3, 96, n)
    ages[:4] = [59, 60, 9, 10]  # the boundaries: 60 is old; 9 is in 0-9, 10 in 10-19
    return pd.DataFrame({
        "row_id": [f"{prefix}/img{i}" for i in range(n)],
        "cohort": prefix,
        "image_id": [f"img{i}" for i in range(n)],
        "path": None,
        "labels": labels,
        "label": None,
        "age": ages.astype("int32"),
        "age_group": None,
        "sex": rng.choice(["M", "F"], n),
        "view": rng.choice(["PA", "AP"], n),
        "patient_id": [f"p{i // 2}" if i < n // 2 else f"p{i}" for i in range(n)],
        "split": "test",
        "extra": "{}",
    })


def _truth(images: pd.DataFrame) -> np.ndarray:
    return np.array([[label in set(row) for label in LABELS] for row in images["labels"]])


def _scores(images: pd.DataFrame, rng: np.random.Generator, planted: float = 0.0, ties: bool = False) -> np.ndarray:
    """[N, L] float32 sigmoid scores that carry the truth; ``planted`` lowers women's diseased PLANTED scores."""
    y = _truth(images).astype(float)
    logits = 1.2 * (2 * y - 1) + rng.normal(size=y.shape)
    k = LABELS.index(PLANTED)
    female = (images["sex"] == "F").to_numpy()
    logits[female & (y[:, k] == 1), k] -= planted
    scores = 1 / (1 + np.exp(-logits))
    if ties:  # coarse scores: exact ties inside every label and group, as a quantised model gives
        scores = np.round(scores * 20) / 20
    return scores.astype(np.float32)


def _write(store: Store, images: pd.DataFrame, run_id: str, scores: np.ndarray, thresholds: list[float]) -> None:
    store.upsert("images", pa.Table.from_pandas(images, schema=schemas.IMAGES, preserve_index=False), ["row_id"],
                 schemas.IMAGES)
    n = len(images)
    predictions = pa.table({
        "run_id": [run_id] * n,
        "row_id": images["row_id"],
        "image_id": images["image_id"],
        "split": images["split"],
        "y_true": pa.nulls(n, pa.int32()),
        "y_pred": pa.nulls(n, pa.int32()),
        "probs": [list(p) for p in scores],
    }, schema=schemas.PREDICTIONS)
    config = {"task": "multilabel", "classes": list(LABELS), "thresholds": thresholds, "threshold_rule": "max_f1"}
    store.write_run({"run_id": run_id, "model": "toy", "method": "logreg", "config": config}, predictions)


def _thresholds(rng: np.random.Generator) -> list[float]:
    return [float(t) for t in np.round(rng.uniform(0.3, 0.7, len(LABELS)), 2)]


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    """A store with two multi-label runs on the same 300 rows (continuous scores; coarse scores with ties)."""
    rng = np.random.default_rng(11)
    images = _images(300, rng)
    store = Store(tmp_path_factory.mktemp("multilabel") / "store")
    runs = {}
    for run_id, ties in (("ml-a", False), ("ml-b", True)):
        scores, thresholds = _scores(images, rng, ties=ties), _thresholds(rng)
        _write(store, images, run_id, scores, thresholds)
        runs[run_id] = (scores, np.array(thresholds))
    return store, images, runs


@pytest.fixture(scope="module")
def con(ml):
    return db.connect(ml[0], ATTRIBUTES)


def _reference_groups(images: pd.DataFrame, attribute: str) -> pd.Series:
    """The attribute as the views should compute it, written from the definitions (not read from the views)."""
    age = images["age"].to_numpy()
    decade = pd.Series([f"{a // 10 * 10}-{a // 10 * 10 + 9}" for a in age])
    group = pd.Series(np.where(age >= 60, "old", "young"))
    return {"sex": images["sex"], "view": images["view"], "age_decade": decade, "age_group": group,
            "age_group_sex": group + "_" + images["sex"], "age_decade_sex": decade + "_" + images["sex"],
            "view*sex": images["view"] + "_" + images["sex"],  # any cell: its crossed values joined by '_'
            "all": pd.Series(["all"] * len(images))}[attribute].reset_index(drop=True)


def _summary(con, run_id: str) -> dict:
    rows = con.sql("SELECT attribute, group_or_gap, metric, value, n FROM multilabel_summary WHERE run_id = $r",
                   params={"r": run_id}).to_arrow_table().to_pylist()
    return {(r["attribute"], r["group_or_gap"], r["metric"]): (r["value"], r["n"]) for r in rows}


def _ece(score: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """The label's ECE, bins (lo, hi] on [0, 1] with 0 in the first: the textbook loop."""
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for b in range(bins):
        inside = (score > edges[b]) & (score <= edges[b + 1]) if b else (score <= edges[1])
        total += abs(np.sum(y[inside] - score[inside]))
    return total / len(score)


def _close(got, want) -> None:
    if want is None or (isinstance(want, float) and np.isnan(want)):
        assert got is None, (got, want)
    else:
        assert got is not None and abs(got - want) <= TOL, (got, want)


@pytest.mark.parametrize("run_id", ["ml-a", "ml-b"])
@pytest.mark.parametrize("attribute", ["all", *ATTRIBUTES])
def test_per_label_metrics_match_sklearn(ml, con, run_id, attribute) -> None:
    _, images, runs = ml
    scores, thresholds = runs[run_id]
    truth = _truth(images)
    groups = _reference_groups(images, attribute)
    got = _summary(con, run_id)
    seen = 0
    for group in sorted(groups.unique()):
        rows = (groups == group).to_numpy()
        for k, label in enumerate(LABELS):
            y, s = truth[rows, k], scores[rows, k].astype(np.float64)
            pred = s >= thresholds[k]
            tn, fp, fn, tp = confusion_matrix(y, pred, labels=[False, True]).ravel()
            key = lambda family: got.get((attribute, group, f"{family}[{label}]"), (None, None))  # noqa: E731
            assert key("positives") == (tp + fn, rows.sum())
            _close(key("auc")[0], roc_auc_score(y, s) if 0 < y.sum() < len(y) else None)
            _close(key("tpr")[0], recall_score(y, pred, zero_division=np.nan) if y.any() else None)
            _close(key("fnr")[0], fn / (tp + fn) if y.any() else None)
            _close(key("fpr")[0], fp / (fp + tn) if (~y).any() else None)
            _close(key("precision")[0], precision_score(y, pred, zero_division=np.nan) if pred.any() else None)
            _close(key("f1")[0], f1_score(y, pred, zero_division=0))
            _close(key("ece")[0], _ece(s, y.astype(float)))
            seen += 1
    assert seen == groups.nunique() * len(LABELS)


def _auc_or_nan(y, s) -> float:
    return roc_auc_score(y, s) if 0 < np.sum(y) < len(y) else np.nan


@pytest.mark.parametrize("attribute", ["sex", "age_decade", "age_group_sex", "view*sex"])
def test_groups_gaps_and_worst_match_fairlearn_metricframe(ml, con, attribute) -> None:
    _, images, runs = ml
    scores, thresholds = runs["ml-a"]
    truth = _truth(images)
    groups = _reference_groups(images, attribute)
    got = _summary(con, "ml-a")
    worst_is_min = {"auc": True, "tpr": True, "precision": True, "f1": True, "fpr": False, "fnr": False}
    for k, label in enumerate(LABELS):
        y, s = truth[:, k], scores[:, k].astype(np.float64)
        frame = MetricFrame(
            metrics={"tpr": recall_score, "fpr": false_positive_rate, "fnr": false_negative_rate,
                     "precision": lambda a, b: precision_score(a, b, zero_division=np.nan),
                     "f1": lambda a, b: f1_score(a, b, zero_division=0)},
            y_true=y, y_pred=s >= thresholds[k], sensitive_features=groups)
        scored = MetricFrame(metrics={"auc": _auc_or_nan}, y_true=y, y_pred=s, sensitive_features=groups)
        by_group = pd.concat([frame.by_group, scored.by_group], axis=1)
        for family in worst_is_min:
            values = by_group[family].astype(float)
            for group, value in values.items():
                _close(got.get((attribute, group, f"{family}[{label}]"), (None,))[0], value)
            defined = values.dropna()
            gap = got.get((attribute, "gap", f"{family}_gap[{label}]"), (None,))[0]
            worst = got.get((attribute, "worst", f"{family}_worst[{label}]"), (None,))[0]
            if len(defined) < 2:
                assert gap is None and worst is None
                continue
            _close(gap, float(defined.max() - defined.min()))  # MetricFrame.difference() over defined groups
            _close(worst, float(defined.min() if worst_is_min[family] else defined.max()))
            if family != "auc":
                _close(gap, float(frame.difference()[family]))


def _underdiagnosis_numpy(images: pd.DataFrame, scores: np.ndarray, thresholds: np.ndarray, groups: pd.Series):
    """Seyyed-Kalantari et al.: among patients with a disease (a label other than No Finding), the share whose
    No Finding score reaches its threshold (predicted No Finding), per group."""
    k = LABELS.index(NO_FINDING)
    diseased = np.array([any(label != NO_FINDING for label in row) for row in images["labels"]])
    said_healthy = scores[:, k].astype(np.float64) >= thresholds[k]
    out = {}
    for group in groups.unique():
        rows = (groups == group).to_numpy() & diseased
        out[group] = (float(said_healthy[rows].mean()) if rows.any() else None, int(rows.sum()))
    return out


@pytest.mark.parametrize("attribute", ["all", *ATTRIBUTES])
def test_underdiagnosis_matches_its_definition(ml, con, attribute) -> None:
    _, images, runs = ml
    for run_id, (scores, thresholds) in runs.items():
        want = _underdiagnosis_numpy(images, scores, thresholds, _reference_groups(images, attribute))
        got = _summary(con, run_id)
        for group, (value, n) in want.items():
            assert got[(attribute, group, "underdiagnosis")][1] == n
            _close(got[(attribute, group, "underdiagnosis")][0], value)
            # NIH's labels: No Finding exactly when nothing else, so underdiagnosis is No Finding's FPR
            _close(got[(attribute, group, f"fpr[{NO_FINDING}]")][0], value)
        if attribute != "all":
            values = [v for v, _ in want.values() if v is not None]
            _close(got[(attribute, "gap", "underdiagnosis_gap")][0], max(values) - min(values))
            _close(got[(attribute, "worst", "underdiagnosis_worst")][0], max(values))
        if attribute == "sex":
            _close(got[("sex", "F-M", "underdiagnosis_diff")][0], want["F"][0] - want["M"][0])


def test_multiclass_views_see_no_multilabel_rows(con) -> None:
    assert con.sql("SELECT count(*) FROM group_rows").fetchall()[0][0] == 0
    n = con.sql("SELECT count(*) FROM label_predictions WHERE run_id = 'ml-a'").fetchall()[0][0]
    assert n == 300 * len(LABELS)


def _planted_store(tmp_path, planted: float, seed: int) -> Store:
    rng = np.random.default_rng(seed)
    images = _images(600, rng, prefix="pl")
    store = Store(tmp_path / f"planted-{planted}")
    _write(store, images, "run", _scores(images, rng, planted=planted), [0.5] * len(LABELS))
    return store


def _sex_diffs(store: Store) -> dict:
    con = db.connect(store, ["sex"])
    table = bootstrap.bootstrap_intervals(con, ["run"], "test", n_resamples=200, seed=1, suite="multilabel",
                                          families=["fnr_diff", "tpr_diff", "auc_diff"], bca=False, batch=100)
    return {r["metric"]: r for r in table.to_pylist() if r["attribute"] == "sex"}


@pytest.mark.slow
def test_planted_underdiagnosis_of_women_is_recovered_and_absent_without_it(tmp_path) -> None:
    planted = _sex_diffs(_planted_store(tmp_path, planted=2.0, seed=5))
    fnr = planted[f"fnr_diff[{PLANTED}]"]
    assert fnr["group_or_gap"] == "F-M" and fnr["n_replicates"] == 200
    assert fnr["value"] > 0 and fnr["ci_low"] > 0  # women's Effusion is missed more often, beyond the noise
    assert planted[f"tpr_diff[{PLANTED}]"]["ci_high"] < 0 and planted[f"auc_diff[{PLANTED}]"]["ci_high"] < 0
    other = planted["fnr_diff[Mass]"]  # the bias is scoped to one label
    assert other["ci_low"] <= 0 <= other["ci_high"]

    clean = _sex_diffs(_planted_store(tmp_path, planted=0.0, seed=5))
    fnr = clean[f"fnr_diff[{PLANTED}]"]
    assert fnr["ci_low"] <= 0 <= fnr["ci_high"]
    assert clean[f"auc_diff[{PLANTED}]"]["ci_low"] <= 0 <= clean[f"auc_diff[{PLANTED}]"]["ci_high"]


def test_bootstrap_replicates_match_a_reweighted_numpy_recomputation(ml, con) -> None:
    """Replicate r of the views is the metric on the rows repeated as the draws say (percentile interval)."""
    _, images, runs = ml
    # in batches of 7 replicates: the same draws and values as in one pass
    table = bootstrap.bootstrap_intervals(con, ["ml-a"], "test", n_resamples=30, seed=3, suite="multilabel",
                                          families=["underdiagnosis", "auc"], bca=False, batch=7)
    rows = {(r["attribute"], r["group_or_gap"], r["metric"]): r for r in table.to_pylist()}
    members = con.sql("SELECT DISTINCT attribute, split, group_name, row_id, unit_id FROM label_group_rows "
                      "WHERE replicate = 0 AND attribute = 'sex'").to_arrow_table()
    draws = bootstrap.draw_weights(members, 30, seed=3).to_pandas()
    scores, thresholds = runs["ml-a"]
    index = {r: i for i, r in enumerate(images["row_id"])}
    k = LABELS.index(NO_FINDING)
    for sex in ("F", "M"):
        values = []
        for _, d in draws.groupby("replicate"):
            i = np.array([index[r] for r in d["row_id"]])
            i = i[(images["sex"].to_numpy()[i] == sex)]
            w = d.set_index("row_id").loc[images["row_id"].to_numpy()[i], "multiplicity"].to_numpy()
            diseased = np.array([images["labels"][j] != [NO_FINDING] for j in i])
            hit = scores[i, k].astype(np.float64) >= thresholds[k]
            values.append(np.sum(w * hit * diseased) / np.sum(w * diseased))
        low, high = np.quantile(values, [0.025, 0.975])
        got = rows[("sex", sex, "underdiagnosis")]
        assert got["n_replicates"] == 30
        assert abs(got["ci_low"] - low) <= TOL and abs(got["ci_high"] - high) <= TOL


@pytest.mark.slow
def test_fairness_cli_prints_the_multilabel_layout(ml, con, tmp_path) -> None:
    store = ml[0]
    runner = CliRunner()
    result = runner.invoke(app, ["--store", str(store.path), "fairness", "--run", "ml-a", "--ci", "10",
                                 "--by", "sex"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "AUC by sex" in out and "underdiagnosis by sex" in out and PLANTED in out and "F-M [CI]" in out
    assert "BCa bootstrap interval over 10 resamples" in " ".join(out.split())  # Rich wraps the notes
    f_value = _summary(con, "ml-a")[("sex", "F", "underdiagnosis")][0]
    assert f"{f_value:.3f} [" in out  # the view's value, with its interval
    result = runner.invoke(app, ["--store", str(store.path), "fairness", "--run", "ml-a", "--ci", "0", "--json",
                                 "--by", "sex,age_decade"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["task"] == "multilabel"
    under = [r for r in payload["rows"] if r["metric"] == "underdiagnosis" and r["attribute"] == "sex"]
    assert sorted(r["group_or_gap"] for r in under) == ["F", "M"]
    decades = {r["group_or_gap"] for r in payload["rows"] if r["attribute"] == "age_decade"}
    assert {"0-9", "10-19", "gap", "worst"} <= decades
    assert {r["label_name"] for r in payload["rows"] if r["family"] == "auc"} == set(LABELS)


def test_fairness_refuses_a_mix_of_multilabel_and_multiclass_runs(monkeypatch, capsys, tmp_path) -> None:
    from embedkit.fairness.multilabel import is_multilabel

    rng = np.random.default_rng(2)
    images = _images(10, rng)
    store = Store(tmp_path / "mixed")
    _write(store, images, "ml", _scores(images, rng), _thresholds(rng))
    predictions = pa.table({"run_id": ["mc"] * 10, "row_id": images["row_id"], "image_id": images["image_id"],
                            "split": images["split"], "y_true": [0] * 10, "y_pred": [0] * 10,
                            "probs": [[1.0, 0.0]] * 10}, schema=schemas.PREDICTIONS)
    store.write_run({"run_id": "mc", "model": "toy", "method": "lp", "config": {"classes": ["a", "b"]}}, predictions)
    with pytest.raises(db.FairnessError, match="mix multi-label"):
        is_multilabel(store, [{"run_id": "ml"}, {"run_id": "mc"}])
    assert is_multilabel(store, [{"run_id": "ml"}]) and not is_multilabel(store, [{"run_id": "mc"}])
    code, out, err = main_cli(monkeypatch, capsys, "--store", str(store.path), "fairness", "--run", "ml", "--run",
                              "mc", "--ci", "0")
    assert code == 1 and out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "mix multi-label (ml) and multi-class runs" in err and "Traceback" not in err


def test_report_has_the_multilabel_section_and_underdiagnosis_figure(ml, tmp_path) -> None:
    from embedkit.report.build import build_report

    html = build_report(ml[0], tmp_path / "report", runs=["ml-a"], ci=0, by=["sex", "age_decade"])
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "underdiagnosis.png").stat().st_size > 1000
    assert "Multi-label: AUC by sex" in markdown and "underdiagnosis by group" in markdown
    con = db.connect(ml[0], ["sex"])
    value = con.sql("SELECT value FROM multilabel_summary WHERE run_id = 'ml-a' AND attribute = 'sex' "
                    "AND group_or_gap = 'F' AND metric = 'underdiagnosis'").fetchall()[0][0]
    assert f"{value:.3f}" in markdown  # the table prints the view's number
    assert "underdiagnosis.png" in markdown and "data:image/png" in html.read_text()

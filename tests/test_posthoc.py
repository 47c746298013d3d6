"""Post-hoc corrections (embedkit/heads/posthoc.py): fitted on val only, new derived runs, fairlearn's own result."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.constants import NIH_CLASSES
from embedkit.heads.posthoc import fit_offsets, run_posthoc
from embedkit.heads.probe import HeadConfig, run_probe
from embedkit.heads.vectors import HeadsError, load_vectors
from embedkit.store import schemas
from embedkit.store.runs import record_run, softmax
from heads_synth import write_vectors

MODEL = "tiny-clip"
pytestmark = pytest.mark.usefixtures("one_thread")


def _relabel(store, fn) -> None:
    """Rewrite the images table's labels: ``fn(frame) -> new label column``."""
    frame = store.read("images").to_pandas()
    frame["label"] = fn(frame)
    frame["labels"] = [[v] for v in frame["label"]]
    store.upsert("images", pa.Table.from_pandas(frame[schemas.IMAGES.names], schema=schemas.IMAGES,
                                                preserve_index=False), ["row_id"], schemas.IMAGES)


def _val_metric(store, run_id: str, metric: str, attribute: str = "sex", split: str = "val") -> float:
    from embedkit.fairness import db

    con = db.connect(store, [attribute])
    with db.scoped(con, [run_id], split, class_scores=False):
        rows = con.sql("SELECT value FROM fairness_summary WHERE attribute = $a AND group_or_gap = 'gap' "
                       "AND metric = $m", params={"a": attribute, "m": metric}).fetchall()
    return float(rows[0][0])


@pytest.fixture
def source(store):
    write_vectors(store, MODEL, 16)
    run = run_probe(store, MODEL, HeadConfig("lp", epochs=3, hidden=8, lr=1e-3), seed=0)
    return store, run


def test_offsets_search_equalises_the_groups_on_the_rows_it_is_given():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 3, n)
    groups = (np.arange(n) % 2).astype(np.int64)
    logp = np.log(np.full((n, 3), 0.1))
    logp[np.arange(n), y] = np.log(0.8)
    logp[groups == 1, 0] += 3.0  # group 1 is pushed towards class 0: its F1 suffers
    offsets = fit_offsets(logp, y, groups, 2, "f1", 1.0)
    assert offsets[0].tolist() == [0.0, 0.0, 0.0]  # group 0 is already right
    assert offsets[1, 1] > 0 and offsets[1, 2] > 0  # undoes the push: classes 1 and 2 lifted for group 1
    pred = (logp + offsets[groups]).argmax(axis=1)
    assert (pred[groups == 1] == y[groups == 1]).mean() == 1.0


def test_thresholds_fit_on_val_only_and_record_lineage(source):
    store, run = source
    fitted = run_posthoc(store, run["run_id"], "thresholds", by="sex")
    config = json.loads(fitted["config"])
    assert fitted["method"] == "lp+thresholds" and config["source_run"] == run["run_id"]
    assert config["posthoc"]["fitted_on"] == "val" and set(config["posthoc"]["offsets"]) == {"F", "M"}
    # scrambling the TEST labels changes nothing fitted; scrambling the VAL labels does
    rng = np.random.default_rng(1)
    _relabel(store, lambda f: np.where(f["split"] == "test", rng.permutation(f["label"].to_numpy()), f["label"]))
    again = json.loads(run_posthoc(store, run["run_id"], "thresholds", by="sex")["config"])
    assert again["posthoc"]["offsets"] == config["posthoc"]["offsets"]
    _relabel(store, lambda f: np.where(f["split"] == "val", rng.permutation(f["label"].to_numpy()), f["label"]))
    scrambled = json.loads(run_posthoc(store, run["run_id"], "thresholds", by="sex")["config"])
    assert scrambled["posthoc"]["offsets"] != config["posthoc"]["offsets"]


def test_temperature_shrinks_the_val_calibration_gap(store):
    write_vectors(store, MODEL, 16)
    vectors = load_vectors(store, MODEL)
    rng = np.random.default_rng(0)
    # a noisy scorer, then overconfident on women only (x4 logits): a calibration gap by sex
    logits = 1.8 * (1.5 * np.eye(6)[vectors.y] + rng.normal(size=(vectors.n, 6)))  # x1.8: about calibrated
    female = (vectors.meta["sex"] == "F").to_numpy()
    distorted = softmax(np.where(female[:, None], logits * 4.0, logits))
    bad = record_run(store, vectors, "lp", {"note": "distorted"}, 0, distorted)
    fixed = run_posthoc(store, bad["run_id"], "temperature", by="sex")
    temps = json.loads(fixed["config"])["posthoc"]["temperature"]
    assert temps["F"] > 3 * temps["M"]  # women's logits were scaled up 4x: theirs are cooled the more
    assert _val_metric(store, fixed["run_id"], "ece_gap") < 0.5 * _val_metric(store, bad["run_id"], "ece_gap")
    # predictions unchanged: temperature keeps the argmax
    assert _val_metric(store, fixed["run_id"], "f1_gap") == pytest.approx(_val_metric(store, bad["run_id"], "f1_gap"))


def test_binary_thresholds_equal_fairlearns_own_threshold_optimizer(store):
    from fairlearn.postprocessing import ThresholdOptimizer

    write_vectors(store, MODEL, 16)
    _relabel(store, lambda f: np.where(f["label"].isin(NIH_CLASSES[:3]), NIH_CLASSES[0], NIH_CLASSES[1]))
    run = run_probe(store, MODEL, HeadConfig("lp", epochs=3, hidden=8, lr=1e-3), seed=0)
    fitted = run_posthoc(store, run["run_id"], "thresholds", by="sex", metric="tpr", seed=3)
    assert json.loads(fitted["config"])["posthoc"]["constraint"] == "true_positive_rate_parity"
    preds = store.read("predictions", f"run_id = '{fitted['run_id']}'").to_pandas().sort_values("row_id")
    src = store.read("predictions", f"run_id = '{run['run_id']}'").to_pandas().sort_values("row_id")
    images = store.read("images").to_pandas().set_index("row_id").loc[src["row_id"]]
    p = np.stack(src["probs"].to_numpy()).astype(np.float64)
    score = np.log(np.clip(p[:, 1], 1e-12, None)) - np.log(np.clip(p[:, 0], 1e-12, None))
    y = (images["label"] == NIH_CLASSES[1]).astype(int).to_numpy()
    val = (images["split"] == "val").to_numpy()

    from sklearn.base import BaseEstimator, ClassifierMixin

    class Scores(ClassifierMixin, BaseEstimator):  # the test's own prefit estimator: the score as decision function
        def fit(self, X, y):
            self.classes_ = np.array([0, 1])
            return self

        def decision_function(self, X):
            return np.asarray(X)[:, 0]

    ref = ThresholdOptimizer(estimator=Scores().fit(score[val, None], y[val]), constraints="true_positive_rate_parity", prefit=True,
                             predict_method="decision_function")
    ref.fit(score[val, None], y[val], sensitive_features=images["sex"].to_numpy()[val])
    expected = ref.predict(score[:, None], sensitive_features=images["sex"].to_numpy(), random_state=3)
    np.testing.assert_array_equal(preds["y_pred"].to_numpy(), expected)
    assert (preds["y_pred"].to_numpy() != p.argmax(axis=1)).any()  # it did move some predictions


def test_posthoc_cli_and_bad_input(source):
    store, run = source
    runner = CliRunner()
    out = runner.invoke(app, ["--store", str(store.path), "posthoc", run["run_id"], "--method", "temperature",
                              "--json"])
    assert out.exit_code == 0, out.output
    made = json.loads(out.output)
    assert made["method"] == "lp+temperature" and made["config"]["source_run"] == run["run_id"]
    for args, match in [(["nope", "--method", "temperature"], "no run 'nope'"),
                        ([run["run_id"], "--method", "magic"], "unknown post-hoc method"),
                        ([run["run_id"], "--method", "thresholds", "--metric", "auc"], "unknown --metric")]:
        with pytest.raises(HeadsError, match=match):
            run_posthoc(store, args[0], args[2], **({"metric": args[4]} if len(args) > 3 else {}))

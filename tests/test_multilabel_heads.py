"""Multi-label heads off the stored vectors: one sigmoid per label (BCE), val-only thresholds, the runs contract,
batched sweeps equal to single trainers, pair-prompt zero-shot, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.constants import MULTICLASS, MULTILABEL, NIH_FINDINGS, NO_FINDING
from embedkit.data.build import import_synthetic_multilabel
from embedkit.data.cohort import cohort_labels, cohort_task
from embedkit.data.synth_multilabel import SIGNAL_SCALE, write_synthetic_vectors
from embedkit.heads import multilabel as ml
from embedkit.heads.probe import HeadConfig, run_probe
from embedkit.heads.sweep import run_sweep
from embedkit.heads.vectors import HeadsError, load_vectors
from embedkit.heads.zeroshot import run_zeroshot
from embedkit.store.store import sql_eq
from heads_synth import write_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
VEC = "synthetic-vectors"
FAST = {"epochs": 8, "hidden": 32, "lr": 3e-3}
# Common findings first, so that a 300-image cohort has positives of several labels in every split.
CYCLE = ["No Finding", "Effusion", "Infiltration|Effusion", "Atelectasis", "No Finding", "Cardiomegaly|Effusion",
         "Mass", "Infiltration", "Atelectasis|Effusion|Infiltration", "Nodule", "Pneumothorax", "No Finding"]


def metadata(n_images: int = 300) -> pd.DataFrame:
    """NIH-shaped metadata: one to three images per patient, a cycle of single, multi-label and No Finding images."""
    rows, patient = [], 1
    for i in range(n_images):
        if i % 3 == 0:
            patient += 1
        rows.append({"Image Index": f"{patient:08d}_{i % 3:03d}.png", "Finding Labels": CYCLE[(i * 7) % len(CYCLE)],
                     "Patient Age": 20 + (i * 13) % 70, "Patient Gender": "MF"[patient % 2],
                     "View Position": "PA" if i % 4 else "AP"})
    return pd.DataFrame(rows)


@pytest.fixture
def ml_store(store, tmp_path):
    """`data synth --cohort nih --limit 300 --vectors 32` on the metadata above: cohort 'nihv'."""
    meta = tmp_path / "meta.csv"
    metadata(360).to_csv(meta, index=False)
    import_synthetic_multilabel(store, meta, None, limit=300, cohort="nihv", vectors=32)
    return store


def _predictions(store, run_id: str) -> pd.DataFrame:
    return store.read("predictions", sql_eq("run_id", run_id)).to_pandas().sort_values("row_id").reset_index(drop=True)


def test_the_task_and_the_label_order_come_from_the_cohort():
    rows = pd.DataFrame({"labels": [["Mass", "Effusion"], ["No Finding"], ["Atelectasis"]]})
    assert cohort_task(rows) == MULTILABEL
    assert cohort_labels(rows) == ("Atelectasis", "Effusion", "Mass", NO_FINDING)  # alphabetical, No Finding last
    assert cohort_task(pd.DataFrame({"labels": [["Mass"], ["Edema"]]})) == MULTICLASS
    full = pd.DataFrame({"labels": [list(NIH_FINDINGS) + [NO_FINDING]]})
    assert cohort_labels(full) == (*NIH_FINDINGS, NO_FINDING)


def test_max_f1_and_fpr_thresholds_are_the_brute_force_ones():
    rng = np.random.default_rng(0)
    truth = rng.random((200, 3)) < [0.3, 0.1, 0.5]
    probs = np.clip(truth * 0.3 + rng.random((200, 3)) * 0.7, 0, 1).astype(np.float32)
    got = ml.choose_thresholds(probs, truth, "max_f1")
    for c in range(3):
        def f1(t):
            call = probs[:, c] >= t
            tp, fp, fn = (call & truth[:, c]).sum(), (call & ~truth[:, c]).sum(), (~call & truth[:, c]).sum()
            return 2 * tp / (2 * tp + fp + fn)
        best = max(f1(t) for t in np.unique(probs[:, c]))
        assert f1(got[c]) == pytest.approx(best) and got[c] in probs[:, c]
    got = ml.choose_thresholds(probs, truth, "fpr@0.1")
    for c in range(3):
        neg = probs[~truth[:, c], c]
        assert (neg >= got[c]).mean() <= 0.1
        lower = probs[:, c][probs[:, c] < got[c]]
        assert len(lower) == 0 or (neg >= lower.max()).mean() > 0.1  # the next lower candidate breaks the target
    assert ml.choose_thresholds(probs[:, :1], np.zeros((200, 1), bool), "max_f1") == [ml.NO_POSITIVES_THRESHOLD]
    with pytest.raises(HeadsError, match="threshold-rule"):
        ml.choose_thresholds(probs, truth, "youden")


def test_label_auc_is_scikit_learns():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    truth = rng.random((150, 4)) < 0.3
    scores = np.round(rng.random((150, 4)) + truth * 0.4, 1)  # rounded: ties count half
    truth[:, 3] = False
    got = ml.label_auc(scores, truth)
    for c in range(3):
        assert got[c] == pytest.approx(roc_auc_score(truth[:, c], scores[:, c]), abs=1e-12)
    assert got[3] is None


@pytest.mark.parametrize("head", ["logreg", "lp", "mlp"])
def test_bce_heads_beat_chance_per_label_and_follow_the_contract(ml_store, head):
    cfg = HeadConfig(head, **({**FAST, "epochs": 30} if head == "mlp" else FAST if head == "lp" else {"wd": 1e-3}))
    run = run_probe(ml_store, VEC, cfg, seed=0)
    config, metrics = json.loads(run["config"]), json.loads(run["metrics"])
    vectors = load_vectors(ml_store, VEC)
    assert vectors.task == MULTILABEL and config["task"] == MULTILABEL
    assert config["classes"] == list(vectors.classes) and config["classes"][-1] == NO_FINDING
    assert len(config["thresholds"]) == len(config["classes"]) and config["threshold_rule"] == "max_f1"
    assert "binary cross-entropy" in config.get("loss", config.get("objective"))
    preds = _predictions(ml_store, run["run_id"])
    assert len(preds) == vectors.n and preds["y_true"].isna().all() and preds["y_pred"].isna().all()
    probs = np.stack(preds["probs"].to_numpy())
    assert probs.shape == (vectors.n, len(vectors.classes)) and ((probs >= 0) & (probs <= 1)).all()
    assert not np.allclose(probs.sum(axis=1), 1)  # one sigmoid per label, not a softmax
    te = vectors.index("test")
    assert config["thresholds"] == ml.choose_thresholds(probs[vectors.index("val")], vectors.Y[vectors.index("val")])
    report = metrics["label_metrics"]["test"]
    # every label with enough test positives and a planted direction is found well above chance
    for c, label in enumerate(vectors.classes):
        positives = int(vectors.Y[te, c].sum())
        if positives >= 8 and label != NO_FINDING:
            assert report["auc"][label] > 0.75, (label, report["auc"][label])
    # the run's figures are the SQL views' (label_metrics): the Mann-Whitney AUC of the stored scores
    assert report["auc"] == pytest.approx(dict(zip(vectors.classes, ml.label_auc(probs[te], vectors.Y[te]))),
                                          abs=1e-12)
    assert report["macro_auc"] > 0.75


def test_thresholds_read_the_val_split_only(ml_store):
    vectors = load_vectors(ml_store, VEC)
    probs = np.random.default_rng(2).random((vectors.n, len(vectors.classes))).astype(np.float32)
    before = ml.multilabel_config(vectors, probs, "max_f1")["thresholds"]
    fpr = ml.multilabel_config(vectors, probs, "fpr@0.1")["thresholds"]
    te = vectors.index("test")
    scrambled = vectors.Y.copy()
    scrambled[te] = np.random.default_rng(3).permutation(scrambled[te])[:, ::-1]  # rows and labels scrambled
    vectors.Y = scrambled
    probs_changed = probs.copy()
    probs_changed[te] = 1 - probs_changed[te]  # and the test scores too
    assert ml.multilabel_config(vectors, probs_changed, "max_f1")["thresholds"] == before
    assert ml.multilabel_config(vectors, probs_changed, "fpr@0.1")["thresholds"] == fpr
    va = vectors.index("val")
    vectors.Y = vectors.Y.copy()
    vectors.Y[va] = 1 - vectors.Y[va]  # the val labels do move them
    assert ml.multilabel_config(vectors, probs, "max_f1")["thresholds"] != before


@pytest.mark.parametrize("head, atol", [("lp", 1e-5), ("mlp", 5e-3), ("logreg", 1e-4)])
def test_batched_multilabel_sweep_equals_each_configuration_trained_alone(ml_store, head, atol):
    grid = {"lr": [1e-3, 3e-3], "wd": [0.0, 1e-4]} if head != "logreg" else {"wd": [1e-3, 1e-2]}
    base = HeadConfig(head, epochs=3, hidden=24, batch_size=64)
    outcome = run_sweep(ml_store, VEC, head, grid, [0, 5], base, select="val_macro_auc", models_per_slice=3)
    assert outcome.task == MULTILABEL and outcome.pick is not None
    for summary in outcome.summary:
        for seed, run_id in zip((0, 5), summary["run_ids"]):
            alone = run_probe(ml_store, VEC, base.with_(**summary["swept"]), seed=seed)
            a = np.stack(_predictions(ml_store, run_id)["probs"].to_numpy())
            b = np.stack(_predictions(ml_store, alone["run_id"])["probs"].to_numpy())
            np.testing.assert_allclose(a, b, atol=atol)
            swept, single = (json.loads(ml_store.read("runs", sql_eq("run_id", r))["config"][0].as_py())
                             for r in (run_id, alone["run_id"]))
            assert swept["task"] == single["task"] == MULTILABEL and swept["classes"] == single["classes"]
            np.testing.assert_allclose(swept["thresholds"], single["thresholds"], atol=5 * atol)
    with pytest.raises(HeadsError, match="multi-class sweeps"):
        run_sweep(ml_store, VEC, head, grid, [0], base, select="fair:f1_gap<=0.1")


def test_multiclass_on_a_multilabel_cohort_is_asked_for_and_unchanged(ml_store):
    vectors = load_vectors(ml_store, VEC, task=MULTICLASS)
    assert vectors.task == MULTICLASS and vectors.Y is None and (vectors.y >= -1).all()
    run = run_probe(ml_store, VEC, HeadConfig("logreg"), task=MULTICLASS)
    assert "task" not in json.loads(run["config"])
    assert _predictions(ml_store, run["run_id"])["y_pred"].notna().all()
    with pytest.raises(HeadsError, match="--task"):
        run_probe(ml_store, VEC, HeadConfig("logreg"), task="multi")


def test_zero_shot_scores_each_label_by_its_prompt_pair(ml_store):
    model = "tiny-clip"
    weights = write_synthetic_vectors(ml_store, "nihv", dim=32, seed=0, model=model)
    vectors = load_vectors(ml_store, model)
    directions = np.random.default_rng(0).normal(size=(len(NIH_FINDINGS), 32))  # the synthesis' own directions
    pairs = {}
    for c, label in enumerate(vectors.classes):
        d = directions[NIH_FINDINGS.index(label)] if label != NO_FINDING else -directions.sum(axis=0)
        pairs[label] = np.stack([d, -d])
    write_prompts(ml_store, model, pairs, "pairs", weights_id=weights)
    run = run_zeroshot(ml_store, model, logit_scale=10.0)
    config, metrics = json.loads(run["config"]), json.loads(run["metrics"])
    assert config["task"] == MULTILABEL and config["prompt_set"] == "pairs"
    assert len(config["thresholds"]) == len(vectors.classes) and config["classes"] == list(vectors.classes)
    probs = np.stack(_predictions(ml_store, run["run_id"])["probs"].to_numpy())

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    P = unit(np.concatenate([pairs[c] for c in vectors.classes]))
    cos = unit(vectors.X.astype(np.float64)) @ P.T
    expected = 1 / (1 + np.exp(-10.0 * (cos[:, 0::2] - cos[:, 1::2])))  # softmax over (positive, negative)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    findings = [c for c, label in enumerate(vectors.classes) if label != NO_FINDING
                and vectors.Y[vectors.index("test"), c].sum() >= 8]
    assert all(metrics["label_metrics"]["test"]["auc"][vectors.classes[c]] > 0.7 for c in findings)
    write_prompts(ml_store, model, {c: pairs[c][:1] for c in vectors.classes}, "single", weights_id=weights)
    with pytest.raises(HeadsError, match="pair per label"):
        run_zeroshot(ml_store, model, prompt_set="single")


def test_the_embed_pass_builds_the_pair_set_for_every_label():
    from embedkit.embed import _prompt_sets_of
    from embedkit.models.registry import get_spec

    rows = pd.DataFrame({"labels": [["Mass", "Effusion"], ["No Finding"], ["Atelectasis"]],
                         "label": [None, NO_FINDING, "Atelectasis"]})
    sets = _prompt_sets_of(get_spec("tiny-medclip-vit"), rows, (NO_FINDING, "Atelectasis"), [])
    assert sets["pairs"]["Mass"] == ["mass", "no mass"] and sets["pairs"]["Effusion"] == ["pleural effusion",
                                                                                          "no pleural effusion"]
    assert list(sets["pairs"]) == ["Atelectasis", "Effusion", "Mass", NO_FINDING]
    assert "chexpert-nih" not in sets  # it has no prompts for No Finding: left out, not refused
    chexzero = _prompt_sets_of(get_spec("tiny-chexzero"), rows, (NO_FINDING, "Atelectasis"), [])
    assert chexzero["chexzero-pairs"]["Mass"] == ["Mass", "no Mass"]


def test_cli_probe_sweep_zeroshot_and_runs_print_per_label_auc(ml_store):
    runner = CliRunner()
    base = ["--store", str(ml_store.path)]
    result = runner.invoke(app, [*base, "probe", "--model", VEC, "--head", "logreg", "--threshold-rule", "fpr@0.1"])
    assert result.exit_code == 0, result.output
    assert "multi-label" in result.output and "test AUC per label: Atelectasis" in result.output
    assert "val macro-AUC" in result.output
    result = runner.invoke(app, [*base, "sweep", "--model", VEC, "--head", "lp", "--grid", "lr=1e-3,3e-3",
                                 "--seeds", "0", "--epochs", "2", "--hidden", "16", "--select", "val_macro_auc",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert "val macro-AUC" in result.output and "pick, test AUC per label: Atelectasis" in result.output
    weights = write_synthetic_vectors(ml_store, "nihv", dim=32, seed=0, model="tiny-clip")
    labels = load_vectors(ml_store, "tiny-clip").classes
    rng = np.random.default_rng(5)
    write_prompts(ml_store, "tiny-clip", {c: rng.normal(size=(2, 32)) for c in labels}, "pairs", weights_id=weights)
    result = runner.invoke(app, [*base, "zeroshot", "--model", "tiny-clip"])
    assert result.exit_code == 0, result.output
    assert "zeroshot tiny-clip on nihv" in result.output and "val AUC per label: Atelectasis" in result.output
    result = runner.invoke(app, [*base, "runs"])
    assert result.exit_code == 0 and "AUC" in result.output
    listing = json.loads(runner.invoke(app, [*base, "runs", "--json"]).output)
    assert {r["config"]["threshold_rule"] for r in listing} == {"fpr@0.1", "max_f1"}
    assert {r["method"] for r in listing} == {"logreg", "lp", "zeroshot"}
    assert all(len(r["metrics"]["label_metrics"]["test"]["auc"]) == len(r["config"]["classes"]) for r in listing)
    bad = runner.invoke(app, [*base, "probe", "--model", VEC, "--head", "logreg", "--threshold-rule", "fpr@2"])
    assert bad.exit_code != 0 and "threshold-rule" in str(bad.exception or bad.output)


def test_multilabel_logreg_is_scikit_learns_binary_regression_per_label():
    from sklearn.linear_model import LogisticRegression

    from embedkit.heads.logreg import fit_logreg

    rng = np.random.default_rng(4)
    X = rng.normal(size=(400, 8)).astype(np.float32)
    Y = (X[:, :3] + rng.normal(size=(400, 3)) > [0.0, 0.8, -0.5]).astype(np.float32)  # three labels
    wd = 1e-2
    fit = fit_logreg(X, Y, 3, [wd, 1e-1], max_iter=500, tol=1e-5)
    assert fit.converged.all()
    probs = ml.sigmoid(fit.logits(X))  # [2 models, 400, 3]
    for m, strength in enumerate((wd, 1e-1)):
        for c in range(3):
            ref = LogisticRegression(C=1 / (strength * len(X)), max_iter=5000, tol=1e-10).fit(X.astype(np.float64),
                                                                                              Y[:, c])
            np.testing.assert_allclose(probs[m, :, c], ref.predict_proba(X)[:, 1], atol=1e-4)


def test_mitigation_is_refused_on_multi_label_heads_and_attribute_probes_run_on_the_cohort(ml_store):
    """--mitigate trains multi-class heads only: one line for probe and sweep on a multi-label cohort, no run
    written; `probe --target sex` is a multi-class head over the same vectors."""
    runner = CliRunner()
    base = ["--store", str(ml_store.path)]
    for command in (["probe", "--model", VEC, "--head", "lp", "--epochs", "2", "--mitigate", "reweight"],
                    ["sweep", "--model", VEC, "--head", "lp", "--epochs", "2", "--seeds", "0",
                     "--mitigate", "groupdro", "--quiet"]):
        result = runner.invoke(app, [*base, *command])
        assert result.exit_code != 0
        assert "is for multi-class heads; this cohort is multi-label" in str(result.exception)
    assert not ml_store.has("runs") or ml_store.read("runs").num_rows == 0
    run = run_probe(ml_store, VEC, HeadConfig("logreg"), target="sex")
    config = json.loads(run["config"])
    assert run["method"] == "logreg@sex" and config["target"] == "sex" and "thresholds" not in config
    assert _predictions(ml_store, run["run_id"])["y_true"].notna().all()

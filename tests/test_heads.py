"""Heads off stored vectors: zero-shot rules, lp / mlp / logreg probes, runs and predictions in the store."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.constants import NIH_CLASSES
from embedkit.heads.probe import HeadConfig, run_probe
from embedkit.heads.vectors import HeadsError, load_vectors
from embedkit.heads.zeroshot import run_zeroshot
from embedkit.store import schemas
from embedkit.store.runs import list_runs
from embedkit.store.store import StoreError, sql_eq
from heads_synth import (COHORT, WEIGHTS, random_prompts, write_prompts, write_vectors, write_weights_row)

FAST = dict(epochs=4, hidden=32, lr=3e-3)  # a few epochs of a narrow head: the suite stays fast


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def clip_store(store):
    """tiny-clip (d=32, scaled_cosine): vectors with a class signal and a set of random prompt vectors."""
    data = write_vectors(store, "tiny-clip", 32)
    write_prompts(store, "tiny-clip", random_prompts(32), "clip")
    return store, data


def _predictions(store, run_id: str) -> dict:
    table = store.read("predictions", sql_eq("run_id", run_id))
    order = np.argsort(np.asarray(table["row_id"].to_pylist()))
    return {"row_id": np.asarray(table["row_id"].to_pylist())[order],
            "split": np.asarray(table["split"].to_pylist())[order],
            "y_true": np.asarray(table["y_true"].to_pylist())[order],
            "y_pred": np.asarray(table["y_pred"].to_pylist())[order],
            "probs": np.asarray(table["probs"].to_pylist(), dtype=np.float32)[order]}


def test_every_head_writes_a_run_and_predictions_for_all_rows(clip_store):
    store, data = clip_store
    runs = [run_zeroshot(store, "tiny-clip"),
            *(run_probe(store, "tiny-clip", HeadConfig(h, **FAST), seed=1) for h in ("lp", "mlp", "logreg"))]
    assert [r["method"] for r in runs] == ["zeroshot", "lp", "mlp", "logreg"]
    expected_true = np.array([NIH_CLASSES.index(lbl) for lbl in data["labels"]])
    for run in runs:
        pred = _predictions(store, run["run_id"])
        assert len(pred["row_id"]) == 1200 and len(set(pred["row_id"])) == 1200
        assert {s: int((pred["split"] == s).sum()) for s in ("train", "val", "test")} == {
            "train": 840, "val": 120, "test": 240}
        np.testing.assert_array_equal(pred["y_true"], expected_true)
        np.testing.assert_allclose(pred["probs"].sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(pred["y_pred"], pred["probs"].argmax(axis=1))
        config, metrics = json.loads(run["config"]), json.loads(run["metrics"])
        assert config["classes"] == list(NIH_CLASSES)
        assert set(metrics) >= {"train", "val", "test"}
        acc = float(np.mean(pred["y_pred"][pred["split"] == "test"] == expected_true[pred["split"] == "test"]))
        assert metrics["test"]["accuracy"] == pytest.approx(acc)
        assert run["weights_id"] == WEIGHTS and run["cohort"] == COHORT
        assert run["code_version"].startswith("0.1.0")
    stored = list_runs(store)
    assert sorted(r["run_id"] for r in stored) == sorted(r["run_id"] for r in runs)
    assert json.loads(runs[1]["config"])["lr"] == FAST["lr"] and runs[1]["seed"] == 1


def test_linear_probe_learns_the_signal_while_random_prompts_stay_near_chance(clip_store):
    store, _ = clip_store
    lp = json.loads(run_probe(store, "tiny-clip", HeadConfig("lp", epochs=15, hidden=64, lr=1e-3), seed=0)["metrics"])
    zs = json.loads(run_zeroshot(store, "tiny-clip")["metrics"])
    assert lp["test"]["accuracy"] > 0.7  # chance is 1/6
    assert zs["test"]["accuracy"] < 0.3
    again = json.loads(run_zeroshot(store, "tiny-clip")["metrics"])
    assert again["test"]["accuracy"] == zs["test"]["accuracy"]


def test_scaled_cosine_uses_the_stored_logit_scale_and_the_mean_of_prompt_logits(store):
    data = write_vectors(store, "tiny-clip", 32)
    aligned = {c: np.stack([data["means"][i] + 0.1 * k for k in range(2)]) for i, c in enumerate(NIH_CLASSES)}
    write_prompts(store, "tiny-clip", aligned, "aligned")
    write_weights_row(store, "tiny-clip", 7.5, "scaled_cosine")
    run = run_zeroshot(store, "tiny-clip", prompt_set="aligned", ensemble="mean")
    config = json.loads(run["config"])
    assert config["logit_scale"] == 7.5 and "weights table" in config["logit_scale_source"]
    X = data["X"] / np.linalg.norm(data["X"], axis=1, keepdims=True)
    scores = np.stack([np.mean(7.5 * X @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T, axis=1)
                       for p in aligned.values()], axis=1)
    expected = np.exp(scores - scores.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(_predictions(store, run["run_id"])["probs"], expected, atol=1e-5)
    assert json.loads(run["metrics"])["test"]["accuracy"] > 0.7  # prompts along the class signal work
    forced = run_zeroshot(store, "tiny-clip", prompt_set="aligned", logit_scale=2.0)
    assert json.loads(forced["config"])["logit_scale"] == 2.0


def test_clip_default_is_open_clips_classifier_the_renormalised_mean_prompt_embedding(store):
    data = write_vectors(store, "tiny-clip", 32)
    prompts = random_prompts(32, per_class=3, seed=4)
    write_prompts(store, "tiny-clip", prompts, "clip")
    write_weights_row(store, "tiny-clip", 20.0, "scaled_cosine")
    run = run_zeroshot(store, "tiny-clip")
    config = json.loads(run["config"])
    assert config["ensemble"] == "embedding" and "mean prompt embedding" in config["class_score"]
    X = data["X"] / np.linalg.norm(data["X"], axis=1, keepdims=True)
    classifier = []
    for p in prompts.values():  # as open_clip builds it: unit templates, averaged, renormalised
        mean = (p / np.linalg.norm(p, axis=1, keepdims=True)).mean(axis=0)
        classifier.append(mean / np.linalg.norm(mean))
    scores = 20.0 * X @ np.stack(classifier).T
    expected = np.exp(scores - scores.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(_predictions(store, run["run_id"])["probs"], expected, atol=1e-5)
    per_prompt = run_zeroshot(store, "tiny-clip", ensemble="mean")  # another rule, other numbers
    assert not np.allclose(_predictions(store, per_prompt["run_id"])["probs"], expected, atol=1e-3)


def test_medclip_rule_clamps_the_scale_as_its_authors_and_supports_max(store):
    data = write_vectors(store, "tiny-medclip-rn50", 32)
    prompts = random_prompts(32, per_class=4, seed=9)
    write_prompts(store, "tiny-medclip-rn50", prompts, "chexpert-nih")
    write_weights_row(store, "tiny-medclip-rn50", 250.0, "medclip")
    run = run_zeroshot(store, "tiny-medclip-rn50", ensemble="max")
    config = json.loads(run["config"])
    assert config["logit_scale"] == pytest.approx(100.00296) and "clamped" in config["logit_scale_source"]
    X = data["X"] / np.linalg.norm(data["X"], axis=1, keepdims=True)
    scores = np.stack([np.max(100 * X @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T, axis=1)
                       for p in prompts.values()], axis=1)
    np.testing.assert_array_equal(_predictions(store, run["run_id"])["y_pred"], scores.argmax(1))


def test_gloria_rule_z_normalises_over_every_stored_row_of_the_cohort(store):
    from embedkit.embed import localsim_table

    data = write_vectors(store, "tiny-gloria", 48)
    prompts = random_prompts(48, per_class=2, seed=3)
    write_prompts(store, "tiny-gloria", prompts, "chexpert-nih")
    local = np.random.default_rng(4).normal(size=(1200, 12)).astype(np.float32)
    store.upsert(localsim_table("tiny-gloria"), pa.table({
        "row_id": [r["row_id"] for r in data["rows"]], "model": ["tiny-gloria"] * 1200, "weights_id": [WEIGHTS] * 1200,
        "prompt_set": ["chexpert-nih"] * 1200, "similarity": [list(map(float, v)) for v in local]}),
        ["row_id", "weights_id", "prompt_set"], schemas.LOCAL_SIMILARITY)
    run = run_zeroshot(store, "tiny-gloria")
    config = json.loads(run["config"])
    assert "all 1200 rows" in config["znorm_set"] and config["ensemble"] == "max"
    X = data["X"] / np.linalg.norm(data["X"], axis=1, keepdims=True)
    P = np.concatenate(list(prompts.values()))
    sim = (X @ (P / np.linalg.norm(P, axis=1, keepdims=True)).T + local) / 2
    scores = np.stack([sim[:, 2 * c:2 * c + 2].max(axis=1) for c in range(6)], axis=1)
    scores = (scores - scores.mean(0)) / scores.std(0)
    expected = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    np.testing.assert_allclose(_predictions(store, run["run_id"])["probs"], expected, atol=1e-5)


def test_same_inputs_and_seed_give_identical_predictions(clip_store):
    store, _ = clip_store
    for head in ("lp", "mlp", "logreg"):
        a, b, c = (run_probe(store, "tiny-clip", HeadConfig(head, **FAST), seed=s) for s in (3, 3, 4))
        pa_, pb, pc = (_predictions(store, r["run_id"])["probs"] for r in (a, b, c))
        np.testing.assert_array_equal(pa_, pb)
        if head != "logreg":  # logreg is convex from a zero start: the seed changes nothing
            assert np.abs(pa_ - pc).max() > 1e-4


def test_vectors_of_several_weights_are_never_mixed(clip_store):
    store, _ = clip_store
    write_vectors(store, "tiny-clip", 32, weights_id="sha256:other", seed=7)
    with pytest.raises(HeadsError, match="--weights-id"):
        load_vectors(store, "tiny-clip")
    other = load_vectors(store, "tiny-clip", weights_id="sha256:other")
    assert other.n == 1200 and other.weights_id == "sha256:other"
    mine = load_vectors(store, "tiny-clip", weights_id=WEIGHTS)
    assert not np.allclose(mine.X, other.X)
    with pytest.raises(HeadsError, match="prompt"):  # no prompts were embedded with the other weights
        run_zeroshot(store, "tiny-clip", weights_id="sha256:other")
    with pytest.raises(HeadsError, match="embed --model tiny-biomedclip"):
        load_vectors(store, "tiny-biomedclip")


def test_a_prompt_set_missing_a_class_is_refused(store):
    write_vectors(store, "tiny-clip", 32)
    prompts = random_prompts(32)
    prompts.pop("Pneumothorax")
    write_prompts(store, "tiny-clip", prompts, "partial")
    with pytest.raises(HeadsError, match="Pneumothorax"):
        run_zeroshot(store, "tiny-clip")


def _logreg_objective(X: np.ndarray, y: np.ndarray, n_classes: int, wd: float):
    """f(theta) = mean CE + wd/2 ||W||^2 (bias unpenalised), in float64: the problem both solvers minimise."""
    import torch

    Xa = torch.from_numpy(np.hstack([X, np.ones((len(X), 1))]).astype(np.float64))
    yt = torch.from_numpy(y)

    def f(theta: torch.Tensor) -> torch.Tensor:
        theta = theta.view(Xa.shape[1], n_classes)
        ce = torch.nn.functional.cross_entropy(Xa @ theta, yt)
        return ce + 0.5 * wd * (theta[:-1] ** 2).sum()

    return f


def test_logreg_solves_the_problem_scikit_learn_solves(clip_store):
    """Both solvers land on the one optimum of the same float64 objective, to within what their stopping rules allow.

    For a point theta with gradient g, strong convexity (smallest curvature mu off the flat direction: adding one
    constant to every class's bias changes nothing) puts the optimum within ||g|| / mu of it. Each solver's stopping
    rule bounds its own ||g||, so the two solutions must lie within the sum of those radii: a tolerance derived from
    the stopping rules, not from one library version. Probabilities then differ by at most 1/2 * max ||x|| times
    the parameter distance (the softmax Jacobian's norm is at most 1/2).
    """
    import torch
    from sklearn.linear_model import LogisticRegression

    from embedkit.heads.logreg import fit_logreg

    store, data = clip_store
    # tol 1e-5: the float32 solver reaches max|g| ~3e-6 on this problem before line searches stall at float32
    # resolution of the loss; asking for less than that floor ends unconverged (and says so in the run)
    wd, tol = 1e-2, 1e-5
    run = run_probe(store, "tiny-clip", HeadConfig("logreg", wd=wd, tol=tol, max_iter=500), seed=0)
    train = np.array([r["split"] == "train" for r in data["rows"]])
    y = np.array([NIH_CLASSES.index(v) for v in data["labels"]])
    X = data["X"].astype(np.float32)
    ours = fit_logreg(X[train], y[train], 6, [wd], max_iter=500, tol=tol)
    assert ours.converged[0]
    # the run stored exactly this fit's probabilities
    logits = ours.logits(X)[0]
    np.testing.assert_allclose(_predictions(store, run["run_id"])["probs"],
                               torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-6)
    ref = LogisticRegression(C=1 / (wd * train.sum()), max_iter=5000, tol=1e-10).fit(X[train].astype(np.float64),
                                                                                    y[train])
    theta_ref = np.vstack([ref.coef_.T, ref.intercept_[None, :]])
    theta_ours = ours.theta[0].double().numpy()
    center = lambda t: np.vstack([t[:-1], t[-1:] - t[-1:].mean()])  # pick one point on the flat direction
    theta_ours, theta_ref = center(theta_ours), center(theta_ref)

    f = _logreg_objective(X[train].astype(np.float64), y[train], 6, wd)
    grad = lambda t: torch.func.grad(f)(torch.from_numpy(t).flatten()).numpy()
    g_ours, g_ref = grad(theta_ours), grad(theta_ref)
    # our stopping rule is max|g| <= tol on a float32 gradient; float32 rounding of that gradient (relative 6e-8
    # over sums of 840 terms of order 1) stays below 1e-6, hence the allowance of one more tol
    assert np.abs(g_ours).max() <= 2 * tol
    # scikit-learn minimises the same objective: its solution's gradient under ours is at its own tol (or ftol)
    assert np.abs(g_ref).max() <= 1e-6
    hess = torch.func.hessian(f)(torch.from_numpy(theta_ref).flatten()).numpy()
    eig = np.linalg.eigvalsh(hess)
    mu = eig[eig > 1e-9 * eig.max()].min()  # the one zero eigenvalue is the flat direction
    radius = (np.linalg.norm(g_ours) + np.linalg.norm(g_ref)) / mu
    distance = np.linalg.norm(theta_ours - theta_ref)
    assert distance <= radius, (distance, radius)
    x_norm = np.linalg.norm(np.hstack([X, np.ones((len(X), 1))]), axis=1).max()
    # + float32 rounding of the stored probabilities
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), ref.predict_proba(X),
                               atol=0.5 * x_norm * radius + 1e-6)


def test_run_summaries_are_the_views_numbers(clip_store):
    """What a head returns and `runs` lists is read from fairness_summary: one definition of every metric."""
    from sklearn.metrics import f1_score

    from embedkit.fairness import db

    store, _ = clip_store
    run = run_probe(store, "tiny-clip", HeadConfig("lp", **FAST), seed=2)
    metrics = json.loads(run["metrics"])
    con = db.connect(store, ["sex"])
    rows = con.sql("SELECT split, metric, value, n FROM fairness_summary WHERE run_id = $r AND attribute = 'all' "
                   "AND metric IN ('accuracy', 'macro_f1')", params={"r": run["run_id"]}).fetchall()
    assert len(rows) == 6
    # two queries of one definition: DuckDB's parallel sums may round the last bit differently between them
    for split, metric, value, n in rows:
        assert metrics[split][metric] == pytest.approx(value, rel=1e-12, abs=1e-15) and metrics[split]["n"] == n
        assert list_runs(store)[0]["metrics"][split][metric] == pytest.approx(value, rel=1e-12, abs=1e-15)
    pred = _predictions(store, run["run_id"])
    test = pred["split"] == "test"
    # macro-F1 averages over all of the run's classes (an absent class scores 0): scikit-learn with labels given
    assert metrics["test"]["macro_f1"] == pytest.approx(
        f1_score(pred["y_true"][test], pred["y_pred"][test], labels=range(6), average="macro", zero_division=0))
    assert "test" not in json.loads(store.read("runs")["metrics"][0].as_py())  # stored: training facts only


def test_cli_lists_filters_and_deletes_runs(clip_store):
    store, _ = clip_store
    runner = CliRunner()
    base = ["--store", str(store.path)]
    out = runner.invoke(app, [*base, "zeroshot", "--model", "tiny-clip", "--json"])
    assert out.exit_code == 0, out.output
    zs_id = json.loads(out.output)["run_id"]
    out = runner.invoke(app, [*base, "probe", "--model", "tiny-clip", "--head", "lp", "--epochs", "2",
                              "--hidden", "16", "--seed", "5"])
    assert out.exit_code == 0, out.output
    lp_id = out.output.split()[1].rstrip(":")
    listing = json.loads(runner.invoke(app, [*base, "runs", "--json"]).output)
    assert {r["run_id"] for r in listing} == {zs_id, lp_id}
    only_lp = json.loads(runner.invoke(app, [*base, "runs", "--method", "lp", "--json"]).output)
    assert [r["run_id"] for r in only_lp] == [lp_id] and only_lp[0]["config"]["hidden"] == 16
    table = runner.invoke(app, [*base, "runs"], env={"COLUMNS": "80"})  # piped, as CliRunner's output is
    assert table.exit_code == 0 and "2 run(s) in" in table.output
    lines = table.output.splitlines()
    assert max(map(len, lines)) <= 80, table.output
    header = next(line for line in lines if line.startswith("run_id"))
    assert header.split() == ["run_id", "method", "model", "cohort", "split", "acc", "F1"]
    row = next(line for line in lines if line.startswith(lp_id)).split()
    assert row[1:5] == ["lp", "tiny-clip*", "synth", "test"]  # * = random weights, said below the table
    assert lines[-2].startswith("* the model ran with random weights (--random-init)")
    lp_run = next(r for r in list_runs(store) if r["run_id"] == lp_id)
    assert row[5:] == [f"{lp_run['metrics']['test'][m]:.3f}" for m in ("accuracy", "macro_f1")]
    out = runner.invoke(app, [*base, "runs", "delete", lp_id])
    assert out.exit_code == 0 and "1200 predictions" in out.output
    out = runner.invoke(app, [*base, "runs", "delete", zs_id])
    assert out.exit_code == 0, out.output
    assert runner.invoke(app, [*base, "runs", "--delete", zs_id]).exit_code == 2  # one delete verb: `runs delete`
    assert list_runs(store) == [] and store.count("predictions") == 0
    bad = runner.invoke(app, [*base, "runs", "delete", "nope"])
    assert bad.exit_code != 0 and isinstance(bad.exception, StoreError)


def test_a_cohort_without_splits_is_scored_zero_shot_and_refused_by_trained_heads(clip_store):
    store, data = clip_store
    images = [{name: r.get(name) for name in schemas.IMAGES.names} | {"labels": [r["label"]], "split": None}
              for r in data["rows"]]  # the same cohort imported from a manifest without a split column
    store.upsert("images", pa.Table.from_pylist(images, schema=schemas.IMAGES), ["row_id"], schemas.IMAGES)
    run = run_zeroshot(store, "tiny-clip")
    pred = _predictions(store, run["run_id"])
    assert len(pred["row_id"]) == 1200 and set(pred["split"]) == {"none"}  # every row scored, recorded as no split
    metrics = json.loads(run["metrics"])
    assert set(metrics) == {"none"} and metrics["none"]["n"] == 1200
    assert metrics["none"]["accuracy"] == pytest.approx(float(np.mean(pred["y_pred"] == pred["y_true"])))
    with pytest.raises(HeadsError, match=r"cohort 'synth' has no split column .* add a split column \(train/val/test\)"):
        run_probe(store, "tiny-clip", HeadConfig("lp", **FAST), seed=1)

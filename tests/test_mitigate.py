"""In-processing mitigation (embedkit/heads/mitigate.py): hand-worked weights, one formula in every trainer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.heads import batched
from embedkit.heads.mitigate import GroupWeighting, Mitigation, cell_weights, group_codes
from embedkit.heads.probe import HeadConfig, fit_head, run_probe, train_reference
from embedkit.heads.sweep import run_sweep
from embedkit.heads.vectors import HeadsError, load_vectors
from heads_synth import write_vectors

MODEL = "tiny-clip"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def vec_store(store):
    write_vectors(store, MODEL, 16)
    return store


@pytest.fixture
def skewed_store(vec_store):
    """The heads vectors with a skewed sex: women are 1 row in 7, plus every class-0 row (cells of unequal size)."""
    import pyarrow as pa

    from embedkit.store import schemas

    frame = vec_store.read("images").to_pandas()
    n = frame["row_id"].str.split("/").str[-1].astype(int)
    frame["sex"] = np.where((n % 7 == 0) | (n % 6 == 0), "F", "M")
    vec_store.upsert("images", pa.Table.from_pandas(frame[schemas.IMAGES.names], schema=schemas.IMAGES,
                                                    preserve_index=False), ["row_id"], schemas.IMAGES)
    return vec_store


def _weighting(name: str, groups, y, **params) -> GroupWeighting:
    text = name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")
    return GroupWeighting(Mitigation.parse(text), np.asarray(groups), np.asarray(y),
                          [str(g) for g in sorted(set(groups))])


def test_parse_fills_defaults_and_refuses_bad_input():
    m = Mitigation.parse("groupdro")
    assert (m.name, m.by, m.param) == ("groupdro", "age_group_sex", {"eta": 0.01})
    assert Mitigation.parse("gap-penalty:lam=2.5", "sex").param == {"lam": 2.5}
    assert Mitigation.parse("reweight", "age_group*sex").by == "age_group_sex"
    for bad, match in [("dro", "unknown --mitigate"), ("groupdro:lam=1", "parameters: eta"),
                       ("groupdro:eta=x", "must be a number"), ("reweight:eta=1", "parameters: none")]:
        with pytest.raises(HeadsError, match=match):
            Mitigation.parse(bad)
    with pytest.raises(HeadsError, match="--mitigate-by"):
        Mitigation.parse("reweight", "view")
    with pytest.raises(HeadsError, match="mini-batch"):
        HeadConfig("logreg", mitigate=Mitigation.parse("groupdro"))


def test_reweight_is_one_over_the_cell_count_with_mean_one():
    # cells (g, y): (0,0) twice, (0,1) once, (1,0) once -> 1/2, 1/2, 1, 1 -> divided by their mean 3/4
    np.testing.assert_allclose(cell_weights(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 0])),
                               [2 / 3, 2 / 3, 4 / 3, 4 / 3])
    w = _weighting("reweight", [0, 0, 0, 1], [0, 0, 1, 0])
    got = w.weights(torch.tensor([[5.0, 7.0]]), torch.tensor([[1, 3]]))  # rows 1 and 3 in a batch of 2
    np.testing.assert_allclose(got.numpy(), [[(2 / 3) / 2, (4 / 3) / 2]], rtol=1e-6)


def test_groupdro_updates_q_online_then_weighs_group_means():
    w = _weighting("groupdro", [0, 0, 1], [0, 0, 0], eta=1.0)
    q = w.new_state(1)
    ce = torch.tensor([[1.0, 2.0, 4.0]])
    got = w.weights(ce, torch.tensor([[0, 1, 2]]), q)
    # loss_0 = 1.5, loss_1 = 4: q ∝ (0.5 e^1.5, 0.5 e^4)
    q1 = math.exp(4) / (math.exp(1.5) + math.exp(4))
    np.testing.assert_allclose(q.numpy(), [[1 - q1, q1]], rtol=1e-12)
    np.testing.assert_allclose(got.numpy(), [[(1 - q1) / 2, (1 - q1) / 2, q1]], rtol=1e-6)
    assert float((got * ce).sum()) == pytest.approx((1 - q1) * 1.5 + q1 * 4, rel=1e-6)
    # a batch without group 1 leaves its q factor alone: q_0 *= e^(1*3), q_1 *= 1
    w.weights(torch.tensor([[3.0]]), torch.tensor([[0]]), q)
    expected = np.array([(1 - q1) * math.exp(3), q1])
    np.testing.assert_allclose(q.numpy()[0], expected / expected.sum(), rtol=1e-12)


def test_gap_penalty_weights_give_the_penalised_loss_and_its_gradient():
    w = _weighting("gap-penalty", [0, 0, 1], [0, 1, 0], lam=0.5)
    ce = torch.tensor([[1.0, 2.0, 4.0]])
    got = w.weights(ce, torch.tensor([[0, 1, 2]]))
    # mean 7/3 + 0.5 * (4 - 1.5): rows of group 0 weigh 1/3 - 0.5/2, the row of group 1 1/3 + 0.5
    np.testing.assert_allclose(got.numpy(), [[1 / 12, 1 / 12, 5 / 6]], rtol=1e-6)
    assert float((got * ce).sum()) == pytest.approx(7 / 3 + 0.5 * 2.5)
    # the same gradient as autograd through the formula itself
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.tensor([0, 1, 2])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    direct = ce.mean() + 0.5 * (ce[2] - ce[:2].mean()).abs()
    (g_direct,) = torch.autograd.grad(direct, logits, retain_graph=True)
    weighted = (w.weights(ce.detach()[None], torch.tensor([[0, 1, 2]]))[0] * ce).sum()
    (g_weighted,) = torch.autograd.grad(weighted, logits)
    if float(ce[2].detach()) >= float(ce[:2].mean().detach()):
        np.testing.assert_allclose(g_weighted.numpy(), g_direct.numpy(), atol=1e-6)
    # one group in the batch: no gap, plain mean
    alone = w.weights(torch.tensor([[1.0, 2.0]]), torch.tensor([[0, 1]]))
    np.testing.assert_allclose(alone.numpy(), [[0.5, 0.5]])


def test_resample_draws_group_balanced_rows_from_the_heads_generator():
    groups, y = np.array([0] * 90 + [1] * 10), np.zeros(100, dtype=np.int64)
    w = _weighting("resample", groups, y)
    order = w.order(100_000 // 100 * 100, torch.Generator().manual_seed(3))
    share = float((torch.from_numpy(groups)[order] == 1).double().mean())
    assert share == pytest.approx(0.5, abs=0.01)
    again = w.order(100_000, torch.Generator().manual_seed(3))
    assert torch.equal(order, again)


def test_group_codes_keep_missing_as_its_own_group():
    codes, names = group_codes(np.array(["old|F", None, "young|M", "old|F"], dtype=object))
    assert names == ["?", "old|F", "young|M"] and codes.tolist() == [1, 0, 2, 1]


@pytest.mark.parametrize("name", ["reweight", "resample", "groupdro:eta=0.5", "gap-penalty:lam=0.5"])
# mlp: BatchNorm's float drift (5e-3 for plain heads, test_sweep.py), a little more where weights follow the losses
@pytest.mark.parametrize("head, atol", [("lp", 1e-5), ("mlp", 1e-2)])
def test_batched_trainer_equals_the_reference_under_each_mitigation(name, head, atol):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 8)).astype(np.float32)
    y = (rng.integers(0, 3, 200)).astype(np.int64)
    groups = rng.integers(0, 3, 150)
    weighting = GroupWeighting(Mitigation.parse(name), groups, y[:150], ["a", "b", "c"])
    cfgs = [HeadConfig(head, lr=3e-3, wd=1e-3, epochs=3, batch_size=32, hidden=16, mitigate=weighting.mitigation)
            for _ in range(2)]
    fit = batched.train_batched(X[:150], y[:150], X[150:], y[150:], X, 3, head, 16, 3, 32, [3e-3, 5e-3],
                                [1e-3, 1e-3], [5, 6], models_per_slice=1, weighting=weighting)
    for k, (lr, seed) in enumerate([(3e-3, 5), (5e-3, 6)]):
        ref = train_reference(X[:150], y[:150], X[150:], y[150:], X, 3, cfgs[k].with_(lr=lr), seed, weighting)
        np.testing.assert_allclose(fit.logits[k], ref.logits, atol=atol)
    plain = train_reference(X[:150], y[:150], X[150:], y[150:], X, 3, cfgs[0].with_(mitigate=None), 5)
    assert not np.allclose(plain.logits, fit.logits[0], atol=1e-4)  # the mitigation changed the training


def test_logreg_reweight_equals_sklearn_with_the_same_sample_weights(skewed_store):
    from sklearn.linear_model import LogisticRegression

    vectors = load_vectors(skewed_store, MODEL)
    wd = 1e-2
    cfg = HeadConfig("logreg", wd=wd, max_iter=500, tol=1e-6, mitigate=Mitigation.parse("reweight", "sex"))
    logits = fit_head(vectors, cfg, 0).logits
    tr = vectors.index("train")
    codes, _ = group_codes(vectors.groups(("sex",))[tr])
    sw = cell_weights(codes, vectors.y[tr])
    assert sw.max() / sw.min() > 3  # unequal cells: the weights matter
    ref = LogisticRegression(C=1 / (wd * len(tr)), max_iter=5000, tol=1e-10).fit(
        vectors.X[tr].astype(np.float64), vectors.y[tr], sample_weight=sw)
    np.testing.assert_allclose(logits, ref.decision_function(vectors.X.astype(np.float64)), atol=2e-3)


def test_logreg_sweep_equals_the_single_fit_under_reweight(skewed_store):
    from embedkit.heads.sweep import expand, train_grid

    vectors = load_vectors(skewed_store, MODEL)
    base = HeadConfig("logreg", mitigate=Mitigation.parse("reweight", "sex"))
    fit = train_grid(vectors, expand(base, {"wd": [1e-3, 1e-2]}), [0])
    for k, wd in enumerate([1e-3, 1e-2]):
        np.testing.assert_allclose(fit.logits[k], fit_head(vectors, base.with_(wd=wd), 0).logits, atol=1e-5)
    plain = train_grid(vectors, expand(base.with_(mitigate=None), {"wd": [1e-3]}), [0])
    assert not np.allclose(plain.logits[0], fit.logits[0], atol=1e-3)


def test_probe_and_sweep_record_the_mitigation(vec_store):
    run = run_probe(vec_store, MODEL, HeadConfig("lp", epochs=2, hidden=8,
                                                 mitigate=Mitigation.parse("groupdro:eta=0.1")), seed=1)
    config, metrics = json.loads(run["config"]), json.loads(run["metrics"])
    assert run["method"] == "lp+groupdro" and run["run_id"].startswith("lp+groupdro-")
    assert config["mitigation"]["name"] == "groupdro" and config["mitigation"]["params"] == {"eta": 0.1}
    assert config["mitigation"]["by"] == "age_group_sex"
    assert sum(metrics["groupdro_q"].values()) == pytest.approx(1, abs=1e-5)
    plain = run_probe(vec_store, MODEL, HeadConfig("lp", epochs=2, hidden=8), seed=1)
    assert plain["method"] == "lp" and "mitigation" not in json.loads(plain["config"])
    outcome = run_sweep(vec_store, MODEL, "lp", {"lr": [1e-3]}, [0],
                        HeadConfig("lp", epochs=2, hidden=8, mitigate=Mitigation.parse("reweight", "sex")))
    assert outcome.method == "lp+reweight" and outcome.to_json()["method"] == "lp+reweight"


def test_cli_mitigate_on_probe_and_sweep(vec_store):
    runner = CliRunner()
    base = ["--store", str(vec_store.path)]
    out = runner.invoke(app, [*base, "probe", "--model", MODEL, "--epochs", "2", "--hidden", "8", "--mitigate",
                              "gap-penalty:lam=0.2", "--mitigate-by", "sex", "--json"])
    assert out.exit_code == 0, out.output
    run = json.loads(out.output)
    assert run["method"] == "lp+gap-penalty" and run["config"]["mitigation"]["by"] == "sex"
    out = runner.invoke(app, [*base, "sweep", "--model", MODEL, "--epochs", "2", "--hidden", "8", "--seeds", "0",
                              "--mitigate", "resample", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["method"] == "lp+resample"
    out = runner.invoke(app, [*base, "probe", "--model", MODEL, "--mitigate", "nope"])
    assert out.exit_code != 0 and "unknown --mitigate 'nope'" in str(out.exception)


# ---- the acceptance demonstration: the demo's planted sex bias, and the same cohort without it ----------------------
ACCEPTANCE_HEAD = HeadConfig("mlp", epochs=30, hidden=256, lr=1e-3)
IN_PROCESSING = ("gap-penalty:lam=2", "groupdro:eta=0.1", "reweight")
POST_HOC = ("thresholds",)


@pytest.mark.slow
def test_on_the_planted_bias_a_mitigation_and_a_correction_shrink_the_sex_gap_and_none_without_it(tmp_path):
    from embedkit.demo import DEMO_BIAS
    from embedkit.heads.whathelps import demo_cohort, mitigation_study, what_helps

    found = {}
    for name, bias in (("biased", DEMO_BIAS), ("unbiased", None)):
        store = demo_cohort(tmp_path / name, bias)
        runs = mitigation_study(store, "tiny-clip", ACCEPTANCE_HEAD, IN_PROCESSING, POST_HOC, by="sex")
        rows = what_helps(store, runs, ["sex"], ci=400)
        found[name] = {r["method"]: r for r in rows if r["metric"] == "f1_gap"}
        utility = {r["method"]: r for r in rows if r["metric"] == "macro_f1"}
        assert set(found[name]) == set(utility) == {f"mlp+{m}" for m in IN_PROCESSING + POST_HOC}
    biased = found["biased"]
    shrunk = {m for m, r in biased.items() if r["significant"] and r["ci_high"] < 0}
    assert shrunk & {f"mlp+{m}" for m in IN_PROCESSING}, biased
    assert shrunk & {f"mlp+{m}" for m in POST_HOC}, biased
    assert next(iter(biased.values()))["baseline"] > 0.1  # the planted gap is there to shrink
    assert not any(r["significant"] for r in found["unbiased"].values()), found["unbiased"]


@pytest.mark.slow
def test_report_shows_what_helps_and_the_attribute_encoding(vec_store, tmp_path):
    from embedkit.heads.posthoc import run_posthoc
    from embedkit.report import build_report
    from embedkit.report.whathelps import baseline_pairs
    from embedkit.store.runs import select_runs

    cfg = HeadConfig("lp", epochs=2, hidden=8)
    base = run_probe(vec_store, MODEL, cfg, seed=1)
    dro = run_probe(vec_store, MODEL, cfg.with_(mitigate=Mitigation.parse("groupdro")), seed=1)
    other_seed = run_probe(vec_store, MODEL, cfg.with_(mitigate=Mitigation.parse("reweight")), seed=2)
    fixed = run_posthoc(vec_store, base["run_id"], "thresholds")
    run_probe(vec_store, MODEL, HeadConfig("logreg"), target="sex")
    pairs = baseline_pairs(select_runs(vec_store).to_pylist())
    assert pairs == {base["run_id"]: [dro["run_id"], fixed["run_id"]]}  # seed 2 has no baseline of its own
    assert other_seed["run_id"] not in pairs
    text = (build_report(vec_store, tmp_path / "report", ci=20).parent / "report.md").read_text()
    assert "What helps: each mitigation against its baseline" in text
    assert "| lp+groupdro |" in text and "| lp+thresholds |" in text
    assert "Attribute encoding" in text and "logreg@sex" not in text.split("Attribute encoding")[1].split("\n")[0]

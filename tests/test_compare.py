"""Paired comparisons (embedkit compare): the SQL differences against a direct numpy paired bootstrap on the same
draws, the Holm correction, and the refusals."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from embedkit.fairness import bootstrap, compare, db
from embedkit.fairness.db import FairnessError
from embedkit.store import schemas
from embedkit.store.store import Store
from tests.test_fairness import ATTRIBUTES, _images, _predictions


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    rng = np.random.default_rng(11)
    images = _images(200, 20, rng)
    s = Store(tmp_path_factory.mktemp("compare") / "store")
    s.upsert("images", pa.Table.from_pandas(images, schema=schemas.IMAGES, preserve_index=False), ["row_id"],
             schemas.IMAGES)
    base = _predictions(images, "run-a", rng, ties=False)
    from embedkit.constants import NIH_CLASSES

    config = {"classes": list(NIH_CLASSES)}
    s.write_run({"run_id": "run-a", "model": "toy", "method": "lp", "config": config}, base)
    # run-b: the same labels, other predictions (a paired comparison is of two heads on one split)
    other = _predictions(images, "run-b", rng, ties=False)
    other = other.set_column(other.schema.get_field_index("y_true"), "y_true", base.column("y_true"))
    s.write_run({"run_id": "run-b", "model": "toy", "method": "lp", "config": config}, other)
    # run-c: fewer test rows
    short = _predictions(images.iloc[5:].reset_index(drop=True), "run-c", rng, ties=False)
    s.write_run({"run_id": "run-c", "model": "toy", "method": "lp", "config": config}, short)
    return s


@pytest.fixture(scope="module")
def con(store):
    return db.connect(store, ATTRIBUTES)


def test_paired_interval_equals_a_numpy_paired_bootstrap_on_the_same_draws(con):
    n_resamples, seed, level = 200, 3, 0.9
    rows = compare.paired_differences(con, [("run-a", "run-b")], "test", n_resamples, seed, level,
                                      families=["accuracy", "accuracy_diff", "accuracy_gap"])
    frame = con.sql("SELECT run_id, row_id, sex, unit_id, correct::DOUBLE AS correct FROM predictions_base "
                    "WHERE split = 'test' ORDER BY row_id").df()
    with db.scoped(con, ["run-a", "run-b"], "test"):
        members = con.sql(bootstrap.MEMBERS_SQL, params={"split": "test", "runs": ["run-a", "run-b"]}).to_arrow_table()
    draws = bootstrap.draw_weights(members, n_resamples, seed).to_pandas()
    a = frame[frame.run_id == "run-a"].set_index("row_id")
    b = frame[frame.run_id == "run-b"].set_index("row_id")

    def accuracy(part: str, run, weights) -> float:
        return float(np.sum(run.correct * weights) / np.sum(weights))

    checked = 0
    for attribute, group, metric in (("all", "all", "accuracy"), ("sex", "F", "accuracy"), ("sex", "M", "accuracy"),
                                     ("sex", "F-M", "accuracy_diff"), ("sex", "gap", "accuracy_gap")):
        diffs = []
        for r in range(1, n_resamples + 1):
            w = draws[(draws.replicate == r) & (draws.attribute == attribute)].set_index("row_id").multiplicity
            w = w.reindex(a.index, fill_value=0).to_numpy(dtype=float)
            values = []
            for run in (a, b):
                by_sex = {s: accuracy(s, run[run.sex == s], w[(run.sex == s).to_numpy()]) for s in ("F", "M")}
                if metric == "accuracy":
                    mask = np.ones(len(run), bool) if group == "all" else (run.sex == group).to_numpy()
                    values.append(accuracy(group, run[mask], w[mask]))
                elif metric == "accuracy_diff":
                    values.append(by_sex["F"] - by_sex["M"])
                else:
                    values.append(abs(by_sex["F"] - by_sex["M"]))
            diffs.append(values[1] - values[0])
        diffs = np.array(diffs)
        (ours,) = [x for x in rows if (x["attribute"], x["group_or_gap"], x["metric"]) == (attribute, group, metric)]
        low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
        assert ours["ci_low"] == pytest.approx(low, abs=1e-12)
        assert ours["ci_high"] == pytest.approx(high, abs=1e-12)
        p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
        assert ours["p_value"] == pytest.approx(p, abs=1e-12)
        assert ours["difference"] == pytest.approx(ours["value_b"] - ours["value_a"], abs=1e-12)
        assert ours["n_replicates"] == n_resamples
        checked += 1
    assert checked == 5
    assert con.sql("SELECT count(*) FROM resample_weights").fetchall() == [(0,)]


def test_a_run_against_itself_is_refused_and_unequal_rows_too(con):
    with pytest.raises(FairnessError, match="itself"):
        compare.paired_differences(con, [("run-a", "run-a")], n_resamples=10)
    with pytest.raises(FairnessError, match="same rows"):
        compare.paired_differences(con, [("run-a", "run-c")], n_resamples=10)


def test_holm_matches_its_definition():
    p = [0.01, 0.04, 0.03, 0.2]
    # sorted 0.01, 0.03, 0.04, 0.2 -> 4*0.01, max(.04, 3*0.03), max(.09, 2*0.04), max(.09, 0.2)
    np.testing.assert_allclose(compare.holm(p), [0.04, 0.09, 0.09, 0.2])
    assert compare.all_pairs(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]


def _cli(store, *args):
    from embedkit.cli import app

    return CliRunner().invoke(app, ["--store", str(store.path), *args])


def test_cli_compare_json_and_table(store):
    import json

    result = _cli(store, "compare", "run-a", "run-b", "--ci", "50", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["pairs"] == [["run-a", "run-b"]] and data["n_resamples"] == 50
    metrics = {(r["attribute"], r["metric"]) for r in data["rows"]}
    assert ("all", "macro_f1") in metrics and ("sex", "f1_gap") in metrics
    table = _cli(store, "compare", "run-a", "run-b", "--ci", "50", "--by", "sex")
    assert table.exit_code == 0, table.output
    assert "f1_gap" in table.output and "B - A" in table.output
    bad = _cli(store, "compare", "run-a", "run-c", "--ci", "20")
    assert isinstance(bad.exception, FairnessError) and "same rows" in str(bad.exception)  # main() prints error:

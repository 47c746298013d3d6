"""The demo's promise: a planted bias shows up as a gap whose interval excludes zero; no bias, no such gap."""

from __future__ import annotations

import pytest

from embedkit.demo import run_demo
from embedkit.fairness import bootstrap, db


def _sex_delta(out, bias):
    result = run_demo(out, models=("tiny-clip",), methods=("mlp",), bias=bias, size=128, ci=200, workers=0)
    assert result.report.is_file()
    con = db.connect(result.store, ["sex", "age_group", "age_group_sex"])
    run_ids = [r["run_id"] for r in db.scored_runs(result.store, split="test")]
    assert len(run_ids) == 1
    rows = bootstrap.bootstrap_intervals(con, run_ids, "test", n_resamples=400, seed=0,
                                         families=["f1_delta_paper"], class_scores=False).to_pylist()
    (delta,) = [r for r in rows if r["attribute"] == "sex"]
    _runs_json_equals_the_views(result.store, con)
    gaps = bootstrap.bootstrap_intervals(con, run_ids, "test", n_resamples=400, seed=0, class_scores=False,
                                         families=["accuracy_gap", "f1_gap", "eqodds", "ece_gap"]).to_pylist()
    # every interval of a gap contains its estimate, or its note says why none can
    assert all(r["ci_low"] - 1e-12 <= r["value"] <= r["ci_high"] + 1e-12 or r["ci_note"] for r in gaps
               if r["value"] is not None and r["ci_low"] is not None)
    return delta


def _runs_json_equals_the_views(store, con):
    """Every number `embedkit runs --json` prints for a run is the fairness_summary view's."""
    import json

    from typer.testing import CliRunner

    from embedkit.cli import app

    out = CliRunner().invoke(app, ["--store", str(store.path), "runs", "--json"])
    assert out.exit_code == 0, out.output
    runs = json.loads(out.output)
    assert runs
    views = {(r, s, m): (v, n) for r, s, m, v, n in con.sql(
        "SELECT run_id, split, metric, value, n FROM fairness_summary WHERE attribute = 'all' "
        "AND metric IN ('accuracy', 'macro_f1')").fetchall()}
    for run in runs:
        for split in ("train", "val", "test"):
            for metric in ("accuracy", "macro_f1"):
                value, n = views[(run["run_id"], split, metric)]
                # two queries of one definition: parallel sums may round the last bit differently
                assert run["metrics"][split][metric] == pytest.approx(value, rel=1e-12, abs=1e-15)
                assert run["metrics"][split]["n"] == n


@pytest.mark.slow
def test_planted_bias_gives_a_gap_excluding_zero_and_none_without_it(tmp_path):
    biased = _sex_delta(tmp_path / "biased", "sex=F:signal=0.3")
    fair = _sex_delta(tmp_path / "fair", None)
    # f1_delta_paper for sex is M minus F (signed, cell-averaged): the weakened F rows score worse.
    assert biased["group_or_gap"] == "M-F"
    assert biased["value"] > 0.1 and biased["ci_low"] > 0
    assert fair["ci_low"] < 0 < fair["ci_high"]


def test_status_lines_fit_80_columns_and_the_pass_reports_progress_as_it_goes(monkeypatch, capsys):
    from embedkit import demo

    clock = iter([0.0, 0.0, 4.0, 11.0, 12.0, 30.0])  # progress made, then each call's time.perf_counter()
    monkeypatch.setattr(demo.time, "perf_counter", lambda: next(clock))
    report = demo._embed_progress("tiny-a-model-name-long-enough-to-need-cutting-" * 2)
    for done in (0, 64, 128, 192, 1200):  # 4 s: too soon for a line; 11 s: one; 12 s: too soon; the last batch
        report(done, 1200)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(len(line) <= demo.STATUS_WIDTH for line in lines), lines
    assert lines[0].startswith("embed     tiny-a-model") and lines[-1].endswith("…")
    demo._say("embed", "tiny-clip: 128/1200 images (10%), 11.6 img/s, 11 s")
    assert capsys.readouterr().out == "embed     tiny-clip: 128/1200 images (10%), 11.6 img/s, 11 s\n"


@pytest.mark.slow
def test_cli_demo_says_every_stage_and_ends_with_the_command_for_its_store(tmp_path, monkeypatch, capsys):
    from conftest import main_cli

    out = tmp_path / "demo"
    code, stdout, stderr = main_cli(monkeypatch, capsys, "demo", "--out", str(out), "--models", "tiny-clip",
                                    "--ci", "0", "--epochs", "1")
    assert code == 0, stderr
    lines = stdout.splitlines()
    stages = [line.split()[0] for line in lines if line[:9].strip() in ("demo", "cohort", "embed", "heads",
                                                                       "fairness", "report")]
    assert stages[0] == "demo" and {"cohort", "embed", "heads", "fairness", "report"} <= set(stages)
    assert any(line.startswith("embed     1 model: 1200/1200 images (100%)") for line in lines)
    assert "embed     tiny-clip: 1200 images embedded, 0 already there" in lines
    status = [line for line in lines if line[:9].strip() in set(stages)]
    assert all(len(line) <= 80 for line in status), status
    assert "note: tiny-clip ran with random weights (--random-init)" in stdout
    assert lines[-1] == f"export EMBEDKIT_STORE={(out / 'store').resolve()}"

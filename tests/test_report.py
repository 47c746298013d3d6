"""The audit report: numbers equal the fairness views', figures are embedded, random weights are labelled, CLI works."""

from __future__ import annotations

import base64
import re
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from embedkit.constants import NIH_CLASSES
from embedkit.store.store import Store

COHORT = "toy"
CI = 20  # resamples: enough to exercise intervals, few enough to stay fast
REAL_WEIGHTS = "0123456789abcdef0123456789abcdef"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (run_id, model, weights_id, method, seed, study, skill): three seeds of one random-weights arm, two single runs
RUNS = [
    ("zs-tiny", "tiny-clip", "random-init:tiny-clip:0", "zeroshot", None, "s1", 0.3),
    ("lp-tiny-0", "tiny-clip", "random-init:tiny-clip:0", "lp", 0, "s1", 1.2),
    ("lp-tiny-1", "tiny-clip", "random-init:tiny-clip:0", "lp", 1, "s1", 1.2),
    ("lp-tiny-2", "tiny-clip", "random-init:tiny-clip:0", "lp", 2, "s1", 1.2),
    ("lp-bio-0", "biomedclip", REAL_WEIGHTS, "lp", 0, None, 2.0),
]


def make_store(path: Path) -> Store:
    """A store with a small cohort (6 classes x age x sex, 5 test patients a cell) and the RUNS above."""
    from embedkit.data.cohort import import_cohort, validate_cohort

    store = Store(path)
    rows = []
    for c, label in enumerate(NIH_CLASSES):
        for age in (40, 70):
            for sex in ("M", "F"):
                for k in range(7):
                    image_id = f"{label[:3]}{age}{sex}{k}.png"
                    rows.append({"image_id": image_id, "label": label, "age": str(age + k), "sex": sex,
                                 "view": "PA", "patient_id": f"p-{image_id}", "split": "test" if k < 5 else "train"})
    validated = validate_cohort(pd.DataFrame(rows), COHORT, verify_images=False, classes=NIH_CLASSES)
    import_cohort(store, validated, COHORT)
    images = store.read("images").to_pandas()
    y = images["label"].map({c: i for i, c in enumerate(NIH_CLASSES)}).to_numpy()
    rng = np.random.default_rng(0)
    for run_id, model, weights_id, method, seed, study, skill in RUNS:
        logits = rng.normal(size=(len(y), len(NIH_CLASSES)))
        logits[np.arange(len(y)), y] += skill * np.where(images["sex"] == "F", 0.5, 1.0)  # a planted sex gap
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        predictions = pa.table({
            "run_id": [run_id] * len(y), "row_id": images["row_id"], "image_id": images["image_id"],
            "split": images["split"], "y_true": y.astype(np.int32), "y_pred": probs.argmax(axis=1).astype(np.int32),
            "probs": [list(p) for p in probs.astype(np.float32)],
        })
        store.write_run({"run_id": run_id, "model": model, "weights_id": weights_id, "method": method,
                         "cohort": COHORT, "config": {"classes": list(NIH_CLASSES)}, "seed": seed,
                         "code_version": "test", "metrics": {}, "study_id": study}, predictions)
    return store


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Store, Path]:
    from embedkit.report import build_report

    root = tmp_path_factory.mktemp("report")
    store = make_store(root / "store")
    html_path = build_report(store, root / "out", ci=CI, seed=0)
    return store, html_path


@pytest.fixture(scope="module")
def summary(built) -> pd.DataFrame:
    """fairness_summary queried directly, on the test split."""
    from embedkit.fairness.db import connect

    store, _ = built
    con = connect(store, attributes=["sex", "age_group", "age_group_sex"])
    return con.sql("SELECT * FROM fairness_summary WHERE split = 'test'").to_arrow_table().to_pandas()


def _value(summary: pd.DataFrame, run_id: str, attribute: str, group: str, metric: str) -> float:
    rows = summary[(summary["run_id"] == run_id) & (summary["attribute"] == attribute)
                   & (summary["group_or_gap"] == group) & (summary["metric"] == metric)]
    assert len(rows) == 1, (run_id, attribute, group, metric)
    return float(rows["value"].iloc[0])


def _row(html: str, *cells: str) -> str:
    """The HTML table row holding all of ``cells`` (as td texts), or fail."""
    for row in re.findall(r"<tr>(.*?)</tr>", html):
        if all(f">{c}<" in row for c in cells):
            return row
    raise AssertionError(f"no row with {cells}")


def test_report_files_exist_and_embed_every_figure(built):
    _, html_path = built
    out = html_path.parent
    html = html_path.read_text()
    assert html_path.name == "report.html"
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 4 + len(RUNS)  # performance, Var_F1, group F1, gaps + one reliability diagram per run
    assert all(base64.b64decode(u)[:8] == PNG_MAGIC for u in uris)
    assert 'src="' not in html.replace('src="data:', "")  # nothing linked: the file stands alone

    markdown = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", markdown)
    assert len(linked) == len(uris)
    assert {"performance.png", "var_f1.png", "group_f1.png", "gaps.png", "reliability-lp-bio-0.png"} <= set(linked)
    for name in linked:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    # the HTML inlines exactly the PNG written beside the Markdown
    assert base64.b64encode((out / "performance.png").read_bytes()).decode() in html


def test_single_run_cells_match_the_views_and_the_bootstrap(built, summary):
    from embedkit.fairness.bootstrap import bootstrap_intervals
    from embedkit.fairness.db import connect

    store, html_path = built
    html = html_path.read_text()
    accuracy = _value(summary, "lp-bio-0", "all", "all", "accuracy")
    f1_gap = _value(summary, "lp-bio-0", "sex", "gap", "f1_gap")
    # the same draws through the public bootstrap function give the same interval
    con = connect(store, attributes=["sex", "age_group", "age_group_sex"])
    intervals = bootstrap_intervals(con, [r[0] for r in RUNS], "test", n_resamples=CI, seed=0).to_pandas()
    hit = intervals[(intervals["run_id"] == "lp-bio-0") & (intervals["metric"] == "accuracy")
                    & (intervals["attribute"] == "all")].iloc[0]
    utility_row = _row(html, "biomedclip", "linear probe")
    assert f">{accuracy:.3f} [{hit['ci_low']:.3f}, {hit['ci_high']:.3f}]<" in utility_row
    gap = intervals[(intervals["run_id"] == "lp-bio-0") & (intervals["metric"] == "f1_gap")
                    & (intervals["attribute"] == "sex")].iloc[0]
    assert abs(gap["value"] - f1_gap) < 1e-12
    assert f">{f1_gap:.3f} [{gap['ci_low']:.3f}, {gap['ci_high']:.3f}]" in html
    # per-class F1 and the per-group macro-F1 with its n
    f1_edema = _value(summary, "lp-bio-0", "all", "all", "f1[Edema]")
    assert f">{f1_edema:.3f} [" in utility_row
    female = _value(summary, "lp-bio-0", "sex", "F", "macro_f1")
    assert re.search(rf">{female:.3f} \[[0-9.]+, [0-9.]+\] \(n=60\)<", html)


def test_seeds_of_one_arm_are_pooled_as_mean_and_std(built, summary):
    _, html_path = built
    html = html_path.read_text()
    seeds = [_value(summary, f"lp-tiny-{s}", "all", "all", "macro_f1") for s in range(3)]
    text = f"{statistics.mean(seeds):.3f} ± {statistics.stdev(seeds):.3f}"
    row = _row(html, "tiny-clip", "linear probe", "3 runs (seeds 0, 1, 2)")
    assert f">{text}<" in row
    eqodds = [_value(summary, f"lp-tiny-{s}", "age_group", "gap", "eqodds") for s in range(3)]
    assert f">{statistics.mean(eqodds):.3f} ± {statistics.stdev(eqodds):.3f}<" in html
    # the paper's signed F1 delta, pooled the same way and labelled with its direction
    deltas = [_value(summary, f"lp-tiny-{s}", "sex", "M-F", "f1_delta_paper") for s in range(3)]
    assert f">{statistics.mean(deltas):.3f} ± {statistics.stdev(deltas):.3f}<" in html
    assert "F1 Δ paper (sex, M-F)" in html


def test_header_says_what_was_audited_and_labels_random_weights(built):
    _, html_path = built
    html = html_path.read_text()
    markdown = (html_path.parent / "report.md").read_text()
    from embedkit import __version__

    for text in (html, markdown):
        assert "young: age &lt; 60; old: age ≥ 60" in text or "young: age < 60; old: age ≥ 60" in text
        assert f"{CI} resamples of patients" in text
        assert __version__ in text
        assert COHORT in text
        assert "Random weights." in text  # the warning banner
    models = _row(html, "tiny-clip", "random-init:tiny-clip:0")
    assert "random weights" in models
    real = _row(html, "biomedclip", REAL_WEIGHTS)
    assert "released weights" in real and "random weights" not in real
    # every row of a random-weights model says so; the released model's rows never do
    assert "random weights" in _row(html, "tiny-clip", "zero-shot")
    assert "random weights" not in _row(html, "biomedclip", "linear probe")


def test_small_groups_are_flagged(built):
    from embedkit.report.data import collect, select_runs
    from embedkit.report.tables import SMALL_FLAG, build_tables

    store, _ = built
    data = collect(store, select_runs(store, runs=["lp-bio-0"]), ci=0)
    group_table = lambda tables: next(t for t in tables if t.key == "groups_macro_f1")  # noqa: E731
    flagged = group_table(build_tables(data, min_n=61)).text_rows()[0]
    assert all(cell.endswith(SMALL_FLAG) for cell in flagged[4:])  # every group holds 60 rows
    assert not any(SMALL_FLAG in cell for cell in group_table(build_tables(data, min_n=60)).text_rows()[0])


def test_selection_by_model_method_and_study(built):
    from embedkit.report.data import ReportError, select_runs

    store, _ = built
    assert select_runs(store, models=["biomedclip"])["run_id"].tolist() == ["lp-bio-0"]
    assert sorted(select_runs(store, methods=["lp"], study="s1")["run_id"]) == ["lp-tiny-0", "lp-tiny-1", "lp-tiny-2"]
    assert len(select_runs(store)) == len(RUNS)
    with pytest.raises(ReportError, match="study_id: s1"):
        select_runs(store, study="nope")
    with pytest.raises(ReportError, match="no run 'missing'"):
        select_runs(store, runs=["missing"])


def test_cli_report(built, tmp_path):
    from embedkit.cli import app
    from embedkit.report.data import ReportError

    store, _ = built
    result = CliRunner().invoke(app, ["--store", str(store.path), "report", "--out", str(tmp_path / "r"), "--ci", "0",
                                      "--model", "biomedclip", "--by", "sex"])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    html = (tmp_path / "r" / "report.html").read_text()
    assert "lp-bio-0" in html and "lp-tiny-0" not in html
    assert html.count("data:image/png;base64,") == 5  # four summary figures and one reliability diagram
    assert "F1 gap (age)" not in html and "F1 gap (sex)" in html
    assert "value (no bootstrap interval: --ci 0)" in html
    assert sorted(p.name for p in (tmp_path / "r").glob("reliability-*.png")) == ["reliability-lp-bio-0.png"]

    failed = CliRunner().invoke(app, ["--store", str(store.path), "report", "--out", str(tmp_path / "x"),
                                      "--study", "nope"])
    assert failed.exit_code != 0 and isinstance(failed.exception, ReportError)


def test_runs_that_differ_in_more_than_the_seed_are_different_arms(tmp_path):
    """A 100-epoch and a 20-epoch MLP are two arms, each labelled by what sets it apart; seeds of one pool."""
    from embedkit.report import build_report

    store = make_store(tmp_path / "store")
    preds = store.read("predictions", "run_id = 'lp-tiny-0'")
    for run_id, epochs, seed in (("mlp-100-a", 100, 0), ("mlp-100-b", 100, 1), ("mlp-20", 20, 0)):
        table = preds.set_column(0, "run_id", pa.array([run_id] * preds.num_rows))
        store.write_run({"run_id": run_id, "model": "tiny-clip", "weights_id": "random-init:tiny-clip:0",
                         "method": "mlp", "cohort": COHORT, "seed": seed, "code_version": "test", "metrics": {},
                         "config": {"classes": list(NIH_CLASSES), "epochs": epochs}, "study_id": "s2"}, table)
    html = build_report(store, tmp_path / "out", study="s2", ci=0).read_text()
    assert _row(html, "tiny-clip", "MLP head (epochs=100)", "2 runs (seeds 0, 1)")
    assert _row(html, "tiny-clip", "MLP head (epochs=20)", "1 run (seed 0)")
    assert "pools runs whose settings differ" not in html

"""Synthetic multi-label NIH cohorts: label-scoped bias rules, multi-pattern images, synthesised vectors, the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.constants import NIH_CLASSES, NIH_FINDINGS
from embedkit.data import synth_multilabel as sm
from embedkit.data.synth import BiasRule, SynthError, parse_bias, render_image
from embedkit.store.store import Store, embeddings_table


def metadata(n_patients: int = 40) -> pd.DataFrame:
    """Two images per patient; labels cycle through single, multi-label and No Finding images."""
    cycle = ["Effusion", "Effusion|Mass", "No Finding", "Cardiomegaly|Effusion|Infiltration", "Nodule"]
    rows = [{"Image Index": f"{p:08d}_{k:03d}.png", "Finding Labels": cycle[(2 * p + k) % len(cycle)],
             "Patient Age": 20 + (p * 7) % 70, "Patient Gender": "MF"[p % 2], "View Position": "PA" if k else "AP"}
            for p in range(1, n_patients + 1) for k in range(2)]
    return pd.DataFrame(rows)


def test_label_scoped_rule_parses_and_round_trips() -> None:
    spec = parse_bias("sex=F:signal=0.2:label=Effusion;age_group=old:signal=0.5")
    assert spec.rules == (BiasRule("sex", "F", "signal", 0.2, "Effusion"), BiasRule("age_group", "old", "signal", 0.5))
    assert parse_bias(str(spec)) == spec
    with pytest.raises(ValueError, match="bad label scope"):
        parse_bias("sex=F:signal=0.2:label=Flu")


def test_patterns_reproduce_single_label_images_and_combine() -> None:
    for i, cls in enumerate(NIH_CLASSES):
        assert np.array_equal(render_image(i, 50, "F", 7, 64, 0.6), render_image(0, 50, "F", 7, 64, patterns={cls: 0.6}))
    none = render_image(0, 50, "F", 7, 64, patterns={})
    assert np.array_equal(none, render_image(0, 50, "F", 7, 64, patterns={"Effusion": 0.0}))
    both = render_image(0, 50, "F", 7, 64, patterns={"Effusion": 1.0, "Cardiomegaly": 1.0})
    eff = render_image(0, 50, "F", 7, 64, patterns={"Effusion": 1.0})
    assert not np.array_equal(both, eff) and not np.array_equal(eff, none)
    with pytest.raises(SynthError, match="strengths in"):
        render_image(0, 50, "F", 7, 64, patterns={"Effusion": 2.0})


def test_finding_strengths_apply_scoped_and_global_rules() -> None:
    rows = sm.multilabel_cohort(metadata(4))
    s = sm.finding_strengths(rows, parse_bias("sex=F:signal=0.2:label=Effusion;view=AP:signal=0.5"))
    eff, mass = NIH_FINDINGS.index("Effusion"), NIH_FINDINGS.index("Mass")
    for k, row in enumerate(rows.itertuples()):
        has = set(row.labels)
        expected = (1.0 if "Effusion" in has else 0.0) * (0.2 if row.sex == "F" else 1) * (0.5 if row.view == "AP" else 1)
        assert s[k, eff] == pytest.approx(expected)
        assert s[k, mass] == pytest.approx((1.0 if "Mass" in has else 0.0) * (0.5 if row.view == "AP" else 1))
    with pytest.raises(SynthError, match="'signal' rules only"):
        sm.finding_strengths(rows, parse_bias("sex=F:label_noise=0.2"))


def test_synthetic_vectors_carry_the_planted_bias() -> None:
    rows = sm.multilabel_cohort(metadata(200))
    X = sm.synthetic_vectors(rows, dim=64, seed=3, bias=parse_bias("sex=F:signal=0:label=Effusion"))
    assert X.shape == (400, 64) and X.dtype == np.float32
    assert np.array_equal(X, sm.synthetic_vectors(rows, dim=64, seed=3, bias=parse_bias("sex=F:signal=0:label=Effusion")))
    direction = np.random.default_rng(3).normal(size=(len(NIH_FINDINGS), 64))[NIH_FINDINGS.index("Effusion")]
    proj = X @ (direction / np.linalg.norm(direction))
    has = rows["labels"].map(lambda v: "Effusion" in v).to_numpy()
    female = (rows["sex"] == "F").to_numpy()
    # Women's Effusion carries no signal: their projection looks like no Effusion at all; men's is well above.
    assert proj[has & ~female].mean() > proj[~has].mean() + 2
    assert abs(proj[has & female].mean() - proj[~has & female].mean()) < 0.6


def test_data_synth_nih_cli_images_and_vectors(tmp_path) -> None:
    meta = tmp_path / "meta.csv"
    metadata(30).to_csv(meta, index=False)
    runner = CliRunner()
    result = runner.invoke(app, ["--store", str(tmp_path / "s"), "data", "synth", "--cohort", "nih", "--metadata",
                                 str(meta), "--limit", "20", "--out", str(tmp_path / "img"), "--size", "64",
                                 "--bias", "sex=F:signal=0.2:label=Effusion"])
    assert result.exit_code == 0, result.output
    assert "20 synthetic images written" in result.output and len(list((tmp_path / "img").glob("*.png"))) == 20
    images = Store(tmp_path / "s").read("images").to_pandas()
    assert len(images) == 20 and (images.groupby("patient_id")["split"].nunique() == 1).all()
    assert any(len(v) == 3 for v in images["labels"])
    result = runner.invoke(app, ["--store", str(tmp_path / "v"), "data", "synth", "--cohort", "nih", "--metadata",
                                 str(meta), "--vectors", "32", "--name", "nihv"])
    assert result.exit_code == 0, result.output
    table = Store(tmp_path / "v").read(embeddings_table("synthetic-vectors"))
    assert table.num_rows == 60 and set(table["weights_id"].to_pylist()) == {"random-init:synthetic-vectors:0"}
    bad = runner.invoke(app, ["--store", str(tmp_path / "v"), "data", "synth", "--cohort", "nih", "--vectors", "8"])
    assert bad.exit_code != 0 and "--cohort nih needs --metadata" in bad.output
    bad = runner.invoke(app, ["--store", str(tmp_path / "v"), "data", "synth", "--cohort", "nih", "--metadata",
                              str(meta), "--vectors", "8", "--bias", "sex=F:label_noise=0.3"])
    assert isinstance(bad.exception, SynthError) and "'signal' rules only" in str(bad.exception)

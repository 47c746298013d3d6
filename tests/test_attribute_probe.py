"""Attribute encoding (embedkit/heads/attribute.py): heads recover the sex the synthetic images carry, and only then."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.heads.attribute import encoding_table, target_vectors
from embedkit.heads.probe import HeadConfig, run_probe
from embedkit.heads.vectors import HeadsError, load_vectors
from heads_synth import write_vectors

pytestmark = pytest.mark.usefixtures("one_thread")


def _embedded_cohort(folder, sex_differences: bool):
    """Every third row of the shipped nih6x200 protocol (its patient-level splits), drawn at 96 px, embedded by
    tiny-clip at random init."""
    import torch

    from embedkit.data import nih
    from embedkit.data.build import import_synthetic
    from embedkit.embed import ToEmbed, embed_models
    from embedkit.models.registry import get_spec, instantiate
    from embedkit.store.store import Store

    folder.mkdir(parents=True)
    manifest = folder / "manifest.csv"
    nih.shipped_manifest("nih6x200").iloc[::3].to_csv(manifest, index=False)
    store = Store(folder / "store")
    import_synthetic(store, folder / "images", manifest=manifest, cohort="synthetic", size=96, seed=0,
                     sex_differences=sex_differences)
    spec = get_spec("tiny-clip")
    torch.manual_seed(0)
    embed_models(store, [ToEmbed(spec, *instantiate(spec, random_init=True, seed=0))], "synthetic", device="cpu",
                 workers=0)
    return store


@pytest.mark.slow
def test_probe_target_sex_recovers_the_planted_sex_signal_and_not_without_it(tmp_path):
    rows = {}
    for name, differences in (("sexed", True), ("neutral", False)):
        store = _embedded_cohort(tmp_path / name, differences)
        run = run_probe(store, "tiny-clip", HeadConfig("logreg"), target="sex")
        assert run["method"] == "logreg@sex" and json.loads(run["config"])["classes"] == ["F", "M"]
        (rows[name],) = encoding_table(store, ci=200)
    sexed, neutral = rows["sexed"], rows["neutral"]
    assert sexed["target"] == "sex" and sexed["n"] == neutral["n"] > 50
    assert sexed["auc"] > 0.7 and sexed["ci_low"] > 0.6, sexed
    assert abs(neutral["auc"] - 0.5) < 0.1 and neutral["ci_low"] < 0.5 < neutral["ci_high"], neutral


def test_target_vectors_read_the_column_and_refuse_unknown_ones(store):
    write_vectors(store, "tiny-clip", 8)
    vectors = load_vectors(store, "tiny-clip")
    sexed = target_vectors(vectors, "sex")
    assert sexed.classes == ("F", "M")
    np.testing.assert_array_equal(sexed.y, (vectors.meta["sex"] == "M").astype(int).to_numpy())
    assert target_vectors(vectors, "age_group").classes == ("old", "young")
    with pytest.raises(HeadsError, match="not a column"):
        target_vectors(vectors, "height")
    with pytest.raises(HeadsError, match="1 distinct value"):
        target_vectors(vectors, "view")


def test_probe_target_cli_prints_the_auc_and_encoding_lists_it(store):
    write_vectors(store, "tiny-clip", 8)  # alternating sexes, no sex signal in these vectors
    runner = CliRunner()
    base = ["--store", str(store.path)]
    out = runner.invoke(app, [*base, "probe", "--model", "tiny-clip", "--head", "logreg", "--target", "age_group"])
    assert out.exit_code == 0, out.output
    assert "logreg@age_group" in out.output and "AUC [95% CI]" in out.output
    listed = runner.invoke(app, [*base, "encoding", "--ci", "0", "--json"])
    (row,) = json.loads(listed.output)
    assert row["target"] == "age_group" and row["ci_low"] is None and 0.3 < row["auc"] < 0.7
    none = runner.invoke(app, [*base, "probe", "--model", "tiny-clip", "--head", "logreg"])
    assert none.exit_code == 0
    assert len(json.loads(runner.invoke(app, [*base, "encoding", "--ci", "0", "--json"]).output)) == 1

"""The `embedkit data` commands from the shell's point of view."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import SHARED
from embedkit.cli import app
from embedkit.data import nih

METADATA = SHARED / "nih" / "Data_Entry_2017_v2020.csv.gz"
runner = CliRunner()


def _run(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


@pytest.mark.parametrize("protocol", ["nih6x200-paper", "nih6x200"])
def test_nih_protocol_from_metadata_writes_the_cohort_row_for_row(tmp_path, protocol):
    if not METADATA.is_file():
        pytest.skip(f"{METADATA} absent (a user's clone has no ../shared)")
    out = tmp_path / "cohort.csv"
    result = _run("--store", str(tmp_path / "s"), "data", "nih", "--protocol", protocol, "--metadata", str(METADATA),
                  "--manifest-out", str(out), "--no-verify")
    written = pd.read_csv(out, dtype=str)
    expected = nih.shipped_manifest(protocol)
    assert len(written) == 1200
    for column in ("image_id", "label", "patient_id", "sex", "view", "split"):
        assert written[column].tolist() == expected[column].astype(str).tolist(), column
    assert written["age"].astype(int).tolist() == expected["age"].tolist()
    if protocol == "nih6x200-paper":
        assert "WARNING: nih6x200-paper reproduces the study's cohort, which leaks" in result.output
    else:
        assert not written["image_id"].duplicated().any()
        assert (written.groupby("patient_id")["split"].nunique() == 1).all()


def test_shipped_paper_cohort_keeps_every_repeat_and_data_info_reports_the_leaks(tmp_path):
    store = str(tmp_path / "s")
    _run("--store", store, "data", "nih", "--protocol", "nih6x200-paper", "--no-verify")
    info = json.loads(_run("--store", store, "data", "info", "--json").output)["nih6x200-paper"]
    assert info["rows"] == 1200
    problems = " | ".join(info["problems"])
    assert "39 repeated row(s) of 29 image(s)" in problems
    assert "patient(s) appear in more than one split" in problems
    assert sum(info["counts"].values()) == 1200


def test_nih_without_images_or_no_verify_says_what_to_do(tmp_path):
    result = runner.invoke(app, ["--store", str(tmp_path / "s"), "data", "nih"])
    assert result.exit_code != 0 and "--images DIR is needed" in result.output


def test_synth_imports_a_cohort_with_the_planted_bias_recorded(tmp_path):
    manifest = tmp_path / "small.csv"
    nih.shipped_manifest("nih6x200").groupby("label").head(4).to_csv(manifest, index=False)
    store = str(tmp_path / "s")
    result = _run("--store", store, "data", "synth", "--out", str(tmp_path / "img"), "--cohort", str(manifest),
                  "--size", "64", "--bias", "sex=F:signal=0.3")
    assert "24 synthetic images written" in result.output and "cohort 'synthetic': 24 rows imported" in result.output
    from embedkit.store.store import Store

    rows = Store(store).read("images").to_pandas()
    extra = rows["extra"].map(json.loads)
    assert (extra.map(lambda e: e.get("bias")) == "sex=F:signal=0.3").all()
    biased = extra.map(lambda e: str(e.get("biased")) == "True")
    assert (biased == (rows["sex"] == "F")).all()


def test_nih_full_protocol_with_split_lists(tmp_path):
    rows = [{"Image Index": f"{p:08d}_{k:03d}.png", "Finding Labels": "Effusion|Mass" if k else "No Finding",
             "Patient Age": 30 + p, "Patient Gender": "MF"[p % 2], "View Position": "PA"}
            for p in range(1, 21) for k in range(2)]
    meta = tmp_path / "Data_Entry_2017_v2020.csv"
    pd.DataFrame(rows).to_csv(meta, index=False)
    lists = tmp_path / "lists"
    lists.mkdir()
    ids = [r["Image Index"] for r in rows]
    (lists / "train_val_list.txt").write_text("\n".join(ids[:30]))
    (lists / "test_list.txt").write_text("\n".join(ids[30:]))
    out = tmp_path / "cohort.csv"
    result = _run("--store", str(tmp_path / "s"), "data", "nih", "--protocol", "nih", "--metadata", str(meta),
                  "--split-lists", str(lists), "--manifest-out", str(out), "--no-verify")
    assert "40 rows imported" in result.output
    written = pd.read_csv(out, dtype=str)
    assert written.loc[written["split"] == "test", "image_id"].tolist() == ids[30:]
    assert (written.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(written["split"]) == {"train", "val", "test"}
    bad = runner.invoke(app, ["--store", str(tmp_path / "s"), "data", "nih", "--protocol", "nih6x200",
                              "--split-lists", str(lists), "--no-verify"])
    assert bad.exit_code != 0 and "--split-lists applies to --protocol nih only" in bad.output

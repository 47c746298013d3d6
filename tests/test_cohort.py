"""Cohort import: validation at the door, keying, idempotent upserts, rejects."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.constants import NIH_CLASSES
from embedkit.data.cohort import CohortError, import_cohort, load_cohort, validate_cohort
from embedkit.data.images import ImageDecodeError, decode_image


def _import(store, frame, folder, **kw):
    validated = validate_cohort(frame, "c", images_dir=folder, classes=NIH_CLASSES, allow_repeats=kw.pop("allow_repeats", False))
    return validated, import_cohort(store, validated, "c", **kw)


def test_good_cohort_imports_with_keys_and_age_groups(store, small_cohort):
    frame, folder = small_cohort
    _, result = _import(store, frame, folder)
    rows = load_cohort(store, "c")
    assert result.imported == len(frame) == len(rows)
    assert rows["row_id"].str.startswith("c/").all()
    assert set(rows.loc[rows["age"] >= 60, "age_group"]) == {"old"}
    assert set(rows.loc[rows["age"] < 60, "age_group"]) == {"young"}
    assert rows["path"].map(lambda p: p.startswith(str(folder.resolve()))).all()


def test_reimport_is_idempotent(store, small_cohort):
    frame, folder = small_cohort
    _import(store, frame, folder)
    _import(store, frame, folder)
    assert store.count("images") == len(frame)


def test_reimport_of_a_smaller_cohort_removes_stale_rows(store, small_cohort):
    frame, folder = small_cohort
    _import(store, frame, folder)
    _import(store, frame.iloc[:10], folder)
    assert store.count("images") == 10


@pytest.mark.parametrize(
    "column, value, reason",
    [
        ("age", 130, "age 130 outside 0-120"),
        ("age", -1, "age -1 outside 0-120"),
        ("age", None, "missing age"),
        ("age", "old", "age 'old' is not a number"),
        ("sex", "X", "unknown sex value 'X'"),
        ("sex", None, "missing sex"),
        ("label", "Hernia", "not among the cohort's classes"),
        ("split", "holdout", "split 'holdout' is not one of"),
    ],
)
def test_bad_field_is_rejected_with_row_and_reason_and_nothing_written(store, small_cohort, column, value, reason):
    frame, folder = small_cohort
    frame = frame.astype(object)
    frame.loc[3, column] = value
    with pytest.raises(CohortError) as err:
        _import(store, frame, folder)
    assert "row 4 " in str(err.value) and reason in str(err.value)
    assert "nothing was written" in str(err.value)
    assert not store.has("images")


def test_missing_and_corrupt_images_are_rejected(store, small_cohort):
    frame, folder = small_cohort
    (folder / frame.loc[0, "image_id"]).unlink()
    (folder / frame.loc[1, "image_id"]).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(CohortError) as err:
        _import(store, frame, folder)
    message = str(err.value)
    assert "row 1 " in message and "not found" in message
    assert "row 2 " in message and "cannot decode" in message
    assert not store.has("images")


def test_duplicate_image_id_is_an_error_unless_repeats_are_allowed(store, small_cohort):
    frame, folder = small_cohort
    doubled = frame.copy()
    doubled.loc[5, "image_id"] = doubled.loc[4, "image_id"]
    with pytest.raises(CohortError, match="row 6 .*duplicate image_id"):
        _import(store, doubled, folder)
    _import(store, doubled, folder, allow_repeats=True)
    rows = load_cohort(store, "c")
    repeated = doubled.loc[4, "image_id"]
    assert sorted(rows.loc[rows["image_id"] == repeated, "row_id"]) == [f"c/{repeated}", f"c/{repeated}#1"]
    assert len(rows) == len(doubled)


def test_skip_bad_imports_good_rows_and_records_rejects(store, small_cohort):
    frame, folder = small_cohort
    frame = frame.astype(object)
    frame.loc[0, "sex"] = "unknown"
    frame.loc[2, "age"] = 500
    _, result = _import(store, frame, folder, skip_bad=True)
    assert (result.imported, result.rejected) == (len(frame) - 2, 2)
    rejects = store.read("rejects").to_pandas()
    assert list(rejects["line"]) == [1, 3]
    assert "unknown sex value" in rejects.loc[0, "reason"] and "age 500" in rejects.loc[1, "reason"]


def test_cli_import_with_column_mapping_and_manifest_out(tmp_path, small_cohort):
    frame, folder = small_cohort
    manifest = tmp_path / "chexpert_style.csv"
    frame.rename(columns={"image_id": "Path", "sex": "Sex", "age": "Age", "label": "Finding"}).to_csv(manifest, index=False)
    out = tmp_path / "cohort.csv"
    result = CliRunner().invoke(app, ["--store", str(tmp_path / "s"), "data", "import", str(manifest), "--images",
                                      str(folder), "--cohort", "ext", "--map", "Path=image_id", "--map", "Sex=sex",
                                      "--map", "Age=age", "--map", "Finding=label", "--manifest-out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"cohort 'ext': {len(frame)} rows imported" in result.output
    written = out.read_text().splitlines()
    assert written[0].startswith("image_id,label,labels,patient_id,age,age_group,sex,view,split")
    assert len(written) == len(frame) + 1


def test_cli_reports_unknown_mapped_column(tmp_path, small_cohort):
    frame, folder = small_cohort
    manifest = tmp_path / "m.csv"
    frame.to_csv(manifest, index=False)
    result = CliRunner().invoke(app, ["--store", str(tmp_path / "s"), "data", "import", str(manifest), "--images",
                                      str(folder), "--cohort", "x", "--map", "Nope=sex"])
    assert isinstance(result.exception, CohortError) and "Nope" in str(result.exception)


def test_console_script_prints_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "embedkit.cli", "--store", str(tmp_path / "s"), "data", "import",
                           str(tmp_path / "missing.csv"), "--cohort", "x"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: manifest not found: {tmp_path / 'missing.csv'}"


def test_decode_rescales_16_bit_and_rejects_garbage(tmp_path):
    values = np.linspace(1000, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)  # a 12-bit scan in 16 bits
    Image.fromarray(values).save(tmp_path / "scan16.png")
    img = decode_image(tmp_path / "scan16.png")
    pixels = np.asarray(img)
    assert img.mode == "L" and pixels.min() == 0 and pixels.max() == 255  # rescaled, not clipped to 255 everywhere
    assert len(np.unique(pixels)) > 200
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        decode_image(tmp_path / "bad.jpg")
    with pytest.raises(ImageDecodeError, match="not found"):
        decode_image(tmp_path / "absent.png")


def test_decode_real_images(tmp_path):
    from conftest import SHARED

    folder = SHARED / "real-cxr"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent (a user's clone has no ../shared)")
    assert decode_image(folder / "00000001_000.png").mode == "L"
    rgb = decode_image(folder / "16747_3_1.jpg")
    assert rgb.mode == "RGB" and rgb.size == (1036, 885)


@pytest.mark.parametrize("orientation, transpose", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied_before_every_models_preprocessing(tmp_path, orientation, transpose):
    import torch

    from embedkit.embed import ImageFiles, MultiImageFiles
    from embedkit.models.registry import MODELS, get_spec

    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(path, exif=exif.tobytes())
    with Image.open(path) as raw:  # the pixels as stored, and as a viewer shows them
        assert raw.getexif()[0x0112] == orientation
        shown = raw.convert("RGB").transpose(transpose)
    decoded = decode_image(path)
    assert decoded.size == (24, 40) and np.array_equal(np.asarray(decoded), np.asarray(shown))
    transforms = [get_spec(name).build(seed=0).image_transform() for name in sorted(n for n in MODELS
                                                                                     if n.startswith("tiny-"))]
    _, per_model = MultiImageFiles([str(path)], transforms, [(True,) * len(transforms)])[0]  # the embedding pass
    for transform, pixels in zip(transforms, per_model):
        assert torch.equal(pixels, transform(shown))
        assert torch.equal(ImageFiles([str(path)], transform)[0][1], pixels)  # fine-tuning's dataset

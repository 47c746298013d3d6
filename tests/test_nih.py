"""NIH ChestX-ray14 protocols: the paper's 6x200, the clean 6x200, the full dataset, and the shipped manifests.

Tests on the real metadata skip when ../shared/data/nih is absent (a user's fresh clone); the synthetic ones
always run.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from embedkit.constants import AGE_GROUPS, NIH_CLASSES, SEXES, SPLITS
from embedkit.data.cohort import write_manifest
from embedkit.data import nih
from embedkit.errors import EmbedkitError

NIH_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih"
METADATA = NIH_DIR / "Data_Entry_2017_v2020.csv.gz"
needs_metadata = pytest.mark.skipif(
    not METADATA.is_file(), reason=f"real NIH metadata not found at {METADATA} (../shared/data/nih is absent)"
)
TARGET = (35, 5, 10)  # train, val, test per cell


@pytest.fixture(scope="module")
def meta() -> pd.DataFrame:
    if not METADATA.is_file():
        pytest.skip(f"real NIH metadata not found at {METADATA}")
    return nih.read_metadata(METADATA)


@pytest.fixture(scope="module")
def paper(meta: pd.DataFrame) -> pd.DataFrame:
    return nih.paper_cohort(meta)


@pytest.fixture(scope="module")
def clean(meta: pd.DataFrame) -> pd.DataFrame:
    return nih.clean_cohort(meta)


def _cells(cohort: pd.DataFrame) -> dict[tuple[str, str, str], tuple[int, int, int]]:
    table = nih.cell_report(cohort)
    return {(r.label, r.age_group, r.sex): (r.train, r.val, r.test) for r in table.itertuples()}


def _check_frame(cohort: pd.DataFrame) -> None:
    assert list(cohort.columns) == list(nih.COLUMNS)
    assert cohort["age"].dtype == "int64"
    assert set(cohort["sex"]) <= set(SEXES)
    assert set(cohort["view"]) <= {"PA", "AP"}
    assert set(cohort["age_group"]) <= set(AGE_GROUPS)
    assert ((cohort["age"] >= 60) == (cohort["age_group"] == "old")).all()
    assert (cohort["patient_id"] == cohort["image_id"].str.slice(0, 8)).all()
    assert all(isinstance(v, list) for v in cohort["labels"])


# ------------------------------------------------------------------------------------- real metadata


@needs_metadata
def test_read_metadata_real(meta: pd.DataFrame) -> None:
    assert len(meta) == 112_120
    assert meta["Image Index"].iloc[0] == "00000001_000.png"


@needs_metadata
@pytest.mark.parametrize("protocol", nih.SHIPPED_PROTOCOLS)
def test_shipped_manifest_matches_regeneration(meta: pd.DataFrame, protocol: str, tmp_path: Path) -> None:
    regenerated = nih.cohort_for(protocol, meta)
    shipped = nih.shipped_manifest(protocol)
    pd.testing.assert_frame_equal(shipped, regenerated)  # row for row, every column
    # The CSV round trip loses nothing either (zero-padded ids stay strings).
    written = write_manifest(regenerated, tmp_path / f"{protocol}.csv.gz")
    pd.testing.assert_frame_equal(nih.manifest_cohort(written), regenerated)
    assert written.read_bytes() == (nih.MANIFEST_DIR / f"{protocol}.csv.gz").read_bytes()


@needs_metadata
def test_paper_cohort_sizes(paper: pd.DataFrame) -> None:
    _check_frame(paper)
    assert len(paper) == 1200
    assert paper["split"].value_counts().to_dict() == {"train": 840, "val": 120, "test": 240}
    cells = _cells(paper)
    assert len(cells) == 24 and set(cells.values()) == {TARGET}
    # Loop order: disease -> age group -> sex, 50 rows each.
    first = paper.iloc[::50][["label", "age_group", "sex"]].apply(tuple, axis=1).tolist()
    assert first == [(c, a, s) for c in NIH_CLASSES for a in AGE_GROUPS for s in SEXES]
    assert paper["image_id"].iloc[0] == nih.shipped_manifest(nih.PROTOCOL_PAPER)["image_id"].iloc[0]


@needs_metadata
def test_paper_cohort_leaks_as_designed(paper: pd.DataFrame) -> None:
    report = nih.leak_report(paper)
    # docs/cohorts.md: 39 repeated images (rows), 9 images and 23 patients in both train and test.
    assert report["repeated_rows"] == 39
    assert report["repeated_images"] == 29
    assert report["images_shared"] == {"train/val": 6, "train/test": 9, "val/test": 2}
    assert report["patients_shared"] == {"train/val": 16, "train/test": 23, "val/test": 7}
    assert report["images_in_several_splits"] == 15
    assert report["patients_in_several_splits"] == 42
    # Repeats come only from the two short cells (Edema old: 44 M and 34 F patients).
    repeated = paper[paper["image_id"].duplicated()]
    assert set(zip(repeated["label"], repeated["age_group"])) == {("Edema", "old")}


@needs_metadata
def test_paper_cohort_matches_notebook_transcription(paper: pd.DataFrame) -> None:
    """A second, notebook-style transcription on the raw columns gives the same images and splits."""
    from sklearn.model_selection import train_test_split

    df = pd.read_csv(METADATA)
    df = df[df["Finding Labels"].isin(NIH_CLASSES)].copy()  # exactly one label, one of the six
    df["Age Group"] = pd.cut(df["Patient Age"], bins=[0, 60, 100], right=False)
    samples = []
    for disease in NIH_CLASSES:
        for group in df["Age Group"].cat.categories:
            for sex in ["M", "F"]:
                cell = df[(df["Finding Labels"] == disease) & (df["Age Group"] == group)
                          & (df["Patient Gender"] == sex)].copy()
                cell["Patient_ID"] = cell["Image Index"].apply(lambda s: s.split("_")[0])
                cell = cell.drop_duplicates(subset="Patient_ID")
                if len(cell) >= 50:
                    samples.append(cell.sample(n=50, random_state=42))
                else:
                    samples.append(cell.sample(n=50, replace=True, random_state=42))
    sampled = pd.concat(samples).reset_index(drop=True)
    split = pd.Series(None, index=sampled.index, dtype=object)
    for _, group in sampled.groupby(["Age Group", "Patient Gender", "Finding Labels"], observed=True):
        train, rest = train_test_split(group, test_size=15, random_state=42)
        val, test = train_test_split(rest, test_size=10, random_state=42)
        split[train.index], split[val.index], split[test.index] = "train", "val", "test"
    assert sampled["Image Index"].tolist() == paper["image_id"].tolist()
    assert split.tolist() == paper["split"].tolist()


@needs_metadata
def test_clean_cohort(clean: pd.DataFrame) -> None:
    _check_frame(clean)
    assert len(clean) == 1200
    assert not clean["image_id"].duplicated().any()
    assert (clean.groupby("patient_id")["split"].nunique() == 1).all()
    assert clean["label"].value_counts().to_dict() == dict.fromkeys(NIH_CLASSES, 200)
    assert (clean.groupby(["label", "age_group"]).size() == 100).all()
    assert clean["split"].value_counts().to_dict() == {"train": 840, "val": 120, "test": 240}
    cells = _cells(clean)
    short = {k: v for k, v in cells.items() if v != TARGET}
    # As documented in docs/cohorts.md: Edema old F lacks 3 train images, borrowed from Edema old M.
    assert short == {("Edema", "old", "M"): (38, 5, 10), ("Edema", "old", "F"): (32, 5, 10)}
    assert nih.unfilled_cells(clean)[["label", "age_group", "sex", "total"]].values.tolist() == [
        ["Edema", "old", "M", 53],
        ["Edema", "old", "F", 47],
    ]
    report = nih.leak_report(clean)
    assert report["repeated_rows"] == 0 and report["patients_in_several_splits"] == 0


@needs_metadata
def test_clean_cohort_is_deterministic_and_seeded(meta: pd.DataFrame, clean: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(nih.clean_cohort(meta), clean)
    other = nih.clean_cohort(meta, seed=7)
    assert set(other["image_id"]) != set(clean["image_id"])
    assert not other["image_id"].duplicated().any()
    assert (other.groupby("patient_id")["split"].nunique() == 1).all()


@needs_metadata
def test_full_cohort(meta: pd.DataFrame) -> None:
    full = nih.full_cohort(meta)
    _check_frame(full)
    assert len(full) == 112_120
    assert (full.groupby("patient_id")["split"].nunique() == 1).all()
    patients = full.drop_duplicates("patient_id")["split"].value_counts()
    assert abs(patients["train"] / patients.sum() - 0.7) < 1e-4 and abs(patients["val"] / patients.sum() - 0.1) < 1e-4
    n = full["labels"].str.len()
    assert (full["label"].notna() == (n == 1)).all()
    single = full[n == 1]
    assert (single["label"] == single["labels"].str[0]).all()
    row = full.set_index("image_id").loc["00000001_001.png"]
    assert row["labels"] == ["Cardiomegaly", "Emphysema"] and row["label"] is None
    assert (full["labels"].apply(lambda v: v == ["No Finding"])).sum() == 60_361
    assert full["label"].value_counts()["No Finding"] == 60_361


# ------------------------------------------------------------------------------------- synthetic metadata


def _synthetic_metadata() -> pd.DataFrame:
    """50+ patients in every cell, except Edema old F: 20 patients with 2 images each (40 images).

    Edema old M has 60 single-image patients, so the clean protocol can borrow 10 of them. The first 30
    patients of Atelectasis young M also have an Effusion image (patients spanning two cells), and some
    multi-label / No Finding images must be ignored.
    """
    rows: list[dict[str, object]] = []
    pid = 0

    def add(patient: int, k: int, labels: str, age: int, sex: str) -> None:
        rows.append({"Image Index": f"{patient:08d}_{k:03d}.png", "Finding Labels": labels, "Patient ID": patient,
                     "Patient Age": age, "Patient Gender": sex, "View Position": "PA" if k % 2 else "AP"})

    for label in NIH_CLASSES:
        for age in (30, 70):
            for sex in SEXES:
                short = (label, age, sex) == ("Edema", 70, "F")
                for i in range(20 if short else 60):
                    pid += 1
                    for k in range(2 if short else 1):
                        add(pid, k, label, age, sex)
                    if (label, age, sex) == ("Atelectasis", 30, "M") and i < 30:
                        add(pid, 5, "Effusion", age, sex)
                    if i % 10 == 0:
                        add(pid, 7, f"{label}|Mass", age, sex)
                        add(pid, 8, "No Finding", age, sex)
    return pd.DataFrame(rows)


def test_clean_cohort_synthetic_borrows_and_never_leaks() -> None:
    cohort = nih.clean_cohort(_synthetic_metadata())
    _check_frame(cohort)
    assert len(cohort) == 1200
    assert not cohort["image_id"].duplicated().any()
    assert (cohort.groupby("patient_id")["split"].nunique() == 1).all()
    assert cohort["labels"].str.len().eq(1).all()
    assert (cohort.groupby(["label", "age_group"]).size() == 100).all()
    cells = _cells(cohort)
    # Edema old F: test 5 whole patients (10), val 2 (4; a third would overshoot), train the other 13 (26).
    # The 10 missing rows (1 val, 9 train) are borrowed from Edema old M, which keeps its own 35/5/10.
    assert cells[("Edema", "old", "F")] == (26, 4, 10)
    assert cells[("Edema", "old", "M")] == (44, 6, 10)
    assert {v for k, v in cells.items() if k[:2] != ("Edema", "old")} == {TARGET}
    edema_f = cohort[(cohort["label"] == "Edema") & (cohort["age_group"] == "old") & (cohort["sex"] == "F")]
    assert len(edema_f) == 40  # every image of the short cell is used
    assert (edema_f.groupby("patient_id").size() == 2).all()


def test_paper_cohort_synthetic_repeats_short_cell() -> None:
    cohort = nih.paper_cohort(_synthetic_metadata())
    assert len(cohort) == 1200
    assert set(_cells(cohort).values()) == {TARGET}
    repeated = cohort[cohort["image_id"].duplicated()]
    # Only Edema old F (20 patients, first image each) is drawn with replacement: 50 draws of 20 images.
    assert set(zip(repeated["label"], repeated["age_group"], repeated["sex"])) == {("Edema", "old", "F")}
    edema_f = cohort[(cohort["label"] == "Edema") & (cohort["age_group"] == "old") & (cohort["sex"] == "F")]
    assert edema_f["image_id"].str.endswith("_000.png").all()
    assert nih.leak_report(cohort)["repeated_rows"] == 50 - edema_f["image_id"].nunique()


def test_leak_report_counts() -> None:
    cohort = pd.DataFrame(
        {
            "image_id": ["a_0", "a_0", "b_0", "b_1", "c_0", "a_0"],
            "patient_id": ["a", "a", "b", "b", "c", "a"],
            "split": ["train", "test", "train", "val", "test", "train"],
        }
    )
    report = nih.leak_report(cohort)
    assert report["repeated_rows"] == 2 and report["repeated_images"] == 1
    assert report["images_shared"] == {"train/val": 0, "train/test": 1, "val/test": 0}
    assert report["patients_shared"] == {"train/val": 1, "train/test": 1, "val/test": 0}
    assert report["images_in_several_splits"] == 1 and report["patients_in_several_splits"] == 2


def test_full_cohort_synthetic_labels() -> None:
    full = nih.full_cohort(_synthetic_metadata())
    multi = full[full["labels"].str.len() > 1]
    assert len(multi) > 0 and multi["label"].isna().all()
    assert multi["labels"].iloc[0] == ["Atelectasis", "Mass"]
    assert full.loc[full["labels"].str.len() == 1, "label"].notna().all()


def test_full_cohort_patient_split_is_seeded_and_order_free() -> None:
    meta = _synthetic_metadata()
    full = nih.full_cohort(meta)
    assert (full.groupby("patient_id")["split"].nunique() == 1).all()
    n_patients = full["patient_id"].nunique()
    per_patient = full.drop_duplicates("patient_id")["split"].value_counts()
    assert per_patient["train"] == round(0.7 * n_patients) and per_patient["val"] == round(0.1 * n_patients)
    shuffled = nih.full_cohort(meta.sample(frac=1.0, random_state=3))
    assert shuffled.set_index("image_id")["split"].sort_index().equals(full.set_index("image_id")["split"].sort_index())
    other = nih.full_cohort(meta, seed=7)
    assert not other["split"].equals(full["split"])


def _write_lists(folder: Path, train_val: list[str], test: list[str]) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (folder / "test_list.txt").write_text("\n".join(test) + "\n\n")
    return folder


def test_full_cohort_official_lists(tmp_path: Path) -> None:
    meta = _synthetic_metadata()
    ids = meta["Image Index"].tolist()
    patients = sorted({i[:8] for i in ids})
    test_patients = set(patients[::4])
    test = [i for i in ids if i[:8] in test_patients]
    train_val = [i for i in ids if i[:8] not in test_patients] + ["99999999_000.png"]  # not in the metadata: ignored
    full = nih.full_cohort(meta, split_lists=_write_lists(tmp_path / "lists", train_val, test))
    assert set(full.loc[full["split"] == "test", "image_id"]) == set(test)
    assert (full.groupby("patient_id")["split"].nunique() == 1).all()
    val_patients = full.loc[full["split"] == "val", "patient_id"].nunique()
    assert val_patients == round(0.1 * (len(patients) - len(test_patients)))
    assert nih.leak_report(full)["patients_in_several_splits"] == 0


def test_official_lists_refuse_leaks_and_gaps(tmp_path: Path) -> None:
    meta = _synthetic_metadata()
    ids = meta["Image Index"].tolist()
    with pytest.raises(nih.MetadataError, match="neither split list in .*, e.g. " + ids[-1]):
        nih.full_cohort(meta, split_lists=_write_lists(tmp_path / "a", ids[:-1], []))
    leak = [i for i in ids if i.endswith("_005.png")][:1]  # a patient whose other image is in train_val
    with pytest.raises(nih.MetadataError, match="both split lists.*patient " + leak[0][:8]):
        nih.full_cohort(meta, split_lists=_write_lists(tmp_path / "b", [i for i in ids if i not in leak], leak))
    with pytest.raises(nih.MetadataError, match="on both"):
        nih.full_cohort(meta, split_lists=_write_lists(tmp_path / "c", ids, ids[:1]))
    with pytest.raises(nih.MetadataNotFoundError, match="test_list.txt"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "train_val_list.txt").write_text("x\n")
        nih.full_cohort(meta, split_lists=tmp_path / "d")
    with pytest.raises(EmbedkitError, match="applies to protocol 'nih' only"):
        nih.cohort_for("nih6x200", meta, tmp_path / "a")


# ------------------------------------------------------------------------------------- bad input


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    _synthetic_metadata().drop(columns=["Patient Age", "View Position"]).to_csv(path, index=False)
    with pytest.raises(nih.MetadataError, match="'Patient Age', 'View Position'"):
        nih.read_metadata(path)
    with pytest.raises(nih.MetadataError, match="'Patient Age'"):
        nih.paper_cohort(_synthetic_metadata().drop(columns=["Patient Age"]))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Data_Entry_2017_v2020"):
        nih.read_metadata(tmp_path / "nope.csv.gz")


def test_non_numeric_age(tmp_path: Path) -> None:
    meta = _synthetic_metadata()
    meta["Patient Age"] = meta["Patient Age"].astype(object)
    meta.loc[3, "Patient Age"] = "57Y"
    path = tmp_path / "meta.csv"
    meta.to_csv(path, index=False)
    with pytest.raises(nih.MetadataError, match="Patient Age"):
        nih.read_metadata(path)


def test_unknown_protocol() -> None:
    with pytest.raises(EmbedkitError, match="shipped: nih6x200-paper, nih6x200"):
        nih.shipped_manifest("chexpert")
    assert nih.shipped_manifest(nih.PROTOCOL_CLEAN)["split"].isin(SPLITS).all()

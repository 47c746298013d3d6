"""NIH ChestX-ray14 cohorts: the paper's 6x200 protocol, a clean 6x200 protocol, and the full dataset.

Three protocols, all pure functions of the NIH metadata table (``Data_Entry_2017_v2020.csv``):

- ``nih6x200-paper`` (:func:`paper_cohort`): the ISBI 2025 study's sampling, transcribed literally. It repeats
  images (cells with fewer than 50 patients are drawn with replacement) and puts some images and patients into
  more than one split; :func:`leak_report` counts both. Offered for reproduction only.
- ``nih6x200`` (:func:`clean_cohort`, the default): 200 single-label images per class, balanced over age group x
  sex, 35/5/10 train/val/test per (label, age group, sex) cell where the data allows, no repeated image and no
  patient in two splits.
- ``nih`` (:func:`full_cohort`): every image, multi-label, split by patient: NIH's official
  ``train_val_list.txt`` / ``test_list.txt`` when given (val drawn by patient from train_val), else a seeded
  patient-level split (:data:`FULL_SPLIT_FRACTIONS`). No patient is ever in two splits.

Every cohort frame has the columns of :data:`COLUMNS`; row order is the cohort's order. The two 6x200 cohorts
ship as manifests (``embedkit/data/manifests/<protocol>.csv.gz``), regenerated with
``python -m embedkit.data.nih --regenerate METADATA``. See docs/cohorts.md for the exact steps and numbers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from embedkit.constants import AGE_GROUPS, AGE_OLD_FROM, LABEL_SEPARATOR, NIH_CLASSES, SEXES, SPLITS, age_group
from embedkit.data.cohort import leak_report, read_manifest, write_manifest
from embedkit.errors import EmbedkitError
from embedkit.markdown import markdown_table

METADATA_NAME = "Data_Entry_2017_v2020.csv"
# The metadata columns the protocols read (the file has more: follow-up number, image size, pixel spacing).
REQUIRED_COLUMNS: tuple[str, ...] = (
    "Image Index",
    "Finding Labels",
    "Patient Age",
    "Patient Gender",
    "View Position",
)

PROTOCOL_PAPER = "nih6x200-paper"
PROTOCOL_CLEAN = "nih6x200"
PROTOCOL_FULL = "nih"
SHIPPED_PROTOCOLS: tuple[str, ...] = (PROTOCOL_PAPER, PROTOCOL_CLEAN)  # their manifests ship with the package
PROTOCOLS: tuple[str, ...] = (PROTOCOL_CLEAN, PROTOCOL_PAPER, PROTOCOL_FULL)  # the default first

PER_CELL = 50  # images per (label, age group, sex) cell; 4 cells x 50 = 200 per class
CELL_TARGETS: dict[str, int] = {"train": 35, "val": 5, "test": 10}
PAPER_SEED = 42  # the paper's random_state for sample() and both train_test_split() calls
CLEAN_SEED = 42
# The full protocol's seeded patient-level split, as fractions of patients. NIH's official test list holds 22.8%
# of the images (25,596 of 112,120); 70/10/20 of patients comes close without the lists.
FULL_SPLIT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.1, "test": 0.2}
# With the official lists, this fraction of the train_val patients becomes val (NIH ships no val list).
FULL_VAL_FRACTION = 0.1
FULL_SEED = 42
SPLIT_LIST_NAMES: tuple[str, str] = ("train_val_list.txt", "test_list.txt")

COLUMNS: tuple[str, ...] = ("image_id", "label", "labels", "age", "age_group", "sex", "view", "patient_id", "split")
_STRING_COLUMNS = ("image_id", "label", "age_group", "sex", "view", "patient_id", "split")
MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"


class MetadataError(EmbedkitError, ValueError):
    """The NIH metadata file lacks expected columns or holds values the protocols cannot use."""


class MetadataNotFoundError(EmbedkitError, FileNotFoundError):
    """The NIH metadata file does not exist."""


# --------------------------------------------------------------------------------------------------- reading


def read_metadata(path: str | Path) -> pd.DataFrame:
    """Read NIH ``Data_Entry_2017_v2020.csv`` (or ``.csv.gz``) and check that the needed columns are present.

    Raises :class:`MetadataNotFoundError` when the file is missing and :class:`MetadataError` naming every
    missing column when the header lacks any of :data:`REQUIRED_COLUMNS`.
    """
    path = Path(path)
    if not path.is_file():
        raise MetadataNotFoundError(
            f"NIH metadata file not found: {path}. Expected {METADATA_NAME} (or {METADATA_NAME}.gz) from the NIH "
            "ChestX-ray14 release (https://nihcc.app.box.com/v/ChestXray-NIHCC)."
        )
    # Strings stay strings: the Image Index prefix is the zero-padded patient id.
    meta = pd.read_csv(path, dtype={"Image Index": str, "Finding Labels": str, "Patient Gender": str,
                                    "View Position": str})
    _check_columns(meta, source=str(path))
    return meta


def _check_columns(meta: pd.DataFrame, source: str = "metadata") -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise MetadataError(
            f"{source} lacks the NIH metadata column(s) {', '.join(repr(c) for c in missing)}; "
            f"expected at least {', '.join(REQUIRED_COLUMNS)} (the header of {METADATA_NAME})."
        )
    ages = pd.to_numeric(meta["Patient Age"], errors="coerce")
    bad = meta.loc[ages.isna(), "Image Index"]
    if len(bad):
        raise MetadataError(f"{source}: non-numeric 'Patient Age' for {len(bad)} image(s), e.g. {bad.iloc[0]}")


def _base_frame(meta: pd.DataFrame) -> pd.DataFrame:
    """All images in file order with embedkit's column names (label/split not yet set)."""
    _check_columns(meta)
    # Plain str methods in comprehensions: 5x faster than the .str accessor on pandas 3's string arrays.
    image_id = meta["Image Index"].astype(str).to_numpy(dtype=object)
    labels = [s.split("|") for s in meta["Finding Labels"].astype(str).to_numpy(dtype=object)]
    age = pd.to_numeric(meta["Patient Age"]).astype("int64")
    frame = pd.DataFrame(
        {
            "image_id": image_id,
            "labels": pd.Series(labels, dtype=object),
            "age": age.to_numpy(),
            # constants.age_group, called once per distinct age: one boundary everywhere.
            "age_group": age.map({a: age_group(a) for a in age.unique()}).to_numpy(dtype=object),
            "sex": meta["Patient Gender"].astype(str).to_numpy(dtype=object),
            "view": meta["View Position"].astype(str).to_numpy(dtype=object),
            # The paper's Patient_ID: the Image Index prefix, zero-padded ("00000001").
            "patient_id": np.array([s.split("_", 1)[0] for s in image_id], dtype=object),
        }
    )
    return frame


def _finish(frame: pd.DataFrame) -> pd.DataFrame:
    """Select :data:`COLUMNS` in order with fixed dtypes (object strings, int64 age) and a fresh RangeIndex."""
    data: dict[str, pd.Series] = {}
    for col in COLUMNS:
        if col == "age":
            data[col] = pd.Series(frame[col].to_numpy().astype("int64"))
        elif col == "labels":
            data[col] = pd.Series(frame[col].to_numpy(dtype=object), dtype=object)
        else:
            # Object dtype on pandas 2 and 3 alike (pandas 3 would infer its str dtype); missing values are None.
            data[col] = pd.Series(frame[col].to_numpy(dtype=object, na_value=None), dtype=object)
    return pd.DataFrame(data)


def _single_label_six(frame: pd.DataFrame) -> pd.DataFrame:
    """Images with exactly one finding, that finding one of :data:`NIH_CLASSES`; ``label`` set."""
    single = frame[frame["labels"].str.len() == 1].copy()
    single["label"] = single["labels"].str[0]
    return single[single["label"].isin(NIH_CLASSES)]


# ------------------------------------------------------------------------------------------- the protocols


def full_cohort(meta: pd.DataFrame, split_lists: str | Path | None = None, seed: int = FULL_SEED) -> pd.DataFrame:
    """Protocol ``nih``: every image, ``labels`` = all findings, ``label`` = the finding when there is exactly one.

    ``split`` is by patient. With ``split_lists`` (a folder holding NIH's ``train_val_list.txt`` and
    ``test_list.txt``) test is the official test list and val a seeded :data:`FULL_VAL_FRACTION` of the train_val
    patients (:func:`official_split`); without it, :func:`patient_split` with :data:`FULL_SPLIT_FRACTIONS`.
    """
    frame = _base_frame(meta)
    n_labels = frame["labels"].str.len()
    frame["label"] = frame["labels"].str[0].where(n_labels == 1, None)
    if split_lists is not None:
        frame["split"] = official_split(frame, split_lists, seed)
    else:
        frame["split"] = patient_split(frame["patient_id"].to_numpy(dtype=object), FULL_SPLIT_FRACTIONS, seed)
    return _finish(frame)


def patient_split(patients: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """One split name per row, every patient's rows in one split.

    The distinct patient ids, sorted, are shuffled by ``numpy.random.default_rng(seed)``; the first
    ``round(fraction * n_patients)`` go to the first split of ``fractions``, and so on, the last split taking the
    rest. The result depends only on the set of patient ids and the seed, not on row order.
    """
    names, inverse = np.unique(patients.astype(str), return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(names))
    assignment = np.empty(len(names), dtype=object)
    start = 0
    splits = list(fractions)
    for k, split in enumerate(splits):
        stop = len(names) if k == len(splits) - 1 else start + round(fractions[split] * len(names))
        assignment[order[start:stop]] = split
        start = stop
    return assignment[inverse]


def read_split_list(path: Path) -> list[str]:
    """The image names of one NIH split list (one ``Image Index`` per line; blank lines ignored)."""
    if not path.is_file():
        raise MetadataNotFoundError(
            f"split list not found: {path}. --split-lists DIR must hold NIH's {' and '.join(SPLIT_LIST_NAMES)} "
            "(from the ChestX-ray14 release, beside Data_Entry_2017_v2020.csv)."
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    return [n for n in names if n]


def official_split(frame: pd.DataFrame, folder: str | Path, seed: int = FULL_SEED) -> np.ndarray:
    """Splits from NIH's official lists: test_list.txt is test; train_val_list.txt's patients are divided into
    val (a seeded :data:`FULL_VAL_FRACTION` of them, :func:`patient_split`) and train.

    Every image of ``frame`` must be on exactly one list, and no patient on both (the official lists are
    patient-disjoint); :class:`MetadataError` names the first offending image otherwise. Images on a list but
    not in the metadata are ignored (a metadata file limited to some rows is fine).
    """
    folder = Path(folder)
    train_val, test = (set(read_split_list(folder / name)) for name in SPLIT_LIST_NAMES)
    both = train_val & test
    if both:
        raise MetadataError(f"{len(both)} image(s) are on both {' and '.join(SPLIT_LIST_NAMES)} in {folder}, "
                            f"e.g. {sorted(both)[0]}")
    ids = frame["image_id"].to_numpy(dtype=object)
    in_test = np.fromiter((i in test for i in ids), dtype=bool, count=len(ids))
    in_train_val = np.fromiter((i in train_val for i in ids), dtype=bool, count=len(ids))
    missing = ~(in_test | in_train_val)
    if missing.any():
        raise MetadataError(f"{int(missing.sum())} image(s) of the metadata are on neither split list in {folder}, "
                            f"e.g. {ids[np.flatnonzero(missing)[0]]}; give the lists of the same NIH release")
    patients = frame["patient_id"].to_numpy(dtype=object)
    shared = set(patients[in_test]) & set(patients[in_train_val])
    if shared:
        example = sorted(shared)[0]
        raise MetadataError(f"{len(shared)} patient(s) have images on both split lists in {folder}, e.g. patient "
                            f"{example}; a patient-level split needs every patient on one list")
    split = np.where(in_test, "test", None).astype(object)
    rows = np.flatnonzero(in_train_val)
    split[rows] = patient_split(patients[rows], {"val": FULL_VAL_FRACTION, "train": 1 - FULL_VAL_FRACTION}, seed)
    return split


def paper_cohort(meta: pd.DataFrame) -> pd.DataFrame:
    """Protocol ``nih6x200-paper``: the ISBI 2025 study's 6x200 cohort, transcribed literally (docs/cohorts.md).

    1. keep single-label images of the six classes; age group by ``pd.cut(age, [0, 60, 100], right=False)``;
    2. per disease -> age group (young, old) -> sex (M, F): ``Patient_ID`` = Image Index prefix,
       ``drop_duplicates`` on it (first image per patient, file order), ``sample(n=50, random_state=42)``, with
       ``replace=True`` when the cell has fewer than 50 patients; concatenate in loop order (1200 rows);
    3. group by (age group, sex, label); ``train_test_split(group, test_size=15, random_state=42)`` gives 35 train
       and 15 held out; the 15 split with ``test_size=10, random_state=42`` give 5 val and 10 test.

    Repeated draws stay as separate rows sharing an ``image_id``. Rows are in the loop order of step 2.
    """
    from sklearn.model_selection import train_test_split  # sklearn costs ~0.5 s at import

    frame = _base_frame(meta)
    frame["Image Index"] = frame["image_id"]
    frame["Patient Gender"] = frame["sex"]
    single = _single_label_six(frame)
    # The paper's bins [0, 60, 100) (AGE_OLD_FROM is its 60). Ages >= 100 fall outside every cell; v2020 has none.
    single["Age Group"] = pd.cut(single["age"], bins=[0, AGE_OLD_FROM, 100], right=False)
    intervals = list(single["Age Group"].cat.categories)  # [0, 60), [60, 100): young, old

    draws = []
    for disease in NIH_CLASSES:
        for interval in intervals:
            for sex in SEXES:
                cell = single[
                    (single["label"] == disease) & (single["Age Group"] == interval) & (single["Patient Gender"] == sex)
                ].copy()
                cell["Patient_ID"] = cell["Image Index"].str.split("_").str[0]
                cell = cell.drop_duplicates(subset="Patient_ID")  # keep="first": the first image in file order
                if cell.empty:
                    raise MetadataError(f"no single-label {disease} image for age {interval}, sex {sex}")
                draws.append(cell.sample(n=PER_CELL, replace=len(cell) < PER_CELL, random_state=PAPER_SEED))
    cohort = pd.concat(draws)
    # Replacement draws duplicate index labels; a positional key tells repeated rows apart.
    cohort["_row"] = np.arange(len(cohort))

    split = np.empty(len(cohort), dtype=object)
    # Each train_test_split call restarts from random_state=42 and depends only on the group's size and row
    # order (loop order, which groupby keeps), so the groupby's key order cannot change the assignment.
    for _, group in cohort.groupby(["Age Group", "Patient Gender", "label"], observed=True, sort=True):
        train, held_out = train_test_split(group, test_size=15, random_state=PAPER_SEED)
        val, test = train_test_split(held_out, test_size=10, random_state=PAPER_SEED)
        for part, name in ((train, "train"), (val, "val"), (test, "test")):
            split[part["_row"].to_numpy()] = name
    cohort["split"] = split
    return _finish(cohort)


def clean_cohort(meta: pd.DataFrame, seed: int = CLEAN_SEED) -> pd.DataFrame:
    """Protocol ``nih6x200`` (the default): 200 images per class without repeats or patient leakage.

    Cells are (label, age group, sex) over single-label images of the six classes. Every patient gets one split,
    globally (a patient's images in any class or cell all land in that split). The algorithm:

    1. Order the 24 cells from scarcest to most plentiful (distinct patients, then images, then class order).
    2. Per cell, with a generator seeded by ``(seed, cell index)``: shuffle the cell's patients and each patient's
       images. Fill test (10), then val (5), then train (35): first one image from each eligible patient
       (unassigned, or already assigned to that split) in shuffled order, then further images of eligible
       patients. A patient's split is fixed the first time one of its images is taken. In a short cell (fewer
       than 50 patients) test and val take whole patients (all their images in the cell, fewest images first,
       none that would overshoot), so that no image is stranded and patients with several images go to train,
       where all their images can be used.
    3. After all cells: a cell still short of a split's target borrows, for that split, from its sibling sex cell
       (same label and age group), one image per patient first. Borrowed rows keep their true sex.

    Rows are ordered by label (class order), age group (young, old), sex (M, F), split (train, val, test),
    image_id. :func:`unfilled_cells` lists the cells that differ from 35/5/10.
    """
    frame = _single_label_six(_base_frame(meta))
    frame = frame[frame["sex"].isin(SEXES)].reset_index(drop=True)
    patient = frame["patient_id"].to_numpy()

    cells = [(label, ag, sex) for label in NIH_CLASSES for ag in AGE_GROUPS for sex in SEXES]
    members: dict[tuple[str, str, str], np.ndarray] = {
        key: idx for key, idx in frame.groupby(["label", "age_group", "sex"], sort=False).indices.items()
    }
    queues: dict[tuple[str, str, str], list[tuple[str, list[int]]]] = {}
    for number, key in enumerate(cells):
        rows = members.get(key, np.empty(0, dtype=np.intp))
        queues[key] = _shuffled_patients(rows, patient, np.random.default_rng([seed, number]))

    def scarcity(key: tuple[str, str, str]) -> tuple[int, int, int]:
        return (len(queues[key]), sum(len(r) for _, r in queues[key]), cells.index(key))

    order = sorted(cells, key=scarcity)
    assigned: dict[str, str] = {}  # patient -> split, global
    taken: dict[int, str] = {}  # frame row -> split
    counts = {key: dict.fromkeys(SPLITS, 0) for key in cells}
    contributed = {key: set() for key in cells}  # patients with an image counted in that cell

    for key in order:
        short = len(queues[key]) < PER_CELL
        for split in ("test", "val", "train"):
            counts[key][split] += _fill(
                queues[key], split, CELL_TARGETS[split], assigned, taken, contributed[key],
                whole_patients=short and split != "train",
            )
    # Borrowing waits until every cell has filled itself, so a sibling lends only what it does not need.
    for key in order:
        label, ag, sex = key
        sibling = (label, ag, SEXES[1 - SEXES.index(sex)])
        for split in ("test", "val", "train"):
            need = CELL_TARGETS[split] - counts[key][split]
            if need > 0:
                counts[key][split] += _fill(
                    queues[sibling], split, need, assigned, taken, contributed[key], whole_patients=False
                )

    rows = np.fromiter(taken.keys(), dtype=np.intp, count=len(taken))
    cohort = frame.iloc[rows].copy()
    cohort["split"] = [taken[r] for r in rows]
    rank = {
        "label": {v: i for i, v in enumerate(NIH_CLASSES)},
        "age_group": {v: i for i, v in enumerate(AGE_GROUPS)},
        "sex": {v: i for i, v in enumerate(SEXES)},
        "split": {v: i for i, v in enumerate(SPLITS)},
    }
    sort_keys = pd.DataFrame({col: cohort[col].map(m) for col, m in rank.items()})
    sort_keys["image_id"] = cohort["image_id"]
    cohort = cohort.iloc[np.lexsort([sort_keys[c].to_numpy() for c in reversed(sort_keys.columns)])]
    return _finish(cohort)


def _shuffled_patients(rows: np.ndarray, patient: np.ndarray, rng: np.random.Generator) -> list[tuple[str, list[int]]]:
    """The cell's patients in a seeded random order, each with its rows in a seeded random order."""
    by_patient: dict[str, list[int]] = {}
    for r in sorted(rows.tolist()):  # sorted: the draw must not depend on how the rows were gathered
        by_patient.setdefault(patient[r], []).append(r)
    names = sorted(by_patient)
    return [
        (names[i], [by_patient[names[i]][j] for j in rng.permutation(len(by_patient[names[i]]))])
        for i in rng.permutation(len(names))
    ]


def _fill(
    queue: list[tuple[str, list[int]]],
    split: str,
    need: int,
    assigned: dict[str, str],
    taken: dict[int, str],
    contributed: set[str],
    whole_patients: bool,
) -> int:
    """Take up to ``need`` rows from ``queue`` for ``split``; return how many were taken.

    Eligible patients: unassigned, or already assigned to ``split``. Normally round 1 takes one image from each
    eligible patient without an image counted in the cell yet, and round 2 further images of eligible patients.
    With ``whole_patients`` it takes all of a patient's free images or none, patients with the fewest first,
    skipping any that would overshoot: none of their images is stranded outside the split.
    """
    if need <= 0:
        return 0
    eligible = []
    for pid, rows in queue:
        free = [r for r in rows if r not in taken]
        if free and assigned.get(pid, split) == split:
            eligible.append((pid, free))
    got = 0

    def take(pid: str, rows: list[int]) -> None:
        nonlocal got
        for r in rows:
            taken[r] = split
        assigned[pid] = split
        contributed.add(pid)
        got += len(rows)

    if whole_patients:
        for pid, free in sorted(eligible, key=lambda item: len(item[1])):  # stable: shuffled order breaks ties
            if len(free) <= need - got:
                take(pid, free)
        return got
    for pid, free in eligible:  # round 1: one image per patient new to the cell
        if got == need:
            return got
        if pid not in contributed:
            take(pid, free[:1])
    for pid, free in eligible:  # round 2: further images
        rest = [r for r in free if r not in taken][: need - got]
        if rest:
            take(pid, rest)
    return got


def cell_report(cohort: pd.DataFrame) -> pd.DataFrame:
    """Counts per (label, age_group, sex) cell: one row per cell, a column per split, and ``total``.

    Labels in class order (other labels after, alphabetically); rows without a label are left out; rows
    without a split are counted in a ``none`` column.
    """
    labelled = cohort[cohort["label"].notna()]
    split = labelled["split"].where(labelled["split"].notna(), "none")
    present = set(labelled["label"])
    labels = [c for c in NIH_CLASSES if c in present] + sorted(present - set(NIH_CLASSES))
    columns = list(SPLITS) + (["none"] if (split == "none").any() else [])
    table = (
        pd.crosstab([labelled["label"], labelled["age_group"], labelled["sex"]], split)
        .reindex(columns=columns, fill_value=0)
    )
    index = pd.MultiIndex.from_product([labels, AGE_GROUPS, SEXES], names=["label", "age_group", "sex"])
    table = table.reindex(index, fill_value=0)
    table.columns.name = None
    table["total"] = table.sum(axis=1)
    return table.reset_index().astype({c: "int64" for c in [*columns, "total"]})


def unfilled_cells(cohort: pd.DataFrame, targets: dict[str, int] = CELL_TARGETS) -> pd.DataFrame:
    """The rows of :func:`cell_report` whose split counts differ from ``targets`` (35/5/10 by default)."""
    table = cell_report(cohort)
    off = np.zeros(len(table), dtype=bool)
    for split, n in targets.items():
        off |= table[split].to_numpy() != n
    return table[off].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- manifests


def cohort_for(protocol: str, meta: pd.DataFrame, split_lists: str | Path | None = None) -> pd.DataFrame:
    """Build the cohort of ``protocol`` (``nih6x200``, ``nih6x200-paper`` or ``nih``) from the metadata.

    ``split_lists`` (NIH's official train_val/test lists) applies to ``nih`` only.
    """
    builders = {PROTOCOL_CLEAN: clean_cohort, PROTOCOL_PAPER: paper_cohort, PROTOCOL_FULL: full_cohort}
    if protocol not in builders:
        raise EmbedkitError(f"unknown NIH protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if split_lists is not None:
        if protocol != PROTOCOL_FULL:
            raise EmbedkitError(f"--split-lists applies to protocol {PROTOCOL_FULL!r} only; {protocol!r} has its own "
                                "split")
        return full_cohort(meta, split_lists)
    return builders[protocol](meta)


def manifest_cohort(path: str | Path) -> pd.DataFrame:
    """A manifest written by :func:`embedkit.data.cohort.write_manifest` (a shipped one, say) read back into a
    cohort frame: ``labels`` as lists, int64 age, ids kept as written (zero-padded)."""
    flat = read_manifest(path)
    missing = [c for c in COLUMNS if c not in flat.columns]
    if missing:
        raise EmbedkitError(f"{path} lacks manifest column(s) {', '.join(missing)}")
    frame = flat.copy()
    frame["labels"] = [v.split(LABEL_SEPARATOR) if isinstance(v, str) and v else [] for v in flat["labels"]]
    frame["age"] = flat["age"].astype("int64")
    for col in ("label", "split"):
        frame[col] = [v if isinstance(v, str) and v else None for v in flat[col]]
    return _finish(frame)


def shipped_manifest(protocol: str) -> pd.DataFrame:
    """The cohort of a shipped protocol (``nih6x200`` or ``nih6x200-paper``), read from the package."""
    if protocol not in SHIPPED_PROTOCOLS:
        raise EmbedkitError(
            f"no shipped manifest for {protocol!r}; shipped: {', '.join(SHIPPED_PROTOCOLS)} "
            f"(protocol {PROTOCOL_FULL!r} is built from the metadata file)"
        )
    return manifest_cohort(MANIFEST_DIR / f"{protocol}.csv.gz")


def write_manifests(metadata: str | Path, out_dir: str | Path = MANIFEST_DIR) -> list[Path]:
    """Regenerate the shipped manifests (``<protocol>.csv.gz`` for each shipped protocol) from the metadata."""
    meta = read_metadata(metadata)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [write_manifest(cohort_for(p, meta), out_dir / f"{p}.csv.gz") for p in SHIPPED_PROTOCOLS]


def summary_markdown(meta: pd.DataFrame) -> str:
    """The generated figures of docs/cohorts.md: leak reports of both 6x200 protocols and the unfilled cells."""
    parts = []
    for protocol in SHIPPED_PROTOCOLS:
        cohort = cohort_for(protocol, meta)
        parts.append(f"### {protocol}\n\nleak_report: `{leak_report(cohort)}`\n")
        split_totals = cohort["split"].value_counts().reindex(list(SPLITS), fill_value=0)
        parts.append("splits: " + ", ".join(f"{s} {n}" for s, n in split_totals.items()) + "\n")
        unfilled = unfilled_cells(cohort)
        table = "\n".join(markdown_table(unfilled.columns, unfilled.itertuples(index=False)))
        parts.append("cells not at 35/5/10:\n\n" + (table if len(unfilled) else "none") + "\n")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m embedkit.data.nih --regenerate METADATA [--out DIR]`` or ``--summary METADATA``."""
    parser = argparse.ArgumentParser(prog="python -m embedkit.data.nih", description=__doc__.splitlines()[0])
    parser.add_argument("--regenerate", metavar="METADATA", help="rewrite the shipped 6x200 manifests")
    parser.add_argument("--out", default=str(MANIFEST_DIR), help="output folder (default: the package's)")
    parser.add_argument("--summary", metavar="METADATA", help="print the figures pasted into docs/cohorts.md")
    args = parser.parse_args(argv)
    if not (args.regenerate or args.summary):
        parser.error("give --regenerate METADATA or --summary METADATA")
    if args.regenerate:
        for path in write_manifests(args.regenerate, args.out):
            print(f"wrote {path}")
    if args.summary:
        print(summary_markdown(read_metadata(args.summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

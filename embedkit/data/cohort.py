"""Cohorts: validate rows at the door, key them, write them to the store's ``images`` table.

A cohort is a frame with the columns of ``constants.COHORT_COLUMNS``. Every source (NIH protocols, a user's
manifest, the synthetic generator) ends here, so validation and keying happen in exactly one place.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from embedkit.constants import AGE_MAX, AGE_MIN, SPLITS, age_group
from embedkit.errors import EmbedkitError
from embedkit.store import schemas
from embedkit.store.store import Store, sql_eq, sql_in

# Fields a manifest maps onto; image_id and at least one of label/labels are required.
FIELDS = ("image_id", "path", "label", "labels", "age", "sex", "view", "patient_id", "split")
_SEX_VALUES = {"m": "M", "male": "M", "f": "F", "female": "F"}
_LABEL_SEPARATOR = "|"


class CohortError(EmbedkitError):
    """A cohort failed validation; the message lists the rejected rows and their reasons."""


@dataclass
class Reject:
    line: int  # 1-based data row of the source (header excluded)
    image_id: str
    reason: str


@dataclass
class ValidatedCohort:
    rows: pd.DataFrame  # good rows, COHORT_COLUMNS + extra
    rejects: list[Reject] = field(default_factory=list)


def read_manifest(path: str | Path, mapping: dict[str, str] | None = None) -> pd.DataFrame:
    """Read a manifest CSV and rename its columns onto embedkit's fields.

    ``mapping`` maps source columns to fields (``{"Path": "image_id", "Sex": "sex"}``); unmapped columns whose
    names already are fields are kept, all others travel as source-specific extras.
    """
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"manifest not found: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise CohortError(f"{path}: not a readable CSV manifest ({exc})") from None
    mapping = mapping or {}
    unknown_sources = [c for c in mapping if c not in frame.columns]
    if unknown_sources:
        raise CohortError(
            f"{path}: --map names column(s) {unknown_sources} that the manifest lacks; it has {list(frame.columns)}"
        )
    bad_fields = [f for f in mapping.values() if f not in FIELDS]
    if bad_fields:
        raise CohortError(f"--map targets {bad_fields} are not fields; fields are {', '.join(FIELDS)}")
    return frame.rename(columns=mapping)


def parse_mapping(items: list[str]) -> dict[str, str]:
    """Parse ``column=field`` pairs from the command line."""
    mapping = {}
    for item in items:
        column, sep, target = item.partition("=")
        if not sep or not column or not target:
            raise CohortError(f"--map expects column=field, got '{item}'")
        mapping[column.strip()] = target.strip()
    return mapping


def _split_labels(value) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return []
    return [v.strip() for v in str(value).split(_LABEL_SEPARATOR) if v.strip()]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip())


def _check_image(path: str) -> str | None:
    from embedkit.data.images import ImageDecodeError, decode_image

    try:
        decode_image(path)
    except ImageDecodeError as exc:
        return str(exc)
    return None


def validate_cohort(
    frame: pd.DataFrame,
    cohort: str,
    images_dir: str | Path | None = None,
    classes: tuple[str, ...] | None = None,
    allow_repeats: bool = False,
    verify_images: bool = True,
    workers: int = 8,
) -> ValidatedCohort:
    """Check every row and key the good ones; each bad row becomes a :class:`Reject` with its reason.

    Checks: image_id present; path resolvable (``images_dir/<image_id>`` unless a path column says otherwise);
    age a number in [0, 120]; sex M/F (male/female accepted); labels inside ``classes`` when given; split one of
    train/val/test or empty; image_id unique unless ``allow_repeats`` (the paper protocol); with
    ``verify_images``, every file exists and decodes.
    """
    if "image_id" not in frame.columns:
        raise CohortError(f"cohort '{cohort}' has no image_id column (map one with --map COLUMN=image_id)")
    if "label" not in frame.columns and "labels" not in frame.columns:
        raise CohortError(f"cohort '{cohort}' has no label or labels column (map one with --map COLUMN=label)")
    images_dir = Path(images_dir) if images_dir is not None else None
    extra_columns = [c for c in frame.columns if c not in FIELDS and c not in ("age_group", "row_id", "cohort")]
    rejects: list[Reject] = []
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for line, record in enumerate(frame.to_dict("records"), start=1):
        image_id = "" if _missing(record.get("image_id")) else str(record["image_id"]).strip()
        problems: list[str] = []
        if not image_id:
            problems.append("missing image_id")
        labels = _split_labels(record.get("labels")) if "labels" in record else []
        label = None if _missing(record.get("label")) else str(record["label"]).strip()
        if not labels and label is not None:
            labels = [label]
        if label is None and len(labels) == 1:
            label = labels[0]
        if not labels:
            problems.append("missing label")
        elif classes is not None:
            unknown = [lab for lab in labels if lab not in classes]
            if unknown:
                problems.append(f"label(s) {unknown} not among the cohort's classes {list(classes)}")
        age = record.get("age")
        try:
            age_value = None if _missing(age) else float(age)
        except ValueError:
            age_value = None
            problems.append(f"age '{age}' is not a number")
        else:
            if age_value is None:
                problems.append("missing age")
            elif not AGE_MIN <= age_value <= AGE_MAX:
                problems.append(f"age {age_value:g} outside {AGE_MIN}-{AGE_MAX}")
        sex_raw = record.get("sex")
        sex = None if _missing(sex_raw) else _SEX_VALUES.get(str(sex_raw).strip().lower())
        if sex is None:
            problems.append("missing sex" if _missing(sex_raw) else f"unknown sex value '{sex_raw}' (expected M/F)")
        split = None if _missing(record.get("split")) else str(record["split"]).strip()
        if split is not None and split not in SPLITS:
            problems.append(f"split '{split}' is not one of {', '.join(SPLITS)}")
        repeat = seen.get(image_id, 0) if image_id else 0
        if image_id and repeat and not allow_repeats:
            problems.append("duplicate image_id (first seen earlier in the cohort)")
        if problems:
            rejects.append(Reject(line, image_id, "; ".join(problems)))
            continue
        seen[image_id] = repeat + 1
        raw_path = None if _missing(record.get("path")) else str(record["path"])
        if raw_path is None:
            path = (images_dir / image_id) if images_dir else Path(image_id)
        else:
            path = Path(raw_path)
            if not path.is_absolute() and images_dir is not None:
                path = images_dir / path
        extra = {c: record[c] for c in extra_columns if not _missing(record.get(c))}
        rows.append(
            {
                "row_id": f"{cohort}/{image_id}" + (f"#{repeat}" if repeat else ""),
                "cohort": cohort,
                "image_id": image_id,
                "path": str(path.resolve()) if images_dir is not None else str(path),
                "label": label if len(labels) == 1 else None,
                "labels": labels,
                "age": int(round(age_value)),
                "age_group": age_group(age_value),
                "sex": sex,
                "view": None if _missing(record.get("view")) else str(record["view"]),
                "patient_id": image_id if _missing(record.get("patient_id")) else str(record["patient_id"]),
                "split": split,
                "extra": json.dumps(extra, default=str, sort_keys=True),
                "_line": line,
            }
        )
    good = pd.DataFrame(rows, columns=[*schemas.IMAGES.names, "_line"])
    if verify_images and len(good):
        unique = good.drop_duplicates("path")
        with ThreadPoolExecutor(max_workers=workers) as pool:
            errors = dict(zip(unique["path"], pool.map(_check_image, unique["path"])))
        bad = good["path"].map(errors).notna()
        for record in good[bad].to_dict("records"):
            rejects.append(Reject(int(record["_line"]), record["image_id"], errors[record["path"]]))
        good = good[~bad]
    rejects.sort(key=lambda r: r.line)
    return ValidatedCohort(good.drop(columns="_line").reset_index(drop=True), rejects)


def format_rejects(rejects: list[Reject], limit: int = 20) -> str:
    lines = [f"  row {r.line} ({r.image_id or 'no image_id'}): {r.reason}" for r in rejects[:limit]]
    if len(rejects) > limit:
        lines.append(f"  ... and {len(rejects) - limit} more")
    return "\n".join(lines)


@dataclass
class ImportResult:
    cohort: str
    imported: int
    rejected: int


def import_cohort(store: Store, validated: ValidatedCohort, cohort: str, skip_bad: bool = False) -> ImportResult:
    """Write a validated cohort to the ``images`` table; idempotent (keyed by row_id).

    With rejects and no ``skip_bad``, nothing is written and the error lists them. With ``skip_bad``, the good
    rows are written and the rejects recorded in the ``rejects`` table with their reasons.
    Rows of an earlier import of the same cohort that are no longer in it are removed.
    """
    rejects = validated.rejects
    if rejects and not skip_bad:
        raise CohortError(
            f"cohort '{cohort}': {len(rejects)} bad row(s); nothing was written. Fix them, or pass --skip-bad to "
            f"import the good rows and record these in the rejects table:\n{format_rejects(rejects)}"
        )
    if validated.rows.empty:
        raise CohortError(f"cohort '{cohort}' has no valid rows; nothing was written")
    table = pa.Table.from_pandas(validated.rows, schema=schemas.IMAGES, preserve_index=False)
    store.upsert("images", table, ["row_id"], schemas.IMAGES)
    keep = set(validated.rows["row_id"])
    stale = [r for r in store.read("images", sql_eq("cohort", cohort), ["row_id"])["row_id"].to_pylist() if r not in keep]
    if stale:
        store.delete("images", sql_in("row_id", stale))
    store.delete("rejects", sql_eq("cohort", cohort))
    if rejects:
        now = datetime.now(timezone.utc)
        store.append(
            "rejects",
            pa.Table.from_pylist(
                [{"cohort": cohort, "line": r.line, "image_id": r.image_id, "reason": r.reason, "created_at": now}
                 for r in rejects],
                schema=schemas.REJECTS,
            ),
            schemas.REJECTS,
        )
    return ImportResult(cohort, len(validated.rows), len(rejects))


def load_cohort(store: Store, cohort: str) -> pd.DataFrame:
    """The rows of ``cohort`` from the images table, in row_id order; an unknown cohort raises."""
    if not store.has("images"):
        raise CohortError(f"the store {store.path} has no images yet: import a cohort first (embedkit data ...)")
    frame = store.read("images", sql_eq("cohort", cohort)).to_pandas()
    if frame.empty:
        known = sorted(set(store.read("images", columns=["cohort"])["cohort"].to_pylist()))
        raise CohortError(f"no cohort '{cohort}' in {store.path}; cohorts there: {', '.join(known) or 'none'}")
    return frame.sort_values("row_id", kind="stable").reset_index(drop=True)


def cohort_classes(rows: pd.DataFrame) -> tuple[str, ...]:
    """The class order of a cohort: its distinct single labels, alphabetically (NIH_CLASSES for NIH cohorts)."""
    return tuple(sorted(rows["label"].dropna().unique()))


def cohort_names(store: Store) -> list[str]:
    if not store.has("images"):
        return []
    return sorted(set(store.read("images", columns=["cohort"])["cohort"].to_pylist()))


def write_manifest(rows: pd.DataFrame, path: str | Path) -> None:
    """Write a cohort as CSV: image_id,label,labels,patient_id,age,age_group,sex,view,split (+ path if known)."""
    out = rows.copy()
    out["labels"] = out["labels"].map(lambda v: _LABEL_SEPARATOR.join(_split_labels(v)))
    columns = ["image_id", "label", "labels", "patient_id", "age", "age_group", "sex", "view", "split"]
    columns += [c for c in ("path",) if c in out.columns]
    out[columns].to_csv(path, index=False)


def cohort_problems(rows: pd.DataFrame, rejects: pd.DataFrame | None = None, min_cell: int = 10) -> list[str]:
    """Problems a researcher should know about before trusting results on this cohort."""
    problems = []
    if rejects is not None and len(rejects):
        problems.append(f"{len(rejects)} row(s) rejected at import (see the rejects table)")
    no_split = int(rows["split"].isna().sum())
    if no_split:
        problems.append(f"{no_split} row(s) have no split")
    repeats = int(rows["image_id"].duplicated().sum())
    if repeats:
        problems.append(f"{repeats} repeated row(s) of {rows.loc[rows['image_id'].duplicated(), 'image_id'].nunique()} image(s)")
    with_split = rows.dropna(subset=["split"])
    for key, what in (("image_id", "image(s)"), ("patient_id", "patient(s)")):
        n_splits = with_split.groupby(key)["split"].nunique()
        leaking = int((n_splits > 1).sum())
        if leaking:
            problems.append(f"{leaking} {what} appear in more than one split")
    cells = with_split.groupby(["split", "label", "age_group", "sex"]).size()
    small = cells[cells < min_cell]
    if len(small):
        problems.append(f"{len(small)} split x label x age_group x sex cell(s) hold fewer than {min_cell} rows")
    return problems


def cohort_counts(rows: pd.DataFrame) -> pd.DataFrame:
    """Counts per split x label x age_group x sex, one row per (split, label), columns age_group/sex."""
    frame = rows.assign(split=rows["split"].fillna("(none)"), label=rows["label"].fillna("(multi)"))
    return frame.pivot_table(
        index=["split", "label"], columns=["age_group", "sex"], values="row_id", aggfunc="count", fill_value=0
    )

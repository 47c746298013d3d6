"""Cohorts: validate rows at the door, key them, write them to the store's ``images`` table.

A cohort is a frame with the columns of ``constants.COHORT_COLUMNS``. Every source (NIH protocols, a user's
manifest, the synthetic generator) ends here, so validation and keying happen in exactly one place.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from embedkit.constants import AGE_MAX, AGE_MIN, LABEL_SEPARATOR, SPLITS, age_group
from embedkit.errors import EmbedkitError
from embedkit.store import schemas
from embedkit.store.store import Store, sql_eq, sql_in

# The columns of a manifest embedkit writes (write_manifest), in order; a path column follows when known.
MANIFEST_COLUMNS: tuple[str, ...] = ("image_id", "label", "labels", "patient_id", "age", "age_group", "sex", "view",
                                     "split")
# Fields a manifest maps onto; image_id and at least one of label/labels are required.
FIELDS = ("image_id", "path", "label", "labels", "age", "sex", "view", "patient_id", "split")
_SEX_VALUES = {"m": "M", "male": "M", "f": "F", "female": "F"}
# The most characters a cell may hold: a field (ids, labels, paths: a few dozen in practice) or another column
# (free text travels in extra). A longer cell is a rejected row, never a class or a 50 MB row of the store.
MAX_FIELD_CHARS = 4096
MAX_EXTRA_CHARS = 65536
# What a reject keeps of its reason and image_id (the store's rejects table, the error line).
MAX_REASON_CHARS = 500
MAX_REJECT_ID_CHARS = 200


class CohortError(EmbedkitError):
    """A cohort failed validation; the message lists the rejected rows and their reasons."""


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Reject:
    line: int  # 1-based data row of the source (header excluded)
    image_id: str  # at most MAX_REJECT_ID_CHARS characters, like the reason's MAX_REASON_CHARS ("…" where cut)
    reason: str

    def __post_init__(self) -> None:
        self.image_id = _bounded(self.image_id, MAX_REJECT_ID_CHARS)
        self.reason = _bounded(self.reason, MAX_REASON_CHARS)


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
    if frame.empty:
        raise CohortError(f"{path}: the manifest has a header but no rows")
    header = _header(path)
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:  # pandas would rename the second one ('sex.1') and it would travel, unnoticed, as an extra
        raise CohortError(f"{path}: column(s) {twice} appear more than once in the header; keep one of each")
    mapping = mapping or {}
    unknown_sources = [c for c in mapping if c not in frame.columns]
    if unknown_sources:
        raise CohortError(
            f"{path}: --map names column(s) {unknown_sources} that the manifest lacks; it has {list(frame.columns)}"
        )
    bad_fields = [f for f in mapping.values() if f not in FIELDS]
    if bad_fields:
        raise CohortError(f"--map targets {bad_fields} are not fields; fields are {', '.join(FIELDS)}")
    renamed = [mapping.get(c, c) for c in frame.columns]
    clash = sorted({c for c in renamed if renamed.count(c) > 1})
    if clash:
        sources = {f: [c for c in frame.columns if mapping.get(c, c) == f] for f in clash}
        raise CohortError(f"{path}: --map would give two columns the name(s) {clash} ({sources}); drop the "
                          "mapping or map the other column elsewhere")
    return frame.rename(columns=mapping)


def _header(path: Path) -> list[str]:
    """The manifest's column names as written (pandas renames repeated ones)."""
    import csv
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), [])


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
    return [v.strip() for v in str(value).split(LABEL_SEPARATOR) if v.strip()]


def _case_variants(labels: pd.Series) -> dict[str, str]:
    """``{spelling: canonical}`` for labels that differ only in case from a more common spelling of the same label."""
    counts = pd.Series([v for ls in labels for v in ls], dtype=object).value_counts()
    out: dict[str, str] = {}
    for _, spellings in counts.groupby(counts.index.map(str.casefold)):
        if len(spellings) > 1:
            ranked = sorted(spellings.items(), key=lambda kv: (-kv[1], kv[0]))
            out.update({spelling: ranked[0][0] for spelling, _ in ranked[1:]})
    return out


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip())


def _check_image(path: str) -> str | None:
    from embedkit.data.images import ImageDecodeError, decode_image

    try:
        decode_image(path)
    except ImageDecodeError as exc:
        return str(exc)
    return None


def _real_paths(paths: pd.Series) -> pd.Series:
    """``os.path.realpath`` of each (normalised) path, resolving each folder once and each file with one lstat:
    112k NIH rows share one folder."""
    folders: dict[str, str] = {}

    def real(path) -> str | None:
        if not isinstance(path, str):
            return None
        if os.path.islink(path):
            return os.path.realpath(path)
        folder, name = os.path.split(path)
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        return os.path.join(folders[folder], name)

    return paths.map(real).astype("string")


def _text(frame: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` as stripped strings with <NA> for missing or blank (an absent column is all <NA>)."""
    if name not in frame.columns:
        return pd.Series(pd.NA, index=frame.index, dtype="string")
    values = frame[name].astype("string").str.strip()
    return values.mask(values == "")


def validate_cohort(
    frame: pd.DataFrame,
    cohort: str,
    images_dir: str | Path | None = None,
    classes: tuple[str, ...] | None = None,
    allow_repeats: bool = False,
    verify_images: bool = True,
    workers: int = 8,
    allow_outside_images: bool = False,
) -> ValidatedCohort:
    """Check every row and key the good ones; each bad row becomes a :class:`Reject` with its reason.

    Checks: no cell longer than MAX_FIELD_CHARS (a field) or MAX_EXTRA_CHARS (another column); image_id present;
    path resolvable (``images_dir/<image_id>`` unless a path column says otherwise) and, unless
    ``allow_outside_images``, inside ``images_dir`` once '..' and symlinks are resolved;
    age a number in [0, 120]; sex M/F (male/female accepted); labels inside ``classes`` when given; split one of
    train/val/test or empty; image_id unique unless ``allow_repeats`` (the paper protocol); with
    ``verify_images``, every file exists and decodes. Column-wise, so 100k-row manifests validate in a second.
    """
    if "image_id" not in frame.columns:
        raise CohortError(f"cohort '{cohort}' has no image_id column (map one with --map COLUMN=image_id)")
    if "label" not in frame.columns and "labels" not in frame.columns:
        raise CohortError(f"cohort '{cohort}' has no label or labels column (map one with --map COLUMN=label)")
    frame = frame.reset_index(drop=True)
    # Resolved once: a per-row resolve() costs a filesystem walk per image.
    images_dir = Path(images_dir).resolve() if images_dir is not None else None
    problems: list[pd.Series] = []  # each: a reason where the row fails that check, <NA> elsewhere

    def check(failed: pd.Series, reason) -> None:
        reasons = reason if isinstance(reason, pd.Series) else pd.Series(reason, index=frame.index, dtype="string")
        problems.append(reasons.where(failed.fillna(False).astype(bool)))

    for column in frame.columns:  # first: a reason cut to MAX_REASON_CHARS keeps this one
        bound = MAX_FIELD_CHARS if column in FIELDS else MAX_EXTRA_CHARS
        length = frame[column].astype("string").str.len()
        check(length > bound, f"column '{column}' holds " + length.astype("string").fillna("")
              + f" characters, more than the {bound} a cell may hold")

    image_id = _text(frame, "image_id")
    check(image_id.isna(), "missing image_id")

    label = _text(frame, "label")
    labels = frame["labels"].map(_split_labels) if "labels" in frame.columns else pd.Series([[]] * len(frame))
    labels = labels.where(labels.map(len) > 0, label.map(lambda v: [] if pd.isna(v) else [v]))
    label = label.fillna(labels.map(lambda ls: ls[0] if len(ls) == 1 else None).astype("string"))
    check(labels.map(len) == 0, "missing label")
    variants = _case_variants(labels)
    if variants:  # 'Effusion' and 'EFFUSION' would become two classes
        odd = labels.map(lambda ls: [v for v in ls if v in variants])
        check(odd.map(len) > 0, odd.map(lambda vs: "; ".join(
            f"label '{v}' differs only in case from '{variants[v]}', the spelling most rows use: spell each class "
            "one way" for v in vs)))
    if classes is not None:
        unknown = labels.map(lambda ls: [v for v in ls if v not in classes])
        check(unknown.map(len) > 0, unknown.map(lambda u: f"label(s) {u} not among the cohort's classes {list(classes)}"))

    age_raw = _text(frame, "age")
    age = pd.to_numeric(age_raw, errors="coerce")
    check(age_raw.isna(), "missing age")
    check(age_raw.notna() & age.isna(), "age '" + age_raw.fillna("") + "' is not a number")
    out_of_range = age.notna() & ((age < AGE_MIN) | (age > AGE_MAX))
    check(out_of_range, age.map(lambda v: f"age {v:g} outside {AGE_MIN}-{AGE_MAX}"))

    sex_raw = _text(frame, "sex")
    sex = sex_raw.str.lower().map(_SEX_VALUES)
    check(sex_raw.isna(), "missing sex")
    check(sex_raw.notna() & sex.isna(), "unknown sex value '" + sex_raw.fillna("") + "' (expected M/F)")

    split = _text(frame, "split")
    check(split.notna() & ~split.isin(SPLITS), "split '" + split.fillna("") + f"' is not one of {', '.join(SPLITS)}")

    raw_path = _text(frame, "path")
    relative = raw_path.notna() & ~raw_path.str.startswith("/").fillna(False)
    base = str(images_dir) + "/" if images_dir is not None else ""
    path = raw_path.where(~relative, base + raw_path).fillna(base + image_id)
    if images_dir is not None:
        path = path.map(lambda p: os.path.normpath(p) if isinstance(p, str) else p).astype("string")
    if images_dir is not None and not allow_outside_images:
        # '..', an absolute path or a symlink must not reach files outside the folder given: checked on the real
        # path (a file that does not exist yet resolves as far as it can), with or without --verify.
        real = _real_paths(path)
        outside = real.notna() & ~real.str.startswith(base).fillna(False)
        given = raw_path.fillna(image_id).fillna("")
        check(outside, "path '" + given + f"' lies outside the images folder {images_dir} (after '..' and "
              "symlinks; --allow-outside-images accepts it)")

    # Repeats are counted among otherwise valid rows, in manifest order: the k-th repeat gets row_id ...#k.
    valid = pd.concat(problems, axis=1).isna().all(axis=1)
    repeat = image_id[valid].groupby(image_id[valid]).cumcount().reindex(frame.index, fill_value=0)
    if not allow_repeats:
        check(valid & (repeat > 0), "duplicate image_id (first seen earlier in the cohort)")

    failed = pd.concat(problems, axis=1)
    bad = failed.notna().any(axis=1)
    rejects = [
        Reject(int(i) + 1, "" if pd.isna(image_id[i]) else str(image_id[i]), "; ".join(r for r in failed.loc[i] if not pd.isna(r)))
        for i in frame.index[bad]
    ]
    good = ~bad
    extra_columns = [c for c in frame.columns if c not in FIELDS and c not in ("age_group", "row_id", "cohort")]
    if extra_columns:
        extra = frame[extra_columns].apply(
            lambda r: json.dumps({k: v for k, v in r.items() if not _missing(v)}, default=str, sort_keys=True), axis=1
        )
    else:
        extra = pd.Series("{}", index=frame.index)
    suffix = repeat.map(lambda k: f"#{k}" if k else "")
    good_rows = pd.DataFrame(
        {
            "row_id": cohort + "/" + image_id + suffix,
            "cohort": cohort,
            "image_id": image_id,
            "path": path,
            "labels": labels,
            "label": label.where(labels.map(len) == 1),
            "age": age.round().astype("Int64"),
            "age_group": age.map(age_group, na_action="ignore"),
            "sex": sex,
            "view": _text(frame, "view"),
            "patient_id": _text(frame, "patient_id").fillna(image_id),
            "split": split,
            "extra": extra,
            "_line": frame.index + 1,
        }
    )[good]
    good = good_rows.astype({c: object for c in good_rows.columns if c not in ("age", "labels", "_line")})
    good = good.where(good.notna(), None)
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


def format_rejects(rejects: list[Reject], limit: int = 5) -> str:
    """The first ``limit`` rejects on one line, each with its row, image_id and reason."""
    text = " | ".join(f"row {r.line} ({r.image_id or 'no image_id'}): {r.reason}" for r in rejects[:limit])
    more = len(rejects) - limit
    return text + (f" | and {more} more (rows {', '.join(str(r.line) for r in rejects[limit:limit + 10])}"
                   f"{', ...' if more > 10 else ''})" if more > 0 else "")


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
            f"cohort '{cohort}': {len(rejects)} bad row(s), nothing was written: {format_rejects(rejects)}\n"
            "hint: fix them, or pass --skip-bad to import the good rows and record the bad ones in the rejects table"
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


def cohort_fingerprint(rows: pd.DataFrame, columns: tuple[str, ...] = ("row_id", "label", "split")) -> str:
    """A hash of the columns a run depends on (heads: row ids, labels, splits; fine-tuning adds paths), so a
    re-imported cohort with new labels or splits gives new runs, never a match with the old ones."""
    digest = hashlib.sha256()
    # A missing value hashes as "None" (what astype(str) wrote before pandas 3, which keeps it missing instead).
    picked = rows[list(columns)].astype(object)
    for values in picked.where(picked.notna(), "None").astype(str).itertuples(index=False):
        digest.update("\x1f".join(values).encode() + b"\x1e")
    return "sha256:" + digest.hexdigest()[:16]


def cohort_classes(rows: pd.DataFrame) -> tuple[str, ...]:
    """The class order of a cohort: its distinct single labels, alphabetically (NIH_CLASSES for NIH cohorts)."""
    return tuple(sorted(rows["label"].dropna().unique()))


def cohort_labels(rows: pd.DataFrame) -> tuple[str, ...]:
    """The label order of a multi-label cohort: every label of its label lists, alphabetically, with NO_FINDING
    last. For NIH this is NIH_FINDINGS (alphabetical already) then "No Finding" (docs/multilabel.md)."""
    from embedkit.constants import NO_FINDING

    found = {v for ls in rows["labels"] for v in _split_labels(ls)} if "labels" in rows.columns else set()
    return tuple(sorted(found - {NO_FINDING})) + ((NO_FINDING,) if NO_FINDING in found else ())


def cohort_task(rows: pd.DataFrame) -> str:
    """A cohort's default task: multi-label when some row lists more than one label (NIH's full protocol, the
    synthetic ``--cohort nih``), else multi-class (every row one label: the 6x200 protocols)."""
    from embedkit.constants import MULTICLASS, MULTILABEL

    if "labels" not in rows.columns:
        return MULTICLASS
    return MULTILABEL if any(len(_split_labels(ls)) > 1 for ls in rows["labels"]) else MULTICLASS


def cohort_names(store: Store) -> list[str]:
    if not store.has("images"):
        return []
    return sorted(set(store.read("images", columns=["cohort"])["cohort"].to_pylist()))


def write_manifest(rows: pd.DataFrame, path: str | Path) -> Path:
    """Write a cohort as a manifest CSV that :func:`read_manifest` reads back: :data:`MANIFEST_COLUMNS` (+ path when
    the rows have one), ``labels`` joined with "|". A name ending in .gz is gzipped with a fixed mtime (stable
    bytes: the shipped NIH manifests are written here)."""
    path = Path(path)
    out = rows.copy()
    out["labels"] = out["labels"].map(lambda v: LABEL_SEPARATOR.join(_split_labels(v)))
    columns = [*MANIFEST_COLUMNS, *(c for c in ("path",) if c in out.columns)]
    compression = {"method": "gzip", "mtime": 0} if path.suffix == ".gz" else None
    out[columns].to_csv(path, index=False, compression=compression)
    return path


def leak_report(rows: pd.DataFrame) -> dict[str, object]:
    """Count what a cohort repeats and leaks across splits.

    Keys: ``rows``; ``repeated_rows`` (rows whose image_id appeared on an earlier row); ``repeated_images``
    (distinct image_ids on more than one row); ``images_in_several_splits`` and ``patients_in_several_splits``;
    ``images_shared`` and ``patients_shared``: counts per split pair, e.g. ``{"train/test": 9, ...}``. Rows
    without a split are ignored for the split figures.
    """
    repeated = rows["image_id"].duplicated(keep="first")
    with_split = rows[rows["split"].notna()]
    report: dict[str, object] = {
        "rows": int(len(rows)),
        "repeated_rows": int(repeated.sum()),
        "repeated_images": int(rows.loc[repeated, "image_id"].nunique()),
    }
    for column, name in (("image_id", "images"), ("patient_id", "patients")):
        sets = {s: set(with_split.loc[with_split["split"] == s, column]) for s in SPLITS}
        report[f"{name}_in_several_splits"] = int((with_split.groupby(column)["split"].nunique() > 1).sum())
        report[f"{name}_shared"] = {
            f"{a}/{b}": len(sets[a] & sets[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:]
        }
    return report


def cohort_problems(rows: pd.DataFrame, rejects: pd.DataFrame | None = None, min_cell: int = 10) -> list[str]:
    """Problems a researcher should know about before trusting results on this cohort."""
    problems = []
    if rejects is not None and len(rejects):
        problems.append(f"{len(rejects)} row(s) rejected at import (see the rejects table)")
    no_split = int(rows["split"].isna().sum())
    if no_split:
        problems.append(f"{no_split} row(s) have no split")
    leaks = leak_report(rows)
    if leaks["repeated_rows"]:
        problems.append(f"{leaks['repeated_rows']} repeated row(s) of {leaks['repeated_images']} image(s)")
    for name in ("images", "patients"):
        if leaks[f"{name}_in_several_splits"]:
            problems.append(f"{leaks[f'{name}_in_several_splits']} {name[:-1]}(s) appear in more than one split")
    with_split = rows.dropna(subset=["split"])
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

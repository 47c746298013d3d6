"""Building a cohort into the store: the one path `embedkit data nih|import|synth`, `embedkit study` and the demo share.

Each source ends in :func:`import_rows` (validate, key, write the ``images`` table, see :mod:`embedkit.data.cohort`):

- a NIH protocol (:func:`import_nih`): the shipped 6x200 manifests or a protocol built from the metadata file,
  its images looked up in the user's folder;
- a synthetic cohort (:func:`import_synthetic`): X-rays drawn for every row of a manifest (real ages and sexes),
  with an optional planted bias recorded per row: ``bias`` (the spec as text; absent without one) and ``biased``
  (whether a bias rule changed that image).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from embedkit.constants import NIH_CLASSES
from embedkit.data import nih
from embedkit.data.cohort import ImportResult, import_cohort, read_manifest, validate_cohort
from embedkit.store.store import Store

SYNTHETIC_COHORT = "synthetic"  # the cohort name the demo and `embedkit study --cohort synthetic` use
SYNTHETIC_MANIFEST = nih.PROTOCOL_CLEAN  # what a synthetic cohort is drawn from unless told otherwise


@dataclass
class BuiltCohort:
    """A cohort written to the store: the rows as imported and the import's counts."""

    rows: pd.DataFrame  # the validated rows (the images table's columns)
    result: ImportResult


@dataclass
class SyntheticCohort(BuiltCohort):
    """A synthetic cohort: besides the import, how many images were drawn, in how long, with which bias."""

    images: int = 0  # distinct images drawn (a repeated image_id is drawn once)
    seconds: float = 0.0  # drawing the images
    bias: str | None = None  # the planted bias spec as text, None without one


def import_rows(store: Store, frame: pd.DataFrame, cohort: str, images: str | Path | None = None,
                classes: tuple[str, ...] | None = None, allow_repeats: bool = False, verify: bool = True,
                skip_bad: bool = False, allow_outside_images: bool = False) -> BuiltCohort:
    """Validate ``frame`` as cohort ``cohort`` and import it (see :func:`validate_cohort`, :func:`import_cohort`)."""
    validated = validate_cohort(frame, cohort, images_dir=images, classes=classes, allow_repeats=allow_repeats,
                                verify_images=verify, allow_outside_images=allow_outside_images)
    return BuiltCohort(validated.rows, import_cohort(store, validated, cohort, skip_bad=skip_bad))


def import_nih(store: Store, protocol: str, frame: pd.DataFrame, images: str | Path | None, cohort: str | None = None,
               verify: bool = True, skip_bad: bool = False) -> BuiltCohort:
    """Import ``frame``, the cohort of NIH ``protocol``, as ``cohort`` (default: the protocol's name).

    The 6x200 protocols hold the six single-label classes; ``nih`` keeps every finding. Only the paper's protocol
    repeats images (it samples small cells with replacement), so only it accepts repeated image_ids.
    """
    classes = None if protocol == nih.PROTOCOL_FULL else NIH_CLASSES
    return import_rows(store, frame, cohort or protocol, images, classes, allow_repeats=protocol == nih.PROTOCOL_PAPER,
                       verify=verify, skip_bad=skip_bad)


def import_synthetic(store: Store, out: str | Path, manifest: str | Path = SYNTHETIC_MANIFEST,
                     cohort: str = SYNTHETIC_COHORT, size: int = 256, seed: int = 0,
                     bias: str | None = None, sex_differences: bool = True) -> SyntheticCohort:
    """Draw a synthetic X-ray into ``out`` for every row of ``manifest`` and import the rows as ``cohort``.

    ``manifest`` is a shipped protocol (``nih6x200``, ``nih6x200-paper``) or a CSV path; ``bias`` a planted
    unfairness such as ``sex=F:signal=0.3`` (see :func:`embedkit.data.synth.parse_bias`), checked before anything
    is drawn. Same seed, same bytes. ``sex_differences=False``: every image drawn with one anatomy (no sex signal).
    """
    from embedkit.data import synth

    spec = synth.parse_bias(bias) if bias else None
    frame = nih.shipped_manifest(str(manifest)) if manifest in nih.SHIPPED_PROTOCOLS else read_manifest(manifest)
    start = time.perf_counter()
    written = synth.synthesize(frame, out, size=size, seed=seed, bias=spec, sex_differences=sex_differences)
    seconds = time.perf_counter() - start
    text = str(spec) if spec else None
    frame = frame.merge(written[["image_id", "biased"]], on="image_id", how="left").assign(bias=text)
    built = import_rows(store, frame, cohort, out, allow_repeats=bool(frame["image_id"].duplicated().any()))
    return SyntheticCohort(built.rows, built.result, images=len(written), seconds=seconds, bias=text)


def import_synthetic_multilabel(store: Store, metadata: str | Path, out: str | Path | None, limit: int | None = None,
                                cohort: str = SYNTHETIC_COHORT, size: int = 64, seed: int = 0,
                                bias: str | None = None, vectors: int | None = None) -> SyntheticCohort:
    """A synthetic multi-label cohort from the real NIH metadata (``data synth --cohort nih``): the first ``limit``
    images' label lists, ages, sexes and views, split by patient (protocol ``nih``), imported as ``cohort``.

    Without ``vectors`` an X-ray is drawn per image into ``out`` (:func:`synth_multilabel.synthesize_multilabel`);
    with ``vectors`` (a width) no image is drawn and vectors are written directly as model ``synthetic-vectors``
    (:func:`synth_multilabel.write_synthetic_vectors`). ``bias`` takes ``signal`` rules, optionally scoped to one
    finding (``sex=F:signal=0.2:label=Effusion``).
    """
    from embedkit.data import synth, synth_multilabel

    spec = synth.parse_bias(bias) if bias else None
    frame = synth_multilabel.multilabel_cohort(metadata, limit)
    synth_multilabel.finding_strengths(frame.head(1), spec)  # refuses label_noise before anything is written
    text = str(spec) if spec else None
    start = time.perf_counter()
    if vectors is None:
        if out is None:
            raise synth.SynthError("--out DIR is needed to draw images (or pass --vectors DIM)")
        written = synth_multilabel.synthesize_multilabel(frame, out, size=size, seed=seed, bias=spec)
        frame = frame.merge(written[["image_id", "biased"]], on="image_id", how="left").assign(bias=text)
        seconds = time.perf_counter() - start
        built = import_rows(store, frame, cohort, out)
        return SyntheticCohort(built.rows, built.result, images=len(written), seconds=seconds, bias=text)
    strengths = synth_multilabel.finding_strengths(frame, spec)
    plain = synth_multilabel.finding_strengths(frame, None)
    frame = frame.assign(biased=(strengths != plain).any(axis=1), bias=text)
    built = import_rows(store, frame, cohort, None, verify=False)
    synth_multilabel.write_synthetic_vectors(store, cohort, dim=vectors, seed=seed, bias=spec)
    return SyntheticCohort(built.rows, built.result, images=0, seconds=time.perf_counter() - start, bias=text)

"""One (model, cohort, weights_id) slice of the embedding store as arrays: X, y, split, row ids, demographics.

Vectors of different weights are never mixed: when a cohort was embedded with several weights (say random-init
and the released checkpoint) and none was chosen, loading fails and lists them.

Labels, splits and demographics come from the ``images`` table, joined on row_id at read time: the embeddings
tables hold vectors (older stores also hold copies of those columns, which are never read), so re-importing a
cohort with new splits changes what every head trains on at once. A cohort whose embedding pass did not finish
is refused unless the caller allows a partial one (recorded in the run's config).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from embedkit.constants import MULTICLASS, MULTILABEL, NO_SPLIT
from embedkit.errors import EmbedkitError
from embedkit.store.store import Store, embeddings_table, sql_eq

# Columns of the images table kept beside the vectors.
META_COLUMNS = ("row_id", "image_id", "split", "label", "age", "age_group", "sex", "view", "patient_id")


class HeadsError(EmbedkitError):
    """A head cannot run on what the store holds; the message says what to run or pass instead."""


@dataclass
class CohortVectors:
    """The stored vectors of one cohort under one weights_id, in row_id order.

    ``y`` holds indices into ``classes`` (the cohort's class order), -1 where a row has no single label. A
    multi-label slice (``task`` multilabel, embedkit/heads/multilabel.py) has ``classes`` = the cohort's labels,
    ``Y`` [N, L] its 0/1 label lists, and ``y`` all -1 (no single class: predictions store y_true NULL).
    """

    model: str
    cohort: str
    weights_id: str
    classes: tuple[str, ...]
    X: np.ndarray  # [N, d] float32
    y: np.ndarray  # [N] int64, -1 = unlabelled
    meta: pd.DataFrame = field(repr=False)  # META_COLUMNS, one row per vector
    missing_rows: int = 0  # cohort rows without a vector (only with allow_partial)
    embedding: dict = field(default_factory=dict)  # how the vectors were computed (EmbeddingSettings.config())
    task: str = MULTICLASS
    Y: np.ndarray | None = field(default=None, repr=False)  # [N, L] float32 0/1 (multi-label only)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The cohort fingerprint of these rows (row ids, labels, splits), computed once for all the runs of a sweep."""
        from embedkit.data.cohort import cohort_fingerprint

        if self.task == MULTILABEL:  # the label lists, not the single label, are what its heads train on
            return cohort_fingerprint(self.meta, ("row_id", "labels", "split"))
        return cohort_fingerprint(self.meta)

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])

    @property
    def split(self) -> np.ndarray:
        return self.meta["split"].to_numpy(dtype=object)

    @property
    def row_ids(self) -> np.ndarray:
        return self.meta["row_id"].to_numpy(dtype=object)

    def index(self, split: str, labelled: bool = True) -> np.ndarray:
        """Positions of the rows of ``split`` (only labelled ones unless ``labelled=False``)."""
        mask = self.split == split
        if labelled:
            mask &= (self.Y.any(axis=1) if self.task == MULTILABEL else self.y >= 0)
        return np.flatnonzero(mask)

    def groups(self, by: tuple[str, ...] | list[str]) -> np.ndarray:
        """One group key per row from demographic columns (joined with '|' when several), None if any is missing."""
        missing = [c for c in by if c not in self.meta.columns]
        if missing:
            raise HeadsError(f"unknown group column(s) {missing}; use some of {list(META_COLUMNS[2:])}")
        cols = self.meta[list(by)].astype(object)
        keys = cols.apply(lambda r: None if r.isna().any() else "|".join(str(v) for v in r), axis=1)
        return keys.to_numpy(dtype=object)

    def require_splits(self, *splits: str) -> None:
        """Fail with a clear message when a split a head trains or selects on has no labelled rows."""
        empty = [s for s in splits if len(self.index(s)) == 0]
        if empty and (self.split == NO_SPLIT).all():
            raise HeadsError(
                f"cohort '{self.cohort}' has no split column (no row is train, val or test) and trained heads need "
                "train and val rows: add a split column (train/val/test) to the manifest and re-import it with "
                "`embedkit data import`; zero-shot (`embedkit zeroshot`) needs no split"
            )
        if empty:
            raise HeadsError(
                f"cohort '{self.cohort}' has no labelled rows in split(s) {empty} (model {self.model}, "
                f"weights {self.weights_id}); trained heads need train and val rows: assign splits in the manifest "
                f"and re-import the cohort (embedkit data ...)."
            )


def _distinct(values) -> list[str]:
    return sorted({v for v in values if v is not None})


def choose_slice(store: Store, model: str, cohort: str | None, weights_id: str | None) -> tuple[str, str]:
    """Resolve (cohort, weights_id) for ``model``; refuse to guess when the store holds several."""
    from embedkit.models.registry import MODELS, get_spec

    table = embeddings_table(model)
    if not store.has(table):
        if model not in MODELS:
            get_spec(model)  # raises: naming the model it was meant to be beats a hint to embed a name that fails
        raise HeadsError(
            f"no embeddings for model '{model}' in the store {store.path} (table {table}): "
            f"run `embedkit embed --model {model}` first"
        )
    where = sql_eq("cohort", cohort) if cohort else None
    keys = store.read(table, where, ["cohort", "weights_id"])
    if keys.num_rows == 0:
        have = _distinct(store.read(table, None, ["cohort"])["cohort"].to_pylist())
        raise HeadsError(f"model '{model}' has no embeddings for cohort '{cohort}'; cohorts embedded: {have}")
    cohorts = _distinct(keys["cohort"].to_pylist())
    if cohort is None:
        if len(cohorts) > 1:
            raise HeadsError(
                f"model '{model}' has embeddings for several cohorts {cohorts}: choose one with --cohort"
            )
        cohort = cohorts[0]
    weights = pd.Series(keys["weights_id"].to_pylist()).value_counts().sort_index()
    if weights_id is None:
        if len(weights) > 1:
            listing = ", ".join(f"{w} ({n} rows)" for w, n in weights.items())
            raise HeadsError(
                f"cohort '{cohort}' was embedded by '{model}' with several weights: {listing}. Vectors of "
                f"different weights are never mixed: choose one with --weights-id"
            )
        weights_id = str(weights.index[0])
    elif weights_id not in weights.index:
        raise HeadsError(
            f"no '{model}' embeddings of cohort '{cohort}' with weights_id '{weights_id}'; "
            f"weights_ids there: {list(weights.index)}"
        )
    return cohort, weights_id


def _embed_command(model: str, cohort: str, weights_id: str) -> str:
    """The command that resumes the pass which wrote ``weights_id`` (random weights need their flag and seed)."""
    from embedkit.models.registry import random_init_id

    command = f"embedkit embed --model {model} --cohort {cohort}"
    seed = weights_id.rsplit(":", 1)[-1]
    if seed.isdigit() and weights_id == random_init_id(model, int(seed)):
        return f"{command} --random-init --seed {seed}"
    return command + " --weights <the same weights>"


def load_vectors(store: Store, model: str, cohort: str | None = None, weights_id: str | None = None,
                 allow_partial: bool = False, task: str | None = None) -> CohortVectors:
    """Read the vectors of ``model`` for one cohort and one weights_id (both inferred when unambiguous), with each
    row's label, split and demographics from the images table.

    ``task``: multiclass or multilabel; None takes the cohort's own (:func:`embedkit.data.cohort.cohort_task`).

    Raises HeadsError when some rows of the cohort have no vector under these weights (an unfinished pass), unless
    ``allow_partial``; and when a row has two vectors (a store written by two passes at once: `embedkit doctor`).
    """
    # the one definition of a cohort's class order (and task)
    from embedkit.data.cohort import cohort_classes, cohort_task, load_cohort

    cohort, weights_id = choose_slice(store, model, cohort, weights_id)
    where = f"{sql_eq('cohort', cohort)} AND {sql_eq('weights_id', weights_id)}"
    table = store.read(embeddings_table(model), where, ["row_id", "vector"])
    row_ids = np.asarray(table["row_id"].to_pylist(), dtype=object)
    if len(set(row_ids)) != len(row_ids):
        raise HeadsError(f"{len(row_ids) - len(set(row_ids))} rows of cohort '{cohort}' have two '{model}' vectors "
                         f"(weights {weights_id}): repair the store with `embedkit doctor --repair`")
    images = load_cohort(store, cohort)
    task = task or cohort_task(images)
    labels = images["labels"] if task == MULTILABEL else None
    images = images[[c for c in META_COLUMNS if c in images.columns]]
    embedded = images["row_id"].isin(set(row_ids)).to_numpy()
    missing = int((~embedded).sum())
    if missing and not allow_partial:
        raise HeadsError(
            f"{missing} of {len(images)} rows of cohort '{cohort}' have no '{model}' vectors under weights "
            f"{weights_id}: the embedding pass did not finish. Finish it with "
            f"`{_embed_command(model, cohort, weights_id)}` (it resumes), or pass --allow-partial to go on without "
            "them (recorded in the run)"
        )
    # images is in row_id order: that order makes every head's inputs (and so its shuffles and predictions)
    # independent of storage order. Vectors of rows the cohort no longer has (a re-import dropped them) are ignored.
    meta = images[embedded].reset_index(drop=True)
    meta = meta.astype(object).where(meta.notna(), None)  # missing is None (pandas 3 reads Lance's nulls as NaN)
    meta["split"] = meta["split"].fillna(NO_SPLIT)  # scored (zero-shot) and recorded as such, never trained on
    position = {r: i for i, r in enumerate(row_ids)}
    table = table.take(pa.array([position[r] for r in meta["row_id"]], pa.int64()))
    vectors = table["vector"].combine_chunks()
    dim = vectors.type.list_size
    X = np.array(vectors.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)  # writable copy
    if not np.isfinite(X).all():
        raise HeadsError(f"non-finite values in '{model}' vectors of cohort '{cohort}' (weights {weights_id}): "
                         f"re-embed with `embedkit embed --model {model} --force`")
    if task == MULTILABEL:
        return _multilabel(model, cohort, weights_id, X, meta, labels[embedded].reset_index(drop=True), missing,
                           embedding_settings_of(store, model, weights_id, cohort))
    classes = cohort_classes(images)
    if len(classes) < 2:
        raise HeadsError(f"cohort '{cohort}' has {len(classes)} distinct label(s); a classifier needs at least 2")
    lookup = {c: i for i, c in enumerate(classes)}
    y = meta["label"].map(lambda v: lookup.get(v, -1) if isinstance(v, str) else -1).to_numpy(dtype=np.int64)
    settings = embedding_settings_of(store, model, weights_id, cohort)
    return CohortVectors(model, cohort, weights_id, classes, X, y, meta, missing, settings)


def embedding_settings_of(store: Store, model: str, weights_id: str, cohort: str) -> dict:
    from embedkit.embed import embedding_settings  # defined once, by the pass that records them

    return embedding_settings(store, model, weights_id, cohort).config()


def _multilabel(model: str, cohort: str, weights_id: str, X: np.ndarray, meta: pd.DataFrame, labels: pd.Series,
                missing: int, settings: dict) -> CohortVectors:
    """The multi-label slice: classes = the cohort's labels in order, Y their 0/1 matrix (docs/multilabel.md)."""
    from embedkit.data.cohort import _split_labels, cohort_labels

    lists = [_split_labels(v) for v in labels]
    classes = cohort_labels(pd.DataFrame({"labels": lists}))
    if len(classes) < 2:
        raise HeadsError(f"cohort '{cohort}' has {len(classes)} distinct label(s); a multi-label head needs at least 2")
    lookup = {c: i for i, c in enumerate(classes)}
    Y = np.zeros((len(lists), len(classes)), dtype=np.float32)
    for i, ls in enumerate(lists):
        Y[i, [lookup[v] for v in ls]] = 1.0
    meta = meta.assign(labels=["|".join(ls) for ls in lists])  # what the run's cohort fingerprint hashes
    return CohortVectors(model, cohort, weights_id, classes, X, np.full(len(lists), -1, dtype=np.int64), meta,
                         missing, settings, MULTILABEL, Y)

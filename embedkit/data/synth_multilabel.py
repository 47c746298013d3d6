"""Synthetic multi-label NIH cohorts: the real metadata's label lists, ages, sexes and views, with a planted
per-label bias, as images or as vectors synthesised directly.

- :func:`multilabel_cohort`: the first ``limit`` images of the metadata as a ``nih`` protocol cohort (all
  findings, patient-level split, :func:`embedkit.data.nih.full_cohort`).
- :func:`synthesize_multilabel`: one X-ray per image with every finding that has a drawn pattern (the six of
  :data:`NIH_CLASSES`) at once; the other eight findings draw nothing. ``signal`` rules scoped to a label
  (``sex=F:signal=0.2:label=Effusion``) weaken that finding alone in the images they select.
- :func:`synthetic_vectors`: vectors standing in for an embedding pass at any width (the 112,120-row benchmark
  cannot embed images on two cores): a row's vector is Gaussian noise plus, for every finding it has, that
  finding's direction times its strength (1, times the factors of the bias rules that select the row and that
  finding or every finding). A weakened finding is a planted under-diagnosis of that group.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from embedkit.constants import NIH_CLASSES, NIH_FINDINGS, RANDOM_INIT_PREFIX
from embedkit.data import nih
from embedkit.data.synth import BiasSpec, SynthError, _selector_values, image_filename, image_seed
from embedkit.store import schemas
from embedkit.store.store import Store, embeddings_table

VECTOR_MODEL = "synthetic-vectors"  # the model name synthesised vectors are stored under
SIGNAL_SCALE = 1.5  # a finding's direction has this norm over the noise's per-dimension unit variance * sqrt(d)/4


def multilabel_cohort(metadata: str | Path | pd.DataFrame, limit: int | None = None) -> pd.DataFrame:
    """The ``nih`` protocol cohort of the first ``limit`` metadata rows (all when None), split by patient."""
    meta = nih.read_metadata(metadata) if not isinstance(metadata, pd.DataFrame) else metadata
    if limit is not None:
        if limit < 1:
            raise SynthError(f"--limit must be at least 1, got {limit}")
        meta = meta.head(int(limit))
    return nih.full_cohort(meta)


def finding_strengths(rows: pd.DataFrame, bias: BiasSpec | None, findings: tuple[str, ...] = NIH_FINDINGS
                      ) -> np.ndarray:
    """[N, F] strengths: 1 where the row has the finding, times the matching ``signal`` rules, 0 elsewhere.

    ``label_noise`` has no multi-label meaning here and is refused.
    """
    have = np.array([[f in set(labels) for f in findings] for labels in rows["labels"]], dtype=np.float64)
    if bias is None:
        return have
    for rule in bias.rules:
        if rule.effect != "signal":
            raise SynthError(f"bias rule {rule}: multi-label cohorts take 'signal' rules only "
                             "(scope one to a finding with ':label=NAME')")
        match = (_selector_values(rows, rule.column) == rule.value).to_numpy()
        columns = [findings.index(rule.label)] if rule.label else list(range(len(findings)))
        for c in columns:
            have[match, c] *= rule.amount
    return have


def synthesize_multilabel(rows: pd.DataFrame, out_dir: str | Path, size: int = 64, seed: int = 0,
                          bias: BiasSpec | None = None, workers: int | None = None) -> pd.DataFrame:
    """Write one PNG per image of ``rows`` (a multi-label cohort frame) into ``out_dir``: every drawn finding at
    its strength. Returns ``image_id, path, biased`` (whether a rule changed a finding the image has)."""
    from embedkit.data import synth

    for rule in bias.rules if bias else ():
        if rule.label is not None and rule.label not in NIH_CLASSES:
            raise SynthError(f"bias rule {rule}: {rule.label} has no drawn pattern (drawn: {', '.join(NIH_CLASSES)})")
    strengths = finding_strengths(rows, bias, NIH_CLASSES)
    plain = finding_strengths(rows, None, NIH_CLASSES)
    folder = Path(out_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / image_filename(i)) for i in rows["image_id"]]
    jobs = []
    for k, row in enumerate(rows.itertuples(index=False)):
        patterns = {c: float(strengths[k, j]) for j, c in enumerate(NIH_CLASSES) if plain[k, j]}
        synth._check_inputs(0, row.age, row.sex, size, 1.0)
        jobs.append((paths[k], 0, int(row.age), str(row.sex), image_seed(seed, row.image_id), int(size), 1.0,
                     patterns))
    n_workers = synth._default_workers(len(jobs)) if workers is None else max(1, int(workers))
    if n_workers == 1 or len(jobs) < 16:
        for job in jobs:
            synth._render_job(job)
    else:
        synth._run_pool(jobs, min(n_workers, len(jobs)))
    biased = (strengths != plain).any(axis=1)
    return pd.DataFrame({"image_id": rows["image_id"].to_numpy(), "path": paths, "biased": biased})


def synthetic_vectors(rows: pd.DataFrame, dim: int = 512, seed: int = 0, bias: BiasSpec | None = None) -> np.ndarray:
    """[N, dim] float32 vectors for ``rows`` (needs ``labels`` and any column a rule selects on); see the module
    docstring. Directions and noise come from ``numpy.random.default_rng(seed)``: same inputs, same vectors."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(NIH_FINDINGS), dim))
    directions *= SIGNAL_SCALE * np.sqrt(dim) / 4 / np.linalg.norm(directions, axis=1, keepdims=True)
    strengths = finding_strengths(rows, bias)
    X = rng.standard_normal((len(rows), dim), dtype=np.float32)
    X += (strengths @ directions).astype(np.float32)
    return X


def write_synthetic_vectors(store: Store, cohort: str, dim: int = 512, seed: int = 0, bias: BiasSpec | None = None,
                            model: str = VECTOR_MODEL) -> str:
    """Synthesise vectors for every row of the stored ``cohort`` and write them as ``model``'s embeddings under
    weights_id ``random-init:<model>:<seed>`` (flagged as not real weights everywhere). Returns the weights_id."""
    from embedkit.data.cohort import load_cohort

    rows = load_cohort(store, cohort)
    X = synthetic_vectors(rows, dim, seed, bias)
    weights_id = f"{RANDOM_INIT_PREFIX}{model}:{seed}"
    n = len(rows)
    table = pa.table({
        "row_id": pa.array(rows["row_id"].to_numpy(dtype=object), pa.string()),
        "cohort": pa.array([cohort] * n, pa.string()),
        "image_id": pa.array(rows["image_id"].to_numpy(dtype=object), pa.string()),
        "model": pa.array([model] * n, pa.string()),
        "weights_id": pa.array([weights_id] * n, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()), dim),
    })
    schema = schemas.embeddings_schema(dim)
    store.upsert(embeddings_table(model), table.cast(schema), ["row_id", "weights_id"], schema)
    return weights_id

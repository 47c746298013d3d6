"""Synthetic stored vectors for the heads tests: 1200 rows (840/120/240), six classes, a planted class signal."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from embedkit.constants import NIH_CLASSES
from embedkit.store import schemas
from embedkit.store.store import Store, embeddings_table, prompts_table

COHORT = "synth"
WEIGHTS = "random-init:test:0"
SPLIT_SIZES = {"train": 140, "val": 20, "test": 40}  # per class: 840 / 120 / 240 in all


def class_means(dim: int, seed: int = 0) -> np.ndarray:
    """One random direction per class, scaled so a linear head separates them well but not perfectly."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(NIH_CLASSES), dim))
    return 2.0 * means / np.linalg.norm(means, axis=1, keepdims=True) * np.sqrt(dim) / 4


def write_vectors(store: Store, model: str, dim: int, weights_id: str = WEIGHTS, seed: int = 0,
                  cohort: str = COHORT) -> dict:
    """Write ``emb_<model>`` rows: label i % 6, splits by position within the class, alternating sex and age."""
    rng = np.random.default_rng(seed + 1)
    means = class_means(dim)
    rows, vectors = [], []
    per_class = sum(SPLIT_SIZES.values())
    for i in range(per_class * len(NIH_CLASSES)):
        c, k = i % len(NIH_CLASSES), i // len(NIH_CLASSES)
        split = "train" if k < 140 else ("val" if k < 160 else "test")
        rows.append({"row_id": f"{cohort}/{i:05d}", "cohort": cohort, "image_id": f"img{i:05d}.png",
                     "model": model, "weights_id": weights_id, "label": NIH_CLASSES[c], "age": 30 + (k % 2) * 40,
                     "age_group": "old" if k % 2 else "young", "sex": "MF"[(k // 2) % 2], "view": "PA",
                     "patient_id": f"p{i}", "split": split})
        vectors.append(means[c] + rng.normal(size=dim))
    X = np.asarray(vectors, dtype=np.float32)
    images = [{name: r.get(name) for name in schemas.IMAGES.names} for r in rows]
    for image in images:
        image["labels"] = [image["label"]]
    # the cohort's rows live in `images` (heads join them); vectors carry only their keys
    store.upsert("images", pa.Table.from_pylist(images, schema=schemas.IMAGES), ["row_id"], schemas.IMAGES)
    table = pa.Table.from_pylist([{k: r[k] for k in ("row_id", "cohort", "image_id", "model", "weights_id")}
                                  for r in rows])
    table = table.append_column("vector", pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), dim))
    schema = schemas.embeddings_schema(dim)
    store.upsert(embeddings_table(model), table, ["row_id", "weights_id"], schema)
    return {"X": X, "labels": np.array([r["label"] for r in rows]), "rows": rows, "means": means}


def write_prompts(store: Store, model: str, vectors_by_class: dict[str, np.ndarray], prompt_set: str,
                  weights_id: str = WEIGHTS) -> None:
    """Write one prompt set: ``vectors_by_class[class]`` is [n_prompts, d]; prompt_index runs over all classes."""
    rows, index = [], 0
    for cls, vecs in vectors_by_class.items():
        for j, v in enumerate(vecs):
            rows.append({"model": model, "weights_id": weights_id, "prompt_set": prompt_set, "class": cls,
                         "prompt_index": index, "prompt": f"{cls} prompt {j}", "vector": np.asarray(v).tolist()})
            index += 1
    dim = len(rows[0]["vector"])
    schema = schemas.prompts_schema(dim)
    store.append(prompts_table(model), pa.Table.from_pylist(rows, schema=schema), schema)


def random_prompts(dim: int, per_class: int = 3, seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.normal(size=(per_class, dim)) for c in NIH_CLASSES}


def write_weights_row(store: Store, model: str, logit_scale: float, rule: str, weights_id: str = WEIGHTS) -> None:
    row = {"model": model, "weights_id": weights_id, "source": "random-init", "embed_dim": 0,
           "logit_scale": logit_scale, "zeroshot_rule": rule, "created_at": None}
    store.upsert("weights", pa.Table.from_pylist([row], schema=schemas.WEIGHTS), ["model", "weights_id"],
                 schemas.WEIGHTS)

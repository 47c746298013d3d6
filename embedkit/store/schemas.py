"""Arrow schemas of the store's tables. One place: every writer and reader uses these.

Keys: ``row_id`` identifies one row of one cohort (``<cohort>/<image_id>``, with ``#k`` appended to the k-th
repeat of an image in a cohort that repeats images, such as nih6x200-paper), so repeated rows survive everywhere.
"""

from __future__ import annotations

import pyarrow as pa

# The label, split and demographic columns of a cohort row (held by `images` alone; see embeddings_schema).
_DEMOGRAPHICS = [
    pa.field("label", pa.string()),
    pa.field("age", pa.int32()),
    pa.field("age_group", pa.string()),
    pa.field("sex", pa.string()),
    pa.field("view", pa.string()),
    pa.field("patient_id", pa.string()),
    pa.field("split", pa.string()),
]

IMAGES = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("cohort", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("labels", pa.list_(pa.string())),
        *_DEMOGRAPHICS,
        pa.field("extra", pa.string()),  # JSON object of source-specific columns
    ]
)

REJECTS = pa.schema(
    [
        pa.field("cohort", pa.string()),
        pa.field("line", pa.int64()),  # 1-based data row of the manifest (header excluded)
        pa.field("image_id", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


def embeddings_schema(dim: int) -> pa.Schema:
    """One embeddings table per model (``emb_<model>``): one row per (row_id, weights_id).

    Labels, splits and demographics are not copied here: readers join ``images`` on row_id (one copy of each
    fact). Tables written before that carry nullable copies of them, which nothing reads.
    """
    return pa.schema(
        [
            pa.field("row_id", pa.string(), nullable=False),
            pa.field("cohort", pa.string()),
            pa.field("image_id", pa.string()),
            pa.field("model", pa.string()),
            pa.field("weights_id", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ]
    )


def prompts_schema(dim: int) -> pa.Schema:
    """One prompt table per model (``prompts_<model>``): one row per (weights_id, prompt_set, class, prompt)."""
    return pa.schema(
        [
            pa.field("model", pa.string()),
            pa.field("weights_id", pa.string()),
            pa.field("prompt_set", pa.string()),
            pa.field("class", pa.string()),
            pa.field("prompt_index", pa.int32()),  # order of the prompt within the set (0-based, over all classes)
            pa.field("prompt", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ]
    )


# GLoRIA's zero-shot needs word x region similarity, which needs the image's local features (19x19x768 per
# image, too large to keep). The embedding pass computes, per image and prompt, the local similarity score and
# stores it here; zero-shot combines it with the global cosine from the stored vectors.
LOCAL_SIMILARITY = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("model", pa.string()),
        pa.field("weights_id", pa.string()),
        pa.field("prompt_set", pa.string()),
        pa.field("similarity", pa.list_(pa.float32())),  # one value per prompt, in prompt_index order
    ]
)

RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model", pa.string()),
        pa.field("weights_id", pa.string()),
        pa.field("method", pa.string()),  # zeroshot | lp | mlp | logreg | lora | ft
        pa.field("cohort", pa.string()),
        pa.field("config", pa.string()),  # JSON: every setting, including "classes" (the class order)
        pa.field("seed", pa.int64()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("code_version", pa.string()),
        pa.field("metrics", pa.string()),  # JSON: summary metrics per split
        pa.field("study_id", pa.string()),
    ]
)

PREDICTIONS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("y_true", pa.int32()),
        pa.field("y_pred", pa.int32()),
        pa.field("probs", pa.list_(pa.float32())),  # softmax, in the run's class order
    ]
)

# One row per (model, weights_id) ever embedded: where the weights came from and what zero-shot needs of them.
WEIGHTS = pa.schema(
    [
        pa.field("model", pa.string()),
        pa.field("weights_id", pa.string()),
        pa.field("source", pa.string()),  # a file/folder path, or "random-init"
        pa.field("embed_dim", pa.int32()),
        pa.field("logit_scale", pa.float64()),  # the multiplier zero-shot applies to cosines
        pa.field("zeroshot_rule", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

# One row per (model, weights_id, cohort) embedded: how its image vectors were computed (embedkit/embed.py).
# Vectors without a row (stores written before passes recorded this), and null columns, read as the old default.
EMBEDDING_SETTINGS = pa.schema(
    [
        pa.field("model", pa.string()),
        pa.field("weights_id", pa.string()),
        pa.field("cohort", pa.string()),
        pa.field("amp", pa.string()),  # none (fp32) | bf16 | fp16: autocast of the image pass on CUDA
        pa.field("preprocess", pa.string()),  # the family's preprocessing (docs/models.md), e.g. study | upstream
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)

# One row per `embedkit study` (keyed by study_id, its name): the matrix and settings it was last run with.
STUDIES = pa.schema(
    [
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("config", pa.string()),  # JSON: models, methods, seeds, settings; "file": the study file's text
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)

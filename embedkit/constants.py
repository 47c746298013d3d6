"""Facts used across embedkit, each stated once: class order, the age boundary, splits, sexes."""

from __future__ import annotations

import math

# NIH ChestX-ray14 classes of the ISBI 2025 study, in alphabetical order (the class index order everywhere).
NIH_CLASSES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Pneumothorax",
)

# The 14 findings of NIH ChestX-ray14 (the multi-label task; "No Finding" is none of them), alphabetical.
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
NO_FINDING = "No Finding"

# One age boundary for every age-group computation (cohorts, SQL views, reports): 60 counts as old.
AGE_OLD_FROM = 60
AGE_GROUPS: tuple[str, ...] = ("young", "old")
AGE_MIN, AGE_MAX = 0, 120  # ages outside this range are input errors

SEXES: tuple[str, ...] = ("M", "F")

# Groups (or a gap's smallest group) under this many rows are flagged in tables and reports: their values swing.
MIN_GROUP_N = 30
SPLITS: tuple[str, ...] = ("train", "val", "test")
# The split a run's predictions record for rows the cohort gives none (zero-shot scores every row; trained heads
# need train and val rows). Never a split of a manifest: import accepts only SPLITS.
NO_SPLIT = "none"
SCORED_SPLITS: tuple[str, ...] = (*SPLITS, NO_SPLIT)

# What a run can be: heads off stored vectors, then fine-tuning regimes streaming images (the CLI's choices too).
HEADS: tuple[str, ...] = ("lp", "mlp", "logreg")
# What a head predicts: one class per image (softmax), or every label of an image's label list (one sigmoid each).
MULTICLASS, MULTILABEL = "multiclass", "multilabel"
TASKS: tuple[str, ...] = (MULTICLASS, MULTILABEL)
FINETUNE_METHODS: tuple[str, ...] = ("lora", "ft")
RUN_METHODS: tuple[str, ...] = ("zeroshot", *HEADS, *FINETUNE_METHODS)
LR_SCHEDULES: tuple[str, ...] = ("cosine", "step", "constant")  # fine-tuning's, stepped once per epoch
AMP_MODES: tuple[str, ...] = ("bf16", "fp16", "none")  # autocast on CUDA: fine-tuning (bf16), the embedding pass (none)
# LoRA presets (docs/heads.md): the study's targets, unscaled update and raw head features, or embedkit's wider layout.
LORA_PRESETS: tuple[str, ...] = ("study", "embedkit")

# Columns of a cohort (one row per image of a cohort; row_id keys repeated images apart).
COHORT_COLUMNS: tuple[str, ...] = (
    "row_id",
    "image_id",
    "path",
    "label",
    "labels",
    "age",
    "age_group",
    "sex",
    "view",
    "patient_id",
    "split",
)

# Manifest CSVs hold a row's list of labels in one cell, joined by this.
LABEL_SEPARATOR = "|"

# The weights_id of weights built by --random-init: random-init:<model>:<seed>. Every table of their numbers says so.
RANDOM_INIT_PREFIX = "random-init:"
RANDOM_WEIGHTS_NOTE = ("ran with random weights (--random-init), not released weights: their numbers test the "
                       "pipeline and say nothing about the released models")

DEFAULT_STORE = "embedkit-store"
STORE_ENV = "EMBEDKIT_STORE"
WEIGHTS_ENV = "EMBEDKIT_WEIGHTS"


def is_random_weights(weights_id: str | None) -> bool:
    """True for weights built by --random-init, never for released weights."""
    return bool(weights_id) and str(weights_id).startswith(RANDOM_INIT_PREFIX)


def age_group(age: float | int | None, old_from: int = AGE_OLD_FROM) -> str | None:
    """Return "old" for ages at or above ``old_from``, "young" below it, None for a missing age."""
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return None
    return "old" if age >= old_from else "young"

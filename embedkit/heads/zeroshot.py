"""Zero-shot classification off the stored image and prompt vectors, by each model family's own rule.

The rule belongs to the family (``spec.family``, see embedkit/models/base.py and docs/models.md): CLIP and
BiomedCLIP scale cosines by the learned logit scale and average a class's prompts; MedCLIP clamps the scale to 100
first; GLoRIA adds the stored local similarity and z-normalises each class column over a FIXED set (every row of
the cohort stored under the weights), which the run config records. This module loads what the rule needs from the
store, calls it, and records the run. Probabilities are the softmax of the class scores.

The logit scale comes from the store's ``weights`` table (written by the embedding pass from the loaded
weights); ``logit_scale=`` overrides it; when neither exists the family's default is used and the config says so.
"""

from __future__ import annotations

import numpy as np

from embedkit.heads import multilabel
from embedkit.heads.vectors import CohortVectors, HeadsError, load_vectors
from embedkit.models.base import ModelFamily
from embedkit.store.runs import record_run, softmax
from embedkit.store.store import Store, prompts_table, sql_eq


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (computed in float64 so cosines do not depend on storage rounding)."""
    x = x.astype(np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def load_prompts(store: Store, model: str, weights_id: str, prompt_set: str | None,
                 default_set: str | None = None) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """The prompt vectors of one set embedded with ``weights_id``: (set, classes, prompt_index [P], vectors [P, d])."""
    table = prompts_table(model)
    hint = f"run `embedkit embed --model {model}` (it embeds the prompt sets too)"
    if not store.has(table):
        raise HeadsError(f"no prompt embeddings for model '{model}' in {store.path} (table {table}): {hint}")
    rows = store.read(table, sql_eq("weights_id", weights_id)).to_pandas()
    if rows.empty:
        raise HeadsError(f"no '{model}' prompt embeddings with weights_id '{weights_id}' (the image vectors' "
                         f"weights; prompts of other weights are never used): {hint}")
    sets = sorted(rows["prompt_set"].unique())
    if prompt_set is None:
        if len(sets) == 1:
            prompt_set = sets[0]
        elif default_set in sets:
            prompt_set = default_set
        else:
            raise HeadsError(f"model '{model}' has several prompt sets {sets}: choose one with --prompt-set")
    if prompt_set not in sets:
        raise HeadsError(f"no prompt set '{prompt_set}' for '{model}' (weights {weights_id}); stored sets: {sets}. "
                         f"Embed it with `embedkit embed --model {model} --prompts {prompt_set}`")
    rows = rows[rows["prompt_set"] == prompt_set].sort_values("prompt_index")
    vectors = np.stack(rows["vector"].to_numpy()).astype(np.float32)
    return prompt_set, rows["class"].tolist(), rows["prompt_index"].to_numpy(np.int64), vectors


def resolve_logit_scale(store: Store, model: str, weights_id: str, family: ModelFamily,
                        override: float | None = None) -> tuple[float, str]:
    """(multiplier applied to cosines, where it came from): --logit-scale, else the weights table, else default."""
    if override is not None:
        scale, source = float(override), "--logit-scale"
    else:
        scale = family.default_logit_scale
        source = f"default for rule {family.zeroshot_rule} (no weights row in the store)"
        if store.has("weights"):
            found = store.read("weights", f"{sql_eq('model', model)} AND {sql_eq('weights_id', weights_id)}",
                               ["logit_scale"])["logit_scale"].to_pylist()
            found = [v for v in found if v is not None]
            if found:
                scale, source = float(found[0]), "weights table (recorded by the embedding pass)"
    scale, source = family.logit_scale(scale, source)
    if not np.isfinite(scale) or scale <= 0:
        raise HeadsError(f"logit scale {scale} ({source}) must be a positive number")
    return scale, source


def _load_local_similarity(store: Store, vectors: CohortVectors, prompt_set: str, n_prompts: int) -> np.ndarray:
    """The stored per (row, prompt) local similarity (GLoRIA's), aligned with ``vectors`` rows: [N, P]."""
    from embedkit.embed import localsim_table  # the table name is defined once, by its writer

    table = localsim_table(vectors.model)
    hint = f"run `embedkit embed --model {vectors.model} --cohort {vectors.cohort}` (it stores them for this model)"
    if not store.has(table):
        raise HeadsError(f"no local similarities for '{vectors.model}' (table {table}): {hint}")
    where = f"{sql_eq('weights_id', vectors.weights_id)} AND {sql_eq('prompt_set', prompt_set)}"
    data = store.read(table, where, ["row_id", "similarity"])
    position = {r: i for i, r in enumerate(data["row_id"].to_pylist())}
    missing = [r for r in vectors.row_ids if r not in position]
    if missing:
        raise HeadsError(f"{len(missing)} rows of cohort '{vectors.cohort}' have no stored local similarity for "
                         f"prompt set '{prompt_set}' (e.g. {missing[0]}): {hint} --force")
    take = np.array([position[r] for r in vectors.row_ids])
    sims = data["similarity"].to_pylist()
    local = np.array([sims[i] for i in take], dtype=np.float64)
    if local.shape != (vectors.n, n_prompts):
        raise HeadsError(f"stored local similarities have shape {local.shape}, expected ({vectors.n}, {n_prompts}) "
                         f"for prompt set '{prompt_set}': {hint} --force")
    return local


def class_scores(family: ModelFamily, image: np.ndarray, prompts: np.ndarray, prompt_class: np.ndarray,
                 n_classes: int, logit_scale: float, ensemble: str, local_sim: np.ndarray | None = None) -> np.ndarray:
    """Class scores [N, C] of ``image`` vectors against ``prompts`` [P, d] by the family's rule."""
    return family.class_scores(_unit(image), _unit(prompts), prompt_class, n_classes, logit_scale, ensemble,
                               local_sim)


def run_zeroshot(store: Store, model: str, cohort: str | None = None, weights_id: str | None = None,
                 prompt_set: str | None = None, ensemble: str | None = None, logit_scale: float | None = None,
                 study_id: str | None = None, allow_partial: bool = False, task: str | None = None,
                 threshold_rule: str = multilabel.MAX_F1) -> dict:
    """Score every row of the cohort zero-shot and record the run; returns the ``runs`` row.

    ``ensemble`` (how a class's prompts combine) defaults to the family's first; a family with one refuses others.
    ``task`` (default: the cohort's) multilabel scores each label by its (positive, negative) prompt pair
    (:func:`run_zeroshot_multilabel`).
    """
    from embedkit.models.registry import get_spec

    family = get_spec(model).family
    ensemble = ensemble or family.ensembles[0]
    if ensemble not in family.ensembles:
        raise HeadsError(f"--ensemble {ensemble}: the {family.zeroshot_rule} rule combines a class's prompts by "
                         f"{' or '.join(family.ensembles)}")
    multilabel.check_task(task)
    vectors = load_vectors(store, model, cohort, weights_id, allow_partial, task)
    if vectors.task == multilabel.MULTILABEL:
        return run_zeroshot_multilabel(store, vectors, family, prompt_set, ensemble, logit_scale, study_id,
                                       threshold_rule)
    prompt_set, prompt_classes, prompt_index, prompt_vecs = load_prompts(
        store, model, vectors.weights_id, prompt_set, family.prompt_sets[0])
    if prompt_vecs.shape[1] != vectors.dim:
        raise HeadsError(f"prompt vectors have width {prompt_vecs.shape[1]} but image vectors {vectors.dim}: "
                         f"re-embed model '{model}' (`embedkit embed --model {model} --force`)")
    lookup = {c: i for i, c in enumerate(vectors.classes)}
    absent = [c for c in vectors.classes if c not in prompt_classes]
    if absent:
        raise HeadsError(f"prompt set '{prompt_set}' has no prompts for class(es) {absent} of cohort "
                         f"'{vectors.cohort}': choose another --prompt-set or embed one that covers every class")
    used = np.array([c in lookup for c in prompt_classes])  # prompts of classes outside the cohort are unused
    prompt_class = np.array([lookup[c] for c, u in zip(prompt_classes, used) if u], dtype=np.int64)
    per_class = {c: int(np.sum(prompt_class == i)) for i, c in enumerate(vectors.classes)}
    try:
        family.check_prompts(prompt_set, per_class)
    except ValueError as exc:
        raise HeadsError(f"prompt set '{prompt_set}': {exc}") from None
    local, scale, config = _scoring(store, vectors, family, prompt_set, prompt_classes, used, per_class, ensemble,
                                    logit_scale, study_id)
    scores = class_scores(family, vectors.X, prompt_vecs[used], prompt_class, len(vectors.classes), scale,
                          ensemble, local)
    config["probabilities"] = "softmax of the class scores"
    return record_run(store, vectors, "zeroshot", config, None, softmax(scores), scores.argmax(axis=1))


def _scoring(store: Store, vectors: CohortVectors, family: ModelFamily, prompt_set: str, prompt_classes,
             used: np.ndarray, per_class: dict, ensemble: str, logit_scale: float | None,
             study_id: str | None) -> tuple[np.ndarray | None, float, dict]:
    """What both zero-shot rules share: the stored local similarities of the used prompts (families that score
    with them; else None), the logit scale, and the run's config (study_id copied to the runs row by make_run)."""
    local = None
    if family.uses_local_similarity:
        local = _load_local_similarity(store, vectors, prompt_set, len(prompt_classes))[:, used]
    scale, scale_source = resolve_logit_scale(store, vectors.model, vectors.weights_id, family, logit_scale)
    scored_rows = (f"all {vectors.n} rows of cohort '{vectors.cohort}' stored for weights_id "
                   f"'{vectors.weights_id}' (all splits)")
    config = {
        "rule": family.zeroshot_rule,
        "prompt_set": prompt_set,
        "prompts_per_class": per_class,
        "prompt_classes_unused": sorted({c for c, u in zip(prompt_classes, used) if not u}),
        **family.zeroshot_settings(ensemble, scale, scale_source, scored_rows),
        **({"study_id": study_id} if study_id else {}),
    }
    return local, scale, config


def run_zeroshot_multilabel(store: Store, vectors: CohortVectors, family: ModelFamily, prompt_set: str | None,
                            ensemble: str, logit_scale: float | None, study_id: str | None,
                            threshold_rule: str) -> dict:
    """Multi-label zero-shot: every label's probability is the softmax over its (positive, negative) prompt pair
    of the family's own prompt scores (:meth:`ModelFamily.label_probabilities`; CheXzero's is the authors' rule),
    off a pair set (``pairs``, or the family's ``multilabel_prompt_sets``); recorded by the multi-label contract."""
    multilabel.parse_threshold_rule(threshold_rule)
    model = vectors.model
    prompt_set, prompt_classes, _, prompt_vecs = load_prompts(store, model, vectors.weights_id, prompt_set,
                                                              family.multilabel_prompt_sets[0])
    if prompt_vecs.shape[1] != vectors.dim:
        raise HeadsError(f"prompt vectors have width {prompt_vecs.shape[1]} but image vectors {vectors.dim}: "
                         f"re-embed model '{model}' (`embedkit embed --model {model} --force`)")
    absent = [c for c in vectors.classes if c not in prompt_classes]
    if absent:
        raise HeadsError(f"prompt set '{prompt_set}' has no prompts for label(s) {absent} of cohort "
                         f"'{vectors.cohort}': embed the cohort's pair set (`embedkit embed --model {model} "
                         f"--cohort {vectors.cohort}` embeds '{family.multilabel_prompt_sets[0]}' for its labels)")
    lookup = {c: i for i, c in enumerate(vectors.classes)}
    used = np.array([c in lookup for c in prompt_classes])
    prompt_class = np.array([lookup[c] for c, u in zip(prompt_classes, used) if u], dtype=np.int64)
    per_label = {c: int(np.sum(prompt_class == i)) for i, c in enumerate(vectors.classes)}
    odd = {c: n for c, n in per_label.items() if n != 2}
    if odd:
        raise HeadsError(f"prompt set '{prompt_set}': multi-label zero-shot needs one (positive, negative) prompt "
                         f"pair per label, positive first; prompts per label here: {odd}. Use --prompt-set "
                         f"{family.multilabel_prompt_sets[0]}")
    local, scale, config = _scoring(store, vectors, family, prompt_set, prompt_classes, used, per_label, ensemble,
                                    logit_scale, study_id)
    probs = family.label_probabilities(_unit(vectors.X), _unit(prompt_vecs[used]), prompt_class,
                                       len(vectors.classes), scale, ensemble, local)
    config["label_rule"] = "per label, softmax over its (positive, negative) prompt pair of the rule's prompt scores"
    return multilabel.record_multilabel_run(store, vectors, "zeroshot", config, None, None, None, threshold_rule,
                                            probs=probs)

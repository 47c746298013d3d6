"""Zero-shot classification off the stored image and prompt vectors, by each model's own rule (MODELS.md).

- ``scaled_cosine`` (CLIP, BiomedCLIP): logits = logit_scale * cos(image, prompt) for every prompt; a class's
  score is the MEAN of its prompts' logits (``--ensemble max``: the max). This is the mean of per-prompt logits,
  not the cosine with a re-normalised class-mean prompt embedding; with one prompt per class both coincide.
- ``medclip``: exp(clamped logit_scale) * cos(image, prompt) per prompt, then mean over the class's prompts
  (the authors' ``ensemble=True``) or max. The multiplier is clamped to at most 100, as the authors clamp.
- ``gloria``: (global cosine + stored local similarity) / 2, max over the class's prompts, then each class
  column z-normalised over a FIXED set: every row of the cohort stored under that weights_id (all splits).
  Scoring a subset alone would give different scores; the run config records the set.
Probabilities are the softmax of the class scores.

The logit scale comes from the store's ``weights`` table (written by the embedding pass from the loaded
weights); ``logit_scale=`` overrides it; when neither exists the rule's default is used and the config says so.
"""

from __future__ import annotations

import numpy as np

from embedkit.heads.vectors import CohortVectors, HeadsError, load_vectors
from embedkit.store.runs import record_run, softmax
from embedkit.store.store import Store, prompts_table, sql_eq

RULES = ("scaled_cosine", "medclip", "gloria")
DEFAULT_LOGIT_SCALE = {"scaled_cosine": 100.0, "medclip": 100.0, "gloria": 1.0}
MEDCLIP_SCALE_MAX = 100.0  # exp(log 100): the MedCLIP authors' clamp


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


def resolve_logit_scale(store: Store, model: str, weights_id: str, rule: str,
                        override: float | None = None) -> tuple[float, str]:
    """(multiplier applied to cosines, where it came from): --logit-scale, else the weights table, else default."""
    if override is not None:
        scale, source = float(override), "--logit-scale"
    else:
        scale, source = DEFAULT_LOGIT_SCALE[rule], f"default for rule {rule} (no weights row in the store)"
        if store.has("weights"):
            found = store.read("weights", f"{sql_eq('model', model)} AND {sql_eq('weights_id', weights_id)}",
                               ["logit_scale"])["logit_scale"].to_pylist()
            found = [v for v in found if v is not None]
            if found:
                scale, source = float(found[0]), "weights table (recorded by the embedding pass)"
    if rule == "medclip" and scale > MEDCLIP_SCALE_MAX:
        scale, source = MEDCLIP_SCALE_MAX, source + ", clamped to 100 as the MedCLIP authors do"
    if not np.isfinite(scale) or scale <= 0:
        raise HeadsError(f"logit scale {scale} ({source}) must be a positive number")
    return scale, source


def _load_local_similarity(store: Store, vectors: CohortVectors, prompt_set: str, n_prompts: int) -> np.ndarray:
    """GLoRIA's stored per (row, prompt) local similarity, aligned with ``vectors`` rows: [N, P]."""
    from embedkit.embed import localsim_table  # the table name is defined once, by its writer

    table = localsim_table(vectors.model)
    hint = f"run `embedkit embed --model {vectors.model} --cohort {vectors.cohort}` (it stores them for GLoRIA)"
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


def class_scores(rule: str, image: np.ndarray, prompts: np.ndarray, prompt_class: np.ndarray, n_classes: int,
                 logit_scale: float, ensemble: str = "mean", local_sim: np.ndarray | None = None) -> np.ndarray:
    """Class scores [N, C] of ``image`` vectors against ``prompts`` [P, d] by ``rule`` (see module docstring)."""
    cosine = _unit(image) @ _unit(prompts).T  # [N, P]
    if rule == "gloria":
        from embedkit.models.gloria import zeroshot_scores  # the authors' rule lives with the model family

        if local_sim is None:
            raise ValueError("the gloria rule needs the stored local similarities")
        return np.asarray(zeroshot_scores(cosine, local_sim, prompt_class, n_classes), dtype=np.float64)
    if rule not in RULES:
        raise HeadsError(f"unknown zero-shot rule '{rule}'; known: {RULES}")
    if ensemble not in ("mean", "max"):
        raise HeadsError(f"--ensemble must be mean or max, not '{ensemble}'")
    logits = logit_scale * cosine
    reduce = np.mean if ensemble == "mean" else np.max
    return np.stack([reduce(logits[:, prompt_class == c], axis=1) for c in range(n_classes)], axis=1)


def run_zeroshot(store: Store, model: str, cohort: str | None = None, weights_id: str | None = None,
                 prompt_set: str | None = None, ensemble: str = "mean", logit_scale: float | None = None,
                 study_id: str | None = None, allow_partial: bool = False) -> dict:
    """Score every row of the cohort zero-shot and record the run; returns the ``runs`` row."""
    from embedkit.models.prompts import DEFAULT_SET
    from embedkit.models.registry import get_spec

    spec = get_spec(model)
    rule = spec.zeroshot_rule
    vectors = load_vectors(store, model, cohort, weights_id, allow_partial)
    prompt_set, prompt_classes, prompt_index, prompt_vecs = load_prompts(
        store, model, vectors.weights_id, prompt_set, DEFAULT_SET.get(spec.prompt_style))
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
    local = None
    if rule == "gloria":
        local = _load_local_similarity(store, vectors, prompt_set, len(prompt_classes))[:, used]
        ensemble = "max"  # GLoRIA's rule: max over a class's prompts
    scale, scale_source = resolve_logit_scale(store, model, vectors.weights_id, rule, logit_scale)
    scores = class_scores(rule, vectors.X, prompt_vecs[used], prompt_class, len(vectors.classes), scale,
                          ensemble, local)
    config = {
        "rule": rule,
        "prompt_set": prompt_set,
        "prompts_per_class": {c: int(np.sum(prompt_class == i)) for i, c in enumerate(vectors.classes)},
        "prompt_classes_unused": sorted({c for c, u in zip(prompt_classes, used) if not u}),
        "ensemble": ensemble,
        "class_score": {
            "scaled_cosine": f"{ensemble} over the class's prompts of logit_scale * cosine (per-prompt logits)",
            "medclip": f"{ensemble} over the class's prompts of min(logit_scale, 100) * cosine",
            "gloria": "max over the class's prompts of (global cosine + local similarity) / 2, z-normalised",
        }[rule],
        "logit_scale": scale if rule != "gloria" else None,
        "logit_scale_source": scale_source if rule != "gloria" else "not used: GLoRIA z-normalises instead",
        "probabilities": "softmax of the class scores",
        **({"study_id": study_id} if study_id else {}),  # make_run copies it to the runs row
    }
    if rule == "gloria":
        config["znorm_set"] = (f"all {vectors.n} rows of cohort '{vectors.cohort}' stored for weights_id "
                               f"'{vectors.weights_id}' (all splits), population std per class column")
    return record_run(store, vectors, "zeroshot", config, None, softmax(scores), scores.argmax(axis=1))

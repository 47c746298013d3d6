"""A study's plan: every step (cohort, embeddings, heads, fine-tunes) in order, with its status and a time estimate.

A step is done when the study holds a run with the same step key (method | model | weights_id | seed | hash of the
settings that decide the result); the key is rebuilt from each stored run's own row, so nothing else records it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from embedkit.data.build import SYNTHETIC_COHORT, SYNTHETIC_MANIFEST
from embedkit.data.nih import SHIPPED_PROTOCOLS
from embedkit.device import has_gpu
from embedkit.store.store import Store, embeddings_table, sql_eq
from embedkit.study.config import GPU_METHODS, HEAD_METHODS, SEED_INIT, StudyConfig

# ---- the speed table: rough time estimates (labelled as estimates wherever shown) -------------------------
# A model's embedding speed is its spec's ``embed_rate`` (embedkit/models/registry.py); the rest are here.
TRAIN_COST = 2.5  # a training image (augmentation, forward, backward) costs a few forward passes
LOAD_SECONDS = {False: 10.0, True: 3.0}  # building or loading one model (full size, tiny)
HEAD_SECONDS = 2.0  # a head off stored vectors: seconds whatever the model
PROBE_ROWS_PER_SECOND = 50_000.0  # lp/mlp training rows per second on stored vectors (CPU)
SYNTH_RATE = 40.0  # synthetic X-rays drawn per second (2 cores)
IMPORT_RATE = 150.0  # images verified (opened and decoded) per second on import


# ---- steps -------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One unit of a study's work. ``status``: done | todo | skipped | blocked (``note`` says why)."""

    kind: str  # cohort | embed | zeroshot | lp | mlp | lora | ft
    model: str | None = None
    seed: int | None = None
    weights_id: str | None = None  # None: known once the model is embedded (real weights never seen before)
    key: str = ""
    status: str = "todo"
    note: str = ""
    estimate_s: float | None = None  # rough; None where the cohort's size is unknown
    run_id: str | None = None  # the run that completes it (run steps)
    seconds: float | None = None  # measured, when it ran in this call

    def label(self) -> str:
        """What the step does, in words (``lp tiny-clip seed 77``)."""
        if self.kind == "cohort":
            return self.key.replace("|", " ")
        text = f"{self.kind} {self.model}"
        return text + (f" seed {self.seed}" if self.seed is not None else "")

    def to_json(self) -> dict:
        return asdict(self)


def _settings_of(method: str, cohort: str, epochs: int | None) -> dict:
    """The settings that decide a run's result besides model, weights and seed (hashed into the step key)."""
    return {"cohort": cohort} if method == "zeroshot" else {"cohort": cohort, "epochs": epochs}


def step_key(method: str, model: str, weights_id: str | None, seed: int | None, settings: dict) -> str:
    """``lp|tiny-clip|random-init:tiny-clip:0|seed=77|<hash of settings>``: equal keys, the same run."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{method}|{model}|{weights_id or '?'}|seed={'-' if seed is None else seed}|{digest}"


def step_settings(config: StudyConfig, method: str) -> dict:
    """The settings hashed into the key of ``method``'s steps in this study."""
    epochs = config.ft_epochs if method in GPU_METHODS else config.probe_epochs
    return _settings_of(method, config.cohort, epochs)


def study_runs(store: Store, study: str) -> dict[str, str]:
    """{step key: run_id} of the runs the study already holds (keys rebuilt from each run's own row)."""
    from embedkit.store.runs import select_runs

    out: dict[str, str] = {}
    for row in select_runs(store, study=study).to_pylist():
        config = json.loads(row["config"] or "{}")
        settings = _settings_of(row["method"], row["cohort"], config.get("epochs"))
        out.setdefault(step_key(row["method"], row["model"], row["weights_id"], row["seed"], settings), row["run_id"])
    return out


def synthetic_images_dir(store: Store) -> Path:
    """Where a study draws the synthetic cohort's X-rays: beside the store's tables."""
    return Path(store.path) / "synthetic-images"


# ---- what exists -------------------------------------------------------------------------------------------


@dataclass
class _CohortFacts:
    imported: bool
    rows: int | None  # cohort rows (None: unknown until imported)
    train: int | None
    val: int | None
    images: int | None  # distinct images (forward passes of one embedding)
    row_ids: set[str] | None = None


def _cohort_facts(store: Store, config: StudyConfig) -> _CohortFacts:
    from embedkit.data.cohort import cohort_names, load_cohort

    if config.cohort in cohort_names(store):
        rows = load_cohort(store, config.cohort)
        return _CohortFacts(True, len(rows), int((rows["split"] == "train").sum()),
                            int((rows["split"] == "val").sum()), int(rows["path"].nunique()), set(rows["row_id"]))
    if config.cohort in SHIPPED_PROTOCOLS or config.cohort == SYNTHETIC_COHORT:
        from embedkit.data.nih import shipped_manifest  # not imported yet: its size comes from the manifest

        rows = shipped_manifest(SYNTHETIC_MANIFEST if config.cohort == SYNTHETIC_COHORT else config.cohort)
        return _CohortFacts(False, len(rows), int((rows["split"] == "train").sum()),
                            int((rows["split"] == "val").sum()), int(rows["image_id"].nunique()))
    return _CohortFacts(False, None, None, None, None)


def _cohort_plan(config: StudyConfig, facts: _CohortFacts, store: Store) -> Step:
    """The cohort step: done, what will make it, or blocked with the `embedkit data` command to run."""
    step = Step("cohort", key=f"cohort|{config.cohort}")
    if facts.imported:
        step.status, step.note = "done", f"'{config.cohort}' imported ({facts.rows} rows)"
        return step
    if config.cohort == SYNTHETIC_COHORT:
        step.note = (f"synthesise '{SYNTHETIC_COHORT}' ({facts.images} X-rays from the shipped {SYNTHETIC_MANIFEST} "
                     f"manifest) into {synthetic_images_dir(store)}")
        step.estimate_s = facts.images / SYNTH_RATE
    elif config.cohort in SHIPPED_PROTOCOLS and config.images:
        step.note = f"import '{config.cohort}' from {config.images} (shipped manifest, every image verified)"
        step.estimate_s = facts.images / IMPORT_RATE
    elif config.cohort in SHIPPED_PROTOCOLS:
        step.status = "blocked"
        step.note = (f"cohort '{config.cohort}' is not in the store: pass --images DIR (the NIH PNGs), or run "
                     f"`embedkit data nih --protocol {config.cohort} --images DIR` first")
    else:
        step.status = "blocked"
        step.note = (f"cohort '{config.cohort}' is not in the store: import it first with `embedkit data import "
                     f"MANIFEST.csv --cohort {config.cohort} --images DIR` (or `embedkit data synth --name "
                     f"{config.cohort} ...`), or use --cohort nih6x200 / nih6x200-paper / synthetic")
    return step


def _known_weights(store: Store, config: StudyConfig, model: str) -> tuple[str | None, str | None, str | None]:
    """(weights_id if known without loading, the weights' source, why the model cannot run: None if it can)."""
    from embedkit.models.registry import get_spec, random_init_id

    spec = get_spec(model)
    if config.random_init:
        return random_init_id(model, SEED_INIT), "random-init", None
    if spec.tiny:
        return None, None, f"'{model}' is a test configuration with no released weights: use --random-init"
    path = spec.find_weights(config.weights_dir)
    if path is None:
        where = Path(config.weights_dir) / model if config.weights_dir else None
        return None, None, (spec.missing_message(where) + f" A study looks in --weights-dir DIR/{model}/ "
                            f"(or $EMBEDKIT_WEIGHTS/{model}/).")
    if store.has("weights"):
        # The embedding pass recorded which content hash it loaded from this path: no need to hash it again.
        rows = store.read("weights", f"{sql_eq('model', model)} AND {sql_eq('source', str(path))}").to_pylist()
        if rows:
            return max(rows, key=lambda r: r["created_at"])["weights_id"], str(path), None
    return None, str(path), None


def _embedded(store: Store, model: str, weights_id: str | None, config: StudyConfig,
              facts: _CohortFacts) -> tuple[bool, str | None]:
    """(every cohort row has a vector for these weights and the prompts are there, why the stored vectors do not
    suit this study: computed with other amp / preprocess settings, or None)."""
    from embedkit.embed import EmbeddingSettings, embedding_settings
    from embedkit.store.store import prompts_table

    if weights_id is None or not facts.imported or not store.has(embeddings_table(model)):
        return False, None
    where = f"{sql_eq('weights_id', weights_id)} AND {sql_eq('cohort', config.cohort)}"
    have = set(store.read(embeddings_table(model), where, ["row_id"])["row_id"].to_pylist())
    if not have:
        return False, None
    stored = embedding_settings(store, model, weights_id, config.cohort)
    wanted = EmbeddingSettings(config.amp, config.preprocessing_of(model))
    if not stored.same_as(wanted):
        return False, (f"the stored {model} vectors ({weights_id}, cohort {config.cohort}) were computed with "
                       f"{stored.describe()}, and this study asks for {wanted.describe()}: re-embed them with "
                       f"`embedkit embed --model {model} --cohort {config.cohort} --force --amp {wanted.amp} "
                       f"--preprocess {wanted.preprocess}`, or run the study with the stored settings")
    return facts.row_ids <= have and store.count(prompts_table(model), sql_eq("weights_id", weights_id)) > 0, None


def _rate(model: str, gpu: bool) -> float:
    from embedkit.models.registry import get_spec

    cpu_rate, gpu_rate = get_spec(model).embed_rate
    return gpu_rate if gpu else cpu_rate


def _estimate(step: Step, config: StudyConfig, facts: _CohortFacts, gpu: bool) -> float | None:
    from embedkit.models.registry import get_spec

    if step.kind in ("zeroshot",):
        return HEAD_SECONDS
    if step.kind in ("lp", "mlp"):
        return HEAD_SECONDS + (config.probe_epochs * (facts.train or 0)) / PROBE_ROWS_PER_SECOND
    if facts.images is None:
        return None
    rate = _rate(step.model, gpu)
    load = LOAD_SECONDS[get_spec(step.model).tiny]
    if step.kind == "embed":
        return load + facts.images / rate
    per_epoch = ((facts.train or 0) * TRAIN_COST + (facts.val or 0)) / rate  # training pass + validation loss
    return load + config.ft_epochs * per_epoch + facts.images / rate  # + predicting every row once


# ---- the plan ----------------------------------------------------------------------------------------------


def plan_study(store: Store, config: StudyConfig, gpu: bool | None = None) -> list[Step]:
    """Every step of the study in order with its status (done / todo / skipped / blocked) and a rough estimate.

    ``gpu``: whether the steps will find a CUDA device (None: this machine's, ``has_gpu``; the Ray executor passes
    whether its cluster reports GPUs)."""
    facts = _cohort_facts(store, config)
    existing = study_runs(store, config.name)
    where = "here" if gpu is None else "on the Ray cluster"
    gpu = has_gpu(config.device) if gpu is None else gpu and config.device != "cpu"
    steps = [_cohort_plan(config, facts, store)]
    cohort_blocked = steps[0].status == "blocked"
    weights: dict[str, str | None] = {}
    blocked_models: dict[str, str] = {}
    for model in config.models:
        weights_id, source, problem = _known_weights(store, config, model)
        weights[model] = weights_id
        step = Step("embed", model, None, weights_id, f"embed|{model}|{weights_id or source}|{config.cohort}")
        done, problem = (False, problem) if problem else _embedded(store, model, weights_id, config, facts)
        if problem:
            step.status, step.note = "blocked", problem
            blocked_models[model] = f"waits for 'embed {model}', which is blocked"
        elif done:
            step.status, step.note = "done", f"weights_id {weights_id}"
        else:
            step.note = (f"weights_id {weights_id}" if weights_id else
                         f"loads and hashes the weights in {source}")
            if cohort_blocked:
                blocked_models[model] = "waits for the cohort"
        steps.append(step)

    def run_step(method: str, model: str, seed: int | None) -> Step:
        key = step_key(method, model, weights[model], seed, step_settings(config, method))
        step = Step(method, model, seed, weights[model], key)
        if weights[model] is not None and key in existing:
            step.status, step.run_id = "done", existing[key]
        elif model in blocked_models:
            step.status, step.note = "blocked", blocked_models[model]
        elif method in GPU_METHODS and not gpu and not config.cpu_ok:
            step.status = "skipped"
            step.note = (f"{method} needs a GPU (device {config.device}: no CUDA device {where}); pass --cpu-ok to "
                         f"run it on the CPU anyway (slow at full size)")
        elif weights[model] is None:
            step.note = "weights_id known once the model is embedded"
        return step

    for model in config.models:  # heads first: seconds each, off the stored vectors
        for method in (m for m in HEAD_METHODS if m in config.methods):
            for seed in ([None] if method == "zeroshot" else config.seeds):
                steps.append(run_step(method, model, seed))
    for model in config.models:  # then the regimes that stream images through the tower
        for method in (m for m in GPU_METHODS if m in config.methods):
            for seed in config.seeds:
                steps.append(run_step(method, model, seed))
    for step in steps:
        if step.status in ("todo", "skipped") and step.estimate_s is None and step.kind != "cohort":
            step.estimate_s = _estimate(step, config, facts, gpu or step.kind in HEAD_METHODS)
    return steps

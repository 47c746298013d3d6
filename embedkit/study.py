"""`embedkit study`: the paper's whole experiment matrix (models x regimes x seeds) as one resumable command.

A study is named (its ``study_id`` is the name). Running it works out what is missing, in order:

1. the cohort: imported? (``nih6x200`` / ``nih6x200-paper`` are imported from ``images``; ``synthetic`` is drawn
   from the shipped nih6x200 manifest into ``<store>/synthetic-images``; anything else must be imported first);
2. each model embedded with the study's weights for every cohort row;
3. the heads off the stored vectors: zero-shot once per model (it has no seed), lp and mlp per seed;
4. LoRA and full fine-tuning per model and seed (GPU regimes: skipped on a CPU-only machine unless ``cpu_ok``).

Every run a study makes carries ``study_id``; a step is done when the study holds a run with the same step key
(method | model | weights_id | seed | hash of the settings that decide the result). Runs are written atomically
(predictions first, then the ``runs`` row that makes them visible) and embedding resumes by itself, so a killed
study leaves no half-done step visible and a re-run does only what is missing. Fine-tuning steps get a
deterministic run id, so a killed fine-tune continues from its last checkpointed epoch.

When every step is done, the report of exactly this matrix is written (:func:`embedkit.report.build_report`).
The ``studies`` table records each study's matrix and settings (and the study file's text, when one was given).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from embedkit.errors import EmbedkitError
from embedkit.store.store import Store, embeddings_table, sql_eq

PAPER_MODELS = ("clip", "biomedclip", "medclip-rn50", "medclip-vit", "gloria")
STUDY_METHODS = ("zeroshot", "lp", "mlp", "lora", "ft")
HEAD_METHODS = ("zeroshot", "lp", "mlp")
GPU_METHODS = ("lora", "ft")  # stream images through the tower for every epoch: days on a CPU at full size
RUN_KINDS = HEAD_METHODS + GPU_METHODS
SYNTHETIC_COHORT = "synthetic"
NIH_SHIPPED = ("nih6x200", "nih6x200-paper")
SEED_INIT = 0  # seed of --random-init weights (the same architecture draw for every regime and seed)
# A study's runs must stay comparable: these settings are fixed once the study exists (it may grow by models,
# methods and seeds; anything else is a new study).
FIXED_SETTINGS = ("cohort", "random_init", "probe_epochs", "ft_epochs")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# ---- rough time estimates (labelled as estimates wherever shown) -------------------------------------------
# Images/s of one embedding pass (forward only): (2 CPU cores, one GPU). ViT-B/16 embeds ~4-5 images/s on 2 cores.
EMBED_RATE = {"clip": (5.0, 600.0), "biomedclip": (5.0, 600.0), "medclip-rn50": (6.0, 800.0),
              "medclip-vit": (4.0, 500.0), "gloria": (2.0, 300.0)}
TINY_RATE = (45.0, 1000.0)
TRAIN_COST = 2.5  # a training image (augmentation, forward, backward) costs a few forward passes
LOAD_SECONDS = {False: 10.0, True: 3.0}  # building or loading one model (full size, tiny)
HEAD_SECONDS = 2.0  # a head off stored vectors: seconds whatever the model
PROBE_ROWS_PER_SECOND = 50_000.0  # lp/mlp training rows per second on stored vectors (CPU)
SYNTH_RATE = 40.0  # synthetic X-rays drawn per second (2 cores)
IMPORT_RATE = 150.0  # images verified (opened and decoded) per second on import


class StudyError(EmbedkitError):
    """A study's settings, file or preconditions are wrong; the message says how to fix them."""


# ---- configuration ------------------------------------------------------------------------------------------


@dataclass
class StudyConfig:
    """Everything that defines a study (the same keys as the CLI options and the study file)."""

    name: str = "study"
    models: tuple[str, ...] = PAPER_MODELS
    methods: tuple[str, ...] = STUDY_METHODS
    cohort: str = "nih6x200"
    seeds: tuple[int, ...] = (77, 78, 79)
    random_init: bool = False
    weights_dir: str | None = None  # else $EMBEDKIT_WEIGHTS; one sub-folder per model
    device: str = "auto"
    cpu_ok: bool = False
    probe_epochs: int = 100
    ft_epochs: int = 100
    images: str | None = None  # the NIH PNGs, to import nih6x200 / nih6x200-paper when the store lacks it
    report: str | None = None  # report folder; default <store>/../study-<name>
    ci: int = 1000  # bootstrap resamples of the report's intervals
    workers: int = 2  # DataLoader workers of the embedding and fine-tuning passes
    file_text: str | None = field(default=None, repr=False)  # the study file, stored with the study

    def __post_init__(self) -> None:
        self.models = _names(self.models, "models")
        self.methods = _names(self.methods, "methods")
        self.seeds = _seeds(self.seeds)
        for key in ("weights_dir", "images", "report"):
            value = getattr(self, key)
            setattr(self, key, str(value) if value not in (None, "") else None)
        if self.weights_dir:
            # Absolute: the weights table records the path it loaded from, and later calls look it up by path.
            self.weights_dir = str(Path(self.weights_dir).expanduser().resolve())

    def validate(self) -> None:
        """Raise :class:`StudyError` naming the first bad setting and what would be accepted."""
        from embedkit.models.registry import MODELS

        if not _NAME.fullmatch(self.name or ""):
            raise StudyError(f"--name '{self.name}': use letters, digits, '.', '_' or '-' (it names run ids and "
                             f"the report folder)")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise StudyError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
        bad = [m for m in self.methods if m not in STUDY_METHODS]
        if bad:
            raise StudyError(f"unknown method(s) {', '.join(bad)}; a study runs {', '.join(STUDY_METHODS)}")
        for key in ("models", "methods", "seeds"):
            if not getattr(self, key):
                raise StudyError(f"--{key} is empty: name at least one")
        for key in ("probe_epochs", "ft_epochs"):
            if getattr(self, key) < 1:
                raise StudyError(f"--{key.replace('_', '-')} must be at least 1, not {getattr(self, key)}")
        for key in ("ci", "workers"):
            if getattr(self, key) < 0:
                raise StudyError(f"--{key} must be 0 or more, not {getattr(self, key)}")
        if self.random_init and self.weights_dir:
            raise StudyError("--weights-dir and --random-init exclude each other: a study uses one kind of weights")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise StudyError(f"--device must be auto, cpu or cuda[:N], not '{self.device}'")

    def to_json(self) -> dict:
        """The matrix and settings as stored in the ``studies`` table (the study file's text under ``file``)."""
        out = {k: v for k, v in asdict(self).items() if k != "file_text"}
        out.update(models=list(self.models), methods=list(self.methods), seeds=list(self.seeds))
        if self.file_text is not None:
            out["file"] = self.file_text
        return out


FILE_KEYS = tuple(f.name for f in fields(StudyConfig) if f.name != "file_text")
_BOOL_KEYS = ("random_init", "cpu_ok")
_INT_KEYS = ("probe_epochs", "ft_epochs", "ci", "workers")
_TEXT_KEYS = ("name", "cohort", "device", "weights_dir", "images", "report")


def _names(value: Any, key: str) -> tuple[str, ...]:
    """'a,b' or ['a', 'b'] -> ('a', 'b'), duplicates dropped (order kept)."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise StudyError(f"{key}: expected a list or a comma-separated string, not {value!r}")
    return tuple(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))


def _seeds(value: Any) -> tuple[int, ...]:
    """'77,78,79', '77-79', 77 or [77, 78] -> (77, 78, 79)."""
    from embedkit.heads.sweep import parse_seeds
    from embedkit.heads.vectors import HeadsError

    if isinstance(value, bool):
        raise StudyError(f"seeds: expected numbers, not {value!r}")
    parts = value if isinstance(value, (list, tuple)) else [value]
    try:
        seeds = [s for part in parts for s in parse_seeds(part)]
    except HeadsError as exc:
        raise StudyError(str(exc).replace("--seeds", "seeds")) from None
    return tuple(dict.fromkeys(seeds))


def read_study_file(path: str | Path) -> tuple[dict, str]:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) study file: (settings keyed as StudyConfig, the file's text).

    Keys are the CLI options' names (``probe_epochs`` or ``probe-epochs``); an unknown key is an error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} not found")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            raise StudyError(f"study file {path}: use a .yaml, .yml or .toml file")
    except StudyError:
        raise
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError: say where, not a traceback
        raise StudyError(f"study file {path} does not parse: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise StudyError(f"study file {path}: expected keys and values at the top level, found {type(data).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(k for k in values if k not in FILE_KEYS)
    if unknown:
        raise StudyError(f"study file {path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(FILE_KEYS)}")
    for key, value in values.items():
        if key in _BOOL_KEYS and not isinstance(value, bool):
            raise StudyError(f"study file {path}: {key} must be true or false, not {value!r}")
        if key in _INT_KEYS and (isinstance(value, bool) or not isinstance(value, int)):
            raise StudyError(f"study file {path}: {key} must be a whole number, not {value!r}")
        if key in _TEXT_KEYS and value is not None and not isinstance(value, (str, int)):
            raise StudyError(f"study file {path}: {key} must be text, not {value!r}")
    for key in _TEXT_KEYS:
        if values.get(key) is not None:
            values[key] = str(values[key])
    return values, text


def make_config(file: str | Path | None = None, **overrides: Any) -> StudyConfig:
    """The study's config: the study file's values (if any), then every override that is not None; validated."""
    values: dict = {}
    text = None
    if file is not None:
        values, text = read_study_file(file)
    unknown = sorted(k for k in overrides if k not in FILE_KEYS)
    if unknown:
        raise StudyError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(FILE_KEYS)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = StudyConfig(**values, file_text=text)
    config.validate()
    return config


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


@dataclass
class StudyResult:
    """What :func:`run_study` planned and did."""

    config: StudyConfig
    steps: list[Step]  # the whole plan, in order, with each step's final status
    run: list[Step] = field(default_factory=list)  # steps run in this call, in order
    report: Path | None = None
    stopped: bool = False  # stop_after ended the call before every step ran
    plan_only: bool = False

    @property
    def todo(self) -> list[Step]:
        return [s for s in self.steps if s.status == "todo"]

    @property
    def done(self) -> list[Step]:
        return [s for s in self.steps if s.status == "done"]

    @property
    def skipped(self) -> list[Step]:
        return [s for s in self.steps if s.status == "skipped"]

    @property
    def blocked(self) -> list[Step]:
        return [s for s in self.steps if s.status == "blocked"]

    @property
    def nothing_to_do(self) -> bool:
        return not self.todo and not self.blocked

    def to_json(self) -> dict:
        return {"study": self.config.name, "config": self.config.to_json(), "plan_only": self.plan_only,
                "stopped": self.stopped, "report": str(self.report) if self.report else None,
                "steps": [s.to_json() for s in self.steps], "run": [s.key for s in self.run]}


def _settings_of(method: str, cohort: str, epochs: int | None) -> dict:
    """The settings that decide a run's result besides model, weights and seed (hashed into the step key)."""
    return {"cohort": cohort} if method == "zeroshot" else {"cohort": cohort, "epochs": epochs}


def step_key(method: str, model: str, weights_id: str | None, seed: int | None, settings: dict) -> str:
    """``lp|tiny-clip|random-init:tiny-clip:0|seed=77|<hash of settings>``: equal keys, the same run."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{method}|{model}|{weights_id or '?'}|seed={'-' if seed is None else seed}|{digest}"


def _step_settings(config: StudyConfig, method: str) -> dict:
    epochs = config.ft_epochs if method in GPU_METHODS else config.probe_epochs
    return _settings_of(method, config.cohort, epochs)


def _study_runs(store: Store, study: str) -> dict[str, str]:
    """{step key: run_id} of the runs the study already holds (keys rebuilt from each run's own row)."""
    from embedkit.store.runs import select_runs

    out: dict[str, str] = {}
    for row in select_runs(store, study=study).to_pylist():
        config = json.loads(row["config"] or "{}")
        settings = _settings_of(row["method"], row["cohort"], config.get("epochs"))
        out.setdefault(step_key(row["method"], row["model"], row["weights_id"], row["seed"], settings), row["run_id"])
    return out


def _finetune_run_id(study: str, key: str) -> str:
    """Deterministic, so a killed fine-tune is found again and resumed from its checkpoint."""
    return f"{key.split('|')[0]}-{study}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _has_gpu(device: str) -> bool:
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        return True  # resolve_device says so clearly if it is not there
    import torch

    return torch.cuda.is_available()


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
    if config.cohort in NIH_SHIPPED or config.cohort == SYNTHETIC_COHORT:
        from embedkit.data.nih import shipped_manifest  # not imported yet: its size comes from the manifest

        rows = shipped_manifest("nih6x200" if config.cohort == SYNTHETIC_COHORT else config.cohort)
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
        step.note = (f"synthesise '{SYNTHETIC_COHORT}' ({facts.images} X-rays from the shipped nih6x200 manifest) "
                     f"into {Path(store.path) / 'synthetic-images'}")
        step.estimate_s = facts.images / SYNTH_RATE
    elif config.cohort in NIH_SHIPPED and config.images:
        step.note = f"import '{config.cohort}' from {config.images} (shipped manifest, every image verified)"
        step.estimate_s = facts.images / IMPORT_RATE
    elif config.cohort in NIH_SHIPPED:
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


def _embedded(store: Store, model: str, weights_id: str | None, config: StudyConfig, facts: _CohortFacts) -> bool:
    """Every cohort row has a vector for these weights, and the prompts are there."""
    from embedkit.store.store import prompts_table

    if weights_id is None or not facts.imported or not store.has(embeddings_table(model)):
        return False
    where = f"{sql_eq('weights_id', weights_id)} AND {sql_eq('cohort', config.cohort)}"
    have = set(store.read(embeddings_table(model), where, ["row_id"])["row_id"].to_pylist())
    return facts.row_ids <= have and store.count(prompts_table(model), sql_eq("weights_id", weights_id)) > 0


def _rate(model: str, gpu: bool) -> float:
    from embedkit.models.registry import get_spec

    spec = get_spec(model)
    cpu_rate, gpu_rate = TINY_RATE if spec.tiny else EMBED_RATE.get(model, (4.0, 500.0))
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


def plan_study(store: Store, config: StudyConfig) -> list[Step]:
    """Every step of the study in order with its status (done / todo / skipped / blocked) and a rough estimate."""
    facts = _cohort_facts(store, config)
    existing = _study_runs(store, config.name)
    gpu = _has_gpu(config.device)
    steps = [_cohort_plan(config, facts, store)]
    cohort_blocked = steps[0].status == "blocked"
    weights: dict[str, str | None] = {}
    blocked_models: dict[str, str] = {}
    for model in config.models:
        weights_id, source, problem = _known_weights(store, config, model)
        weights[model] = weights_id
        step = Step("embed", model, None, weights_id, f"embed|{model}|{weights_id or source}|{config.cohort}")
        if problem:
            step.status, step.note = "blocked", problem
            blocked_models[model] = f"waits for 'embed {model}', which is blocked"
        elif _embedded(store, model, weights_id, config, facts):
            step.status, step.note = "done", f"weights_id {weights_id}"
        else:
            step.note = (f"weights_id {weights_id}" if weights_id else
                         f"loads and hashes the weights in {source}")
            if cohort_blocked:
                blocked_models[model] = "waits for the cohort"
        steps.append(step)

    def run_step(method: str, model: str, seed: int | None) -> Step:
        key = step_key(method, model, weights[model], seed, _step_settings(config, method))
        step = Step(method, model, seed, weights[model], key)
        if weights[model] is not None and key in existing:
            step.status, step.run_id = "done", existing[key]
        elif model in blocked_models:
            step.status, step.note = "blocked", blocked_models[model]
        elif method in GPU_METHODS and not gpu and not config.cpu_ok:
            step.status = "skipped"
            step.note = (f"{method} needs a GPU (device {config.device}: no CUDA device here); pass --cpu-ok to "
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


# ---- the studies table -------------------------------------------------------------------------------------


def stored_study(store: Store, name: str) -> dict | None:
    """The ``studies`` row of ``name`` (config parsed), or None."""
    if not store.has("studies"):
        return None
    rows = store.read("studies", sql_eq("study_id", name)).to_pylist()
    if not rows:
        return None
    row = rows[0]
    row["config"] = json.loads(row["config"] or "{}")
    return row


def _check_fixed(stored: dict | None, config: StudyConfig) -> None:
    if stored is None:
        return
    before = stored["config"]
    changed = [f"{k} {before.get(k)!r} -> {getattr(config, k)!r}" for k in FIXED_SETTINGS
               if k in before and before.get(k) != getattr(config, k)]
    if changed:
        raise StudyError(f"study '{config.name}' was run with other settings ({'; '.join(changed)}). A study keeps "
                         f"its settings and grows only by models, methods and seeds: choose another --name for "
                         f"these settings")


def _record_study(store: Store, config: StudyConfig, stored: dict | None) -> None:
    import pyarrow as pa

    from embedkit.store import schemas

    now = datetime.now(timezone.utc)
    row = {"study_id": config.name, "config": json.dumps(config.to_json(), sort_keys=True),
           "created_at": stored["created_at"] if stored else now, "updated_at": now}
    store.upsert("studies", pa.Table.from_pylist([row], schema=schemas.STUDIES), ["study_id"], schemas.STUDIES)


# ---- running -----------------------------------------------------------------------------------------------


def _say(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(message)


def _make_cohort(store: Store, config: StudyConfig) -> None:
    """Import the NIH cohort from --images, or draw and import the synthetic one."""
    from embedkit.data import nih
    from embedkit.data.cohort import import_cohort, validate_cohort

    if config.cohort == SYNTHETIC_COHORT:
        from embedkit.data import synth

        frame = nih.shipped_manifest("nih6x200")
        out = Path(store.path) / "synthetic-images"
        written = synth.synthesize(frame, out, seed=0)
        frame = frame.merge(written[["image_id", "biased"]], on="image_id", how="left").assign(bias=None)
        import_cohort(store, validate_cohort(frame, SYNTHETIC_COHORT, images_dir=out), SYNTHETIC_COHORT)
        return
    from embedkit.constants import NIH_CLASSES

    frame = nih.shipped_manifest(config.cohort)
    paper = config.cohort == "nih6x200-paper"
    validated = validate_cohort(frame, config.cohort, images_dir=config.images, classes=NIH_CLASSES,
                                allow_repeats=paper)
    import_cohort(store, validated, config.cohort)


def _run_one(store: Store, config: StudyConfig, step: Step, weights: dict[str, str | None], progress: bool) -> None:
    """Do one step; run steps get ``run_id``, embed steps record the weights_id in ``weights``."""
    if step.kind == "cohort":
        _make_cohort(store, config)
    elif step.kind == "embed":
        import gc

        from embedkit.embed import embed_cohort
        from embedkit.models.registry import get_spec, instantiate

        spec = get_spec(step.model)
        net, weights_id, source = instantiate(spec, None, config.random_init, SEED_INIT, config.weights_dir)
        summary = embed_cohort(store, spec, net, weights_id, source, config.cohort, device=config.device,
                               workers=config.workers, progress=progress)
        weights[step.model] = step.weights_id = weights_id
        step.note = summary.line()
        del net
        gc.collect()  # one full-size model at a time
    elif step.kind == "zeroshot":
        from embedkit.heads.zeroshot import run_zeroshot

        step.run_id = run_zeroshot(store, step.model, config.cohort, step.weights_id, study_id=config.name)["run_id"]
    elif step.kind in ("lp", "mlp"):
        from embedkit.heads.probe import HeadConfig, run_probe

        cfg = HeadConfig(head=step.kind, epochs=config.probe_epochs)
        step.run_id = run_probe(store, step.model, cfg, step.seed, config.cohort, step.weights_id,
                                study_id=config.name)["run_id"]
    else:
        step.run_id = _finetune_step(store, config, step, progress)


def _finetune_step(store: Store, config: StudyConfig, step: Step, progress: bool) -> str:
    """LoRA / FT with a deterministic run id: resumed from its checkpoint when an earlier call was killed."""
    import shutil

    from embedkit.finetune import train

    run_id = _finetune_run_id(config.name, step.key)
    folder = train.checkpoint_dir(store, run_id)
    if (folder / "config.json").is_file() and (folder / "last.pt").is_file():
        _say(progress, f"  continuing {run_id} from its last checkpointed epoch")
        result = train.resume(store, run_id, device=config.device, workers=config.workers, progress=progress)
    else:
        if folder.exists():
            shutil.rmtree(folder)  # killed before its first epoch finished: nothing to continue from
        cfg = train.FinetuneConfig(model=step.model, method=step.kind, cohort=config.cohort,
                                   weights_dir=config.weights_dir, random_init=config.random_init,
                                   seed_init=SEED_INIT, epochs=config.ft_epochs, seed=step.seed,
                                   device=config.device, workers=config.workers, study_id=config.name)
        result = train.finetune(store, cfg, progress=progress, run_id=run_id)
    return result.run_id


def _default_report_dir(store: Store, name: str) -> Path:
    return Path(store.path).resolve().parent / f"study-{name}"


def run_study(store: Store, config: StudyConfig, plan_only: bool = False, progress: bool = True,
              stop_after: int | None = None) -> StudyResult:
    """Plan the study and (unless ``plan_only``) run every missing step, then write its report.

    ``stop_after`` stops after that many steps have run (the study resumes from there on the next call).
    Blocked steps (no cohort, no weights) raise :class:`StudyError` before anything runs.
    """
    config.validate()
    stored = stored_study(store, config.name)
    _check_fixed(stored, config)
    steps = plan_study(store, config)
    result = StudyResult(config, steps, plan_only=plan_only)
    if plan_only:
        return result
    if result.blocked:
        reasons = list(dict.fromkeys(s.note for s in result.blocked if not s.note.startswith("waits for")))
        raise StudyError(f"study '{config.name}' cannot run; nothing was done:\n  " + "\n  ".join(reasons))
    _record_study(store, config, stored)
    existing: dict[str, str] | None = None
    weights = {s.model: s.weights_id for s in steps if s.kind == "embed"}
    todo = result.todo
    for index, step in enumerate(todo):
        if stop_after is not None and len(result.run) >= stop_after:
            result.stopped = True
            break
        if step.kind in RUN_KINDS and step.weights_id is None:
            # Real weights seen for the first time: the embed step has hashed them; the step may exist already.
            step.weights_id = weights[step.model]
            step.key = step_key(step.kind, step.model, step.weights_id, step.seed, _step_settings(config, step.kind))
            existing = _study_runs(store, config.name) if existing is None else existing
            if step.key in existing:
                step.status, step.run_id, step.note = "done", existing[step.key], ""
                continue
        _say(progress, f"[bold]step {index + 1}/{len(todo)}[/bold] {step.label()}")
        start = time.perf_counter()
        _run_one(store, config, step, weights, progress)
        step.seconds = time.perf_counter() - start
        step.status = "done"
        result.run.append(step)
        _say(progress, f"[green]done[/green] {step.label()} ({step.seconds:.1f} s)"
             + (f": run {step.run_id}" if step.run_id else ""))
    if result.stopped:
        return result
    for step in result.skipped:
        _say(progress, f"[yellow]skipped[/yellow] {step.label()}: {step.note}")
    run_ids = [s.run_id for s in steps if s.status == "done" and s.run_id]
    out = Path(config.report) if config.report else _default_report_dir(store, config.name)
    from embedkit.report.build import HTML_NAME

    if not run_ids:
        _say(progress, "no runs to report (every run step was skipped)")
    elif result.run or not (out / HTML_NAME).is_file():
        from embedkit.report import build_report

        start = time.perf_counter()
        models = len(config.models)
        result.report = build_report(
            store, out, runs=run_ids, study=config.name, ci=config.ci,
            title=f"embedkit study '{config.name}': {models} model{'s' * (models > 1)} x "
                  f"{', '.join(config.methods)} x seeds {', '.join(map(str, config.seeds))} on {config.cohort}")
        _say(progress, f"report written in {time.perf_counter() - start:.1f} s: {result.report}")
    else:
        result.report = out / HTML_NAME
    return result


# ---- showing a plan ----------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def plan_lines(result: StudyResult) -> list[str]:
    """The plan as text: every step with its status and why, then the estimated time of what is to do."""
    config = result.config
    lines = [f"study '{config.name}': {len(config.models)} model(s) x {', '.join(config.methods)} x seeds "
             f"{', '.join(map(str, config.seeds))} on cohort '{config.cohort}' "
             f"({'random-init weights' if config.random_init else 'released weights'})"]
    waiting: dict[str, int] = {}
    for step in result.steps:
        if step.status == "blocked" and step.note.startswith("waits for"):
            waiting[step.note] = waiting.get(step.note, 0) + 1  # one line per cause, not one per step
            continue
        estimate = ""
        if step.estimate_s and step.status in ("todo", "skipped"):
            where = " on the CPU" if step.status == "skipped" else ""
            estimate = f"  [estimate{where} {_duration(step.estimate_s)}]"
        note = f"  ({step.note})" if step.note else ""
        lines.append(f"  {step.status:<8} {step.label()}{note}{estimate}")
    for note, n in waiting.items():
        lines.append(f"  blocked  {n} more step(s): {note}")
    todo = result.todo
    counts = (f"{len(result.done)} done, {len(todo)} to do, {len(result.skipped)} skipped"
              + (f", {len(result.blocked)} blocked" if result.blocked else ""))
    if result.nothing_to_do:
        lines.append(f"nothing to do: {counts}" + (" (the skipped steps need a GPU or --cpu-ok)"
                                                     if result.skipped else ""))
    else:
        lines.append(counts)
    if todo:
        known = [s.estimate_s for s in todo if s.estimate_s is not None]
        unknown = len(todo) - len(known)
        lines.append(f"estimated time of the steps to do: {_duration(sum(known))} (rough estimates from images x "
                     f"a per-model images/s figure for {'GPU' if _has_gpu(config.device) else 'CPU'}"
                     + (f"; {unknown} step(s) not estimated until the cohort is imported" if unknown else "") + ")")
    if result.blocked:
        lines.append("blocked steps must be fixed before the study can run (see their notes)")
    return lines

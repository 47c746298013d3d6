"""A study's configuration: the matrix and settings, from CLI options and/or a study file (YAML or TOML).

The keys are the CLI options' names; :func:`make_config` merges a file and explicit options (options win) and
validates the result at the door.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from embedkit.errors import EmbedkitError

PAPER_MODELS = ("clip", "biomedclip", "medclip-rn50", "medclip-vit", "gloria")
STUDY_METHODS = ("zeroshot", "lp", "mlp", "lora", "ft")
HEAD_METHODS = ("zeroshot", "lp", "mlp")
GPU_METHODS = ("lora", "ft")  # stream images through the tower for every epoch: days on a CPU at full size
RUN_KINDS = HEAD_METHODS + GPU_METHODS
SEED_INIT = 0  # seed of --random-init weights (the same architecture draw for every regime and seed)
# A study's runs must stay comparable: these settings are fixed once the study exists (it may grow by models,
# methods and seeds; anything else is a new study).
FIXED_SETTINGS = ("cohort", "random_init", "probe_epochs", "ft_epochs", "amp", "preprocess")
STUDY_PREPROCESSINGS = ("study", "upstream")  # per family: ModelFamily.preprocessing_for
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class StudyError(EmbedkitError):
    """A study's settings, file or preconditions are wrong; the message says how to fix them."""


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
    amp: str = "none"  # the image passes' precision (embedding and fine-tuning): fp32 unless asked, CUDA only
    preprocess: str = "study"  # study | upstream: each family's preprocessing of that name, else its only one
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
        if self.preprocess not in STUDY_PREPROCESSINGS:
            raise StudyError(f"--preprocess must be one of {', '.join(STUDY_PREPROCESSINGS)}, not "
                             f"'{self.preprocess}'")
        self._validate_amp()

    def _validate_amp(self) -> None:
        from embedkit.constants import AMP_MODES
        from embedkit.device import has_gpu

        if self.amp not in AMP_MODES:
            raise StudyError(f"--amp must be one of {', '.join(AMP_MODES)}, not '{self.amp}'")
        if self.amp != "none" and not has_gpu(self.device):
            raise StudyError(f"--amp {self.amp} is autocast on CUDA, and this study runs on the CPU (--device "
                             f"{self.device}): drop --amp or run it on a GPU")

    def preprocessing_of(self, model: str) -> str:
        """The preprocessing ``model``'s passes use in this study (its family's of the study's name, else its only
        one: ModelFamily.preprocessing_for)."""
        from embedkit.models.registry import get_spec

        return get_spec(model).family.preprocessing_for(self.preprocess)

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
_TEXT_KEYS = ("name", "cohort", "device", "weights_dir", "images", "report", "amp", "preprocess")


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
        seeds = [s for part in parts for s in parse_seeds(part, option="seeds")]
    except HeadsError as exc:  # the same message, as this module's error: make_config raises StudyError only
        raise StudyError(str(exc)) from exc
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

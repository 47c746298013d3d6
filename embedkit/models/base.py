"""What every model family provides: the interface the embedding pass, zero-shot and fine-tuning rely on.

A family is one module under ``embedkit/models/`` that defines two things:

- a :class:`VisionLanguageModel` subclass: preprocessing, tokenization, the two towers, the LoRA layout of its
  image tower and any per-image extras the embedding pass stores (GLoRIA's local similarities);
- ``FAMILY``, a :class:`ModelFamily`: what needs no built model, because it runs off stored vectors: how to
  build and load, which prompt sets a pass embeds, and the zero-shot rule that turns cosines into class scores.

Nothing outside ``embedkit/models/`` asks which family a model is; it calls these methods. The families and their
checkpoints are described in docs/models.md.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
import types
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedkit.errors import EmbedkitError

if TYPE_CHECKING:
    from embedkit.models.registry import ModelSpec


@dataclass(frozen=True)
class TowerLayout:
    """Where the repeated blocks of an image tower are and which of their modules get LoRA under each preset.

    Targets are module names relative to a block; ``X.in_proj`` names the input projection of an
    ``nn.MultiheadAttention`` ``X`` alone (its ``out_proj`` untouched), ``X`` the whole attention.
    """

    kind: str
    block: str  # regular expression fully matching a block's module name
    study_targets: tuple[str, ...]  # the study's: the attention input projection of ViTs, a ResNet's bottleneck
    embedkit_targets: tuple[str, ...]  # embedkit's wider layout: attention in and out, MLP layers

    def targets(self, preset: str) -> tuple[str, ...]:
        """The default targets of ``preset`` (``study`` or ``embedkit``, embedkit.constants.LORA_PRESETS)."""
        return self.study_targets if preset == "study" else self.embedkit_targets


# The preprocessing named after the model's authors (their released code's); the only one of most families.
UPSTREAM = "upstream"

class Preprocessing:
    """A family's preprocessing in its two stages: decoded image -> the model's 8-bit pixels -> its input tensor.

    :meth:`pixels` is the deterministic geometric part (channel conversion, resize, pad, crop) and ends in the
    uint8 array ``[H, W, C]`` the model sees before anything else is done to it; :meth:`tensor` is the rest
    (scaling, normalisation, a resize some families make in float). Calling the object runs both, so
    ``p(image) == p.tensor(p.pixels(image))`` bit for bit. What lies between the two stages is where the training
    augmentations act (embedkit/finetune/augment.py) and what the pixel cache stores (embedkit/data/pixels.py),
    keyed by :meth:`recipe`. Subclasses are picklable (DataLoader workers run them).
    """

    def pixels(self, image) -> np.ndarray:
        """The decoded PIL image's 8-bit pixels as the model sees them before its tensor conversion: uint8
        ``[H, W, C]``, the same shape for every image."""
        raise NotImplementedError

    def tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """The model's input tensor ``[C', H', W']`` (float32) from :meth:`pixels`' array."""
        raise NotImplementedError

    def recipe(self) -> str:
        """What :meth:`pixels` computes, in words with every parameter: two preprocessings with the same recipe
        give the same pixels (CLIP's and BiomedCLIP's do), so the pixel cache keys its entries by it."""
        raise NotImplementedError

    def __call__(self, image) -> torch.Tensor:
        return self.tensor(self.pixels(image))

    # Two preprocessings of the same class and parameters are equal: a pass that feeds several models computes
    # their tensor once (MedCLIP's two towers share theirs, as CLIP and BiomedCLIP do). Dataclass subclasses
    # compare their fields instead, to the same effect.
    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), repr(sorted(vars(self).items()))))


def gray_pixels(image) -> np.ndarray:
    """A PIL ``L`` image as uint8 ``[H, W, 1]``."""
    return np.asarray(image, dtype=np.uint8)[:, :, None].copy()


# torchvision-style ResNets (MedCLIP-RN50, GLoRIA): the bottleneck convolutions of every block; the stem is left alone.
# The study and embedkit agree here.
RESNET_LAYOUT = TowerLayout("resnet", r"(?:.+\.)?layer[1-4]\.\d+", ("conv1", "conv2", "conv3"),
                            ("conv1", "conv2", "conv3"))


class VisionLanguageModel(nn.Module):
    """A CLIP-style model: an image tower and a text tower that map into one embedding space.

    Family modules subclass this and keep the authors' module names so checkpoints load 1:1.
    """

    embed_dim: int

    def image_transforms(self) -> dict[str, "Preprocessing"]:
        """Every preprocessing the family offers, by name, the default first: :class:`Preprocessing` objects
        (picklable callables PIL.Image -> float tensor [C, H, W], in two stages). A family whose authors and the study preprocess alike has one, :data:`UPSTREAM`
        (the authors'); MedCLIP has ``study`` and ``upstream`` (docs/models.md)."""
        raise NotImplementedError

    def image_transform(self, preprocess: str | None = None) -> "Preprocessing":
        """The preprocessing named ``preprocess`` (None: the family's default); a name the family does not offer
        raises :class:`PreprocessingError` listing those it does."""
        transforms = self.image_transforms()
        if preprocess is None:
            return next(iter(transforms.values()))
        if preprocess not in transforms:
            offered = ", ".join(transforms)
            what = f"one preprocessing, {offered}" if len(transforms) == 1 else f"the preprocessings {offered}"
            raise PreprocessingError(f"--preprocess {preprocess}: this model's family has {what} (docs/models.md)")
        return transforms[preprocess]

    def default_preprocessing(self) -> str:
        """The name of :meth:`image_transform`'s default."""
        return next(iter(self.image_transforms()))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize prompts the way the authors did (padding, max length, casing)."""
        raise NotImplementedError

    def encode_image_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return the image embeddings [B, embed_dim] before L2 normalisation (the study's LoRA head reads these)."""
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return L2-normalised image embeddings [B, embed_dim]."""
        return F.normalize(self.encode_image_raw(pixels), dim=-1)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return L2-normalised text embeddings [P, embed_dim]."""
        raise NotImplementedError

    def zeroshot_logit_scale(self) -> float:
        """The multiplier applied to cosine similarities in zero-shot scoring (1.0 where none is learned)."""
        raise NotImplementedError

    def image_tower(self) -> nn.Module:
        """The image encoder whose parameters LoRA and full fine-tuning adapt."""
        raise NotImplementedError

    def lora_layout(self) -> TowerLayout | None:
        """Where LoRA goes in :meth:`image_tower` under each preset (None: no known layout; only full fine-tuning)."""
        return None

    # -- per-image extras besides the vector (GLoRIA's local similarities; none for the others) ----------------

    def prompt_context(self, prompts: dict[str, list[str]]) -> dict[str, Any]:
        """What the image pass needs of each prompt set ({set: prompts in prompt_index order}) to compute
        :meth:`encode_image_extras`; computed once per pass. Empty: the family stores no extras."""
        return {}

    def convolutional(self) -> bool:
        """Whether the image tower is a CNN: on CUDA its convolutions run faster on channels-last tensors (cuDNN's
        NHWC kernels), which the embedding pass then gives it; a ViT gains nothing from them."""
        return False

    def encode_image_extras(self, pixels: torch.Tensor, context: dict[str, Any]
                            ) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Image vectors [B, embed_dim] and, per prompt set of ``context``, a [B, P] per-prompt local similarity
        from the same forward pass (stored beside the vectors; used by the family's zero-shot rule)."""
        return self.encode_image(pixels), {}


class ModelFamily:
    """What embedkit knows of a family without building a model: construction, prompt sets and zero-shot scoring.

    The defaults are CLIP's rule, ``scaled_cosine``: logits = logit_scale * cos(image, prompt) for every prompt,
    and a class's score is the mean (``ensemble="max"``: the max) of its prompts' logits. This is the mean of
    per-prompt logits, not the cosine with a re-normalised class-mean prompt; with one prompt per class they agree.
    Families with another rule override :meth:`class_scores` and :meth:`zeroshot_settings` (and ``ensembles``).
    """

    module: str  # embedkit.models.<module>
    zeroshot_rule = "scaled_cosine"  # the rule's name, recorded with the weights and every zero-shot run
    prompt_sets: tuple[str, ...] = ("clip",)  # embedded by every pass; the first is zero-shot's default
    default_logit_scale = 100.0  # used when the store has no weights row to take the learned scale from
    uses_local_similarity = False  # zero-shot reads the stored per-prompt local similarity
    ensembles: tuple[str, ...] = ("mean", "max")  # how a class's prompts combine; the first is the default
    # Embedded by every pass over a multi-label cohort, for its labels; the first is multi-label zero-shot's default.
    multilabel_prompt_sets: tuple[str, ...] = ("pairs",)
    # The preprocessing of embedding passes from before the pass recorded its settings (a store's rows without a
    # record): what embedkit then ran. A name no current variant has means those vectors match no new pass.
    legacy_preprocessing = UPSTREAM
    # The names of VisionLanguageModel.image_transforms(), the default first (known without building a model).
    preprocessings: tuple[str, ...] = (UPSTREAM,)

    def preprocessing_for(self, choice: str) -> str:
        """A study-wide choice (``study`` or ``upstream``) for this family: the family's preprocessing of that name,
        else its only one (a family with one preprocessing is the study's and its authors' alike)."""
        return choice if choice in self.preprocessings else self.preprocessings[0]

    def build(self, spec: "ModelSpec", seed: int) -> VisionLanguageModel:
        """The real architecture of ``spec`` with random weights, deterministic for ``seed``; offline."""
        raise NotImplementedError

    def load(self, spec: "ModelSpec", path: Path) -> VisionLanguageModel:
        """The authors' released weights from ``path``, loaded strictly after the family's key clean-up."""
        raise NotImplementedError

    def prompts(self, name: str, classes: tuple[str, ...]) -> tuple[str, dict[str, list[str]]]:
        """(stored set name, {class: prompts}) of prompt set ``name`` (a built-in set or a YAML/JSON file)."""
        from embedkit.models import prompts

        return prompts.set_name(name), prompts.prompt_set(name, classes)

    def logit_scale(self, scale: float, source: str) -> tuple[float, str]:
        """The multiplier zero-shot applies to cosines, from the recorded one (a family may clamp it)."""
        return scale, source

    def check_prompts(self, prompt_set: str, prompts_per_class: dict[str, int]) -> None:
        """Refuse a prompt set the rule cannot score (raise ValueError with the reason)."""

    def class_scores(self, image: np.ndarray, prompts: np.ndarray, prompt_class: np.ndarray, n_classes: int,
                     logit_scale: float, ensemble: str, local_sim: np.ndarray | None = None) -> np.ndarray:
        """Class scores [N, C] of unit image vectors [N, d] against the set's unit prompt vectors [P, d]
        (``prompt_class`` [P]: each prompt's class index)."""
        logits = logit_scale * (image @ prompts.T)
        reduce = np.mean if ensemble == "mean" else np.max
        return np.stack([reduce(logits[:, prompt_class == c], axis=1) for c in range(n_classes)], axis=1)

    def label_probabilities(self, image: np.ndarray, prompts: np.ndarray, prompt_class: np.ndarray, n_labels: int,
                            logit_scale: float, ensemble: str, local_sim: np.ndarray | None = None) -> np.ndarray:
        """Multi-label zero-shot [N, L]: per label, the softmax over its (positive, negative) prompt pair (positive
        first in ``prompt_class`` order) of the family's own prompt scores, each prompt scored as a class of its own
        by :meth:`class_scores`; the positive's share, sigmoid(score_pos - score_neg)."""
        own = np.arange(len(prompt_class))
        scores = self.class_scores(image, prompts, own, len(own), logit_scale, ensemble, local_sim)
        pairs = [np.flatnonzero(prompt_class == c) for c in range(n_labels)]
        return _pair_softmax(np.stack([scores[:, pos] - scores[:, neg] for pos, neg in pairs], axis=1))

    def zeroshot_settings(self, ensemble: str, logit_scale: float, scale_source: str, scored_rows: str) -> dict:
        """What a zero-shot run records of the rule: ensemble, how a class score is formed, the scale used
        (``scored_rows`` says which rows were scored together, for rules whose scores depend on it)."""
        return {"ensemble": ensemble,
                "class_score": f"{ensemble} over the class's prompts of logit_scale * cosine (per-prompt logits)",
                "logit_scale": logit_scale, "logit_scale_source": scale_source}


def _pair_softmax(diff: np.ndarray) -> np.ndarray:
    """softmax([a, b])[0] = sigmoid(a - b), elementwise on a - b (stable), as float32."""
    z = np.asarray(diff, dtype=np.float64)
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z)))).astype(
        np.float32)


def state_dict_hash(model: nn.Module) -> str:
    """Content hash of a model's weights: sha256 over parameter and buffer names and bytes, sorted by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()[:16]


class PreprocessingError(EmbedkitError, ValueError):
    """A preprocessing the model's family does not offer."""


class CheckpointError(EmbedkitError, ValueError):
    """A weights file that cannot be read, or whose keys or shapes do not fit the model after the clean-up."""


def read_tensor_file(path, release: str, unwrap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, of a torch file holding a state dict (with ``unwrap``, also the
    ``{"state_dict": ...}`` of a training checkpoint), or of a TorchScript archive (:func:`read_torchscript_tensors`).

    ``torch.load`` runs with ``weights_only=True``: a downloaded pickle never runs code. Any file that cannot be read
    so (truncated, malformed, a pickle of other objects) is one CheckpointError naming the file and ``release`` (what
    to download again); torch's own advice to retry with weights_only=False is never passed on.
    """
    path = Path(path)
    try:
        if torchscript_archive_name(path) is not None:
            state = read_torchscript_tensors(path, release)
        elif path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                state = load_file(str(path), device="cpu")
            except SafetensorError as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); download {release} "
                                      "again") from None
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch's restricted unpickler fails on garbage in many ways
        reason = "it holds objects other than tensors, which embedkit never unpickles" \
            if isinstance(exc, pickle.UnpicklingError) else "truncated, damaged or not a checkpoint"
        raise CheckpointError(f"{path} is not a readable PyTorch state dict ({type(exc).__name__}: {reason}); "
                              f"download {release} again") from None
    if unwrap and isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} should hold a plain state dict (name -> tensor) as {release} does; "
                              f"found {type(state).__name__}")
    return state


def _key_list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def key_mismatches(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``state`` from loading strictly into ``model``: unexpected, missing, mis-shaped keys (named)."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    wrong_shape = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                   for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_key_list(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_key_list(missing)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es): {_key_list(wrong_shape)}")
    return problems


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Load ``state`` into ``model``; any key that does not fit raises :class:`CheckpointError` naming the keys."""
    problems = key_mismatches(model, state)
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems) + "." + hint)
    model.load_state_dict(state, strict=True)


# --- pickled training checkpoints: a restricted unpickler -------------------------------------------------------


class RefusedGlobal:
    """Stands in for any global the restricted unpickler refuses: built from anything, does nothing.

    The real object is never imported or called, so a malicious ``__reduce__`` (os.system, eval, ...) cannot run.
    """

    origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "RefusedGlobal":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state  # kept, never acted on: a TorchScript module's attributes (read_torchscript_tensors)

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<refused global {self.origin}>"


_TENSOR_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
}
_STORAGE_NAMES = {
    "UntypedStorage", "FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage",
    "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage",
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor rebuilders, ``torch.Size``, dtypes, storage types and ``collections.OrderedDict``.

    Every other global becomes an inert :class:`RefusedGlobal` subclass; nothing else is imported.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _TENSOR_REBUILDERS:
            return getattr(torch._utils, name)  # imported by torch itself (a local import would shadow `torch`)
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch":
            if name == "Size":
                return torch.Size
            if name in _STORAGE_NAMES:
                return getattr(torch, name)
            if isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        return type(f"Refused_{name}", (RefusedGlobal,), {"origin": f"{module}.{name}", "__module__": __name__})


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load only needs a module-like object with Unpickler and load; its wrapper defers to our find_class.
_RESTRICTED_PICKLE = types.ModuleType(__name__ + ".restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
_RESTRICTED_PICKLE.load = _restricted_load  # type: ignore[attr-defined]


def read_lightning_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """The ``state_dict`` of a PyTorch Lightning checkpoint and its ``hyper_parameters``, executing nothing.

    ``torch.load(weights_only=True)`` rejects GLoRIA's file (it also holds the training config object), and a
    full unpickle would run whatever the file asks; this reads everything through :class:`RestrictedUnpickler`.
    ``state_dict`` must map names to tensors; a bare state dict is accepted too. The hyper_parameters come back as
    :func:`config_tree` makes them (plain dicts, lists and values), or None where the file has none.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=_RESTRICTED_PICKLE, weights_only=False)
    except RuntimeError as exc:
        if "explicit pickle_module" in str(exc):  # TORCH_FORCE_WEIGHTS_ONLY_LOAD is set
            raise CheckpointError(
                f"{path}: unset TORCH_FORCE_WEIGHTS_ONLY_LOAD; embedkit reads this Lightning checkpoint with its "
                "own restricted unpickler (weights_only cannot read it)"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    except Exception as exc:  # anything a corrupt or hostile file can raise while being read
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(
            f"{path}: expected a Lightning checkpoint (a dict with 'state_dict'), got {type(obj).__name__}"
        )
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {bad[:5]}")
    hparams = obj.get("hyper_parameters") if state is not obj else None
    try:
        hparams = config_tree(hparams)
    except ValueError as exc:
        raise CheckpointError(f"{path}: hyper_parameters {exc}") from None
    return dict(state), hparams


def read_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint (see :func:`read_lightning_checkpoint`)."""
    return read_lightning_checkpoint(path)[0]


# A Lightning checkpoint's hyper_parameters are a plain dict, or (pytorch-lightning 1.x with OmegaConf, as GLoRIA's)
# the pickled omegaconf DictConfig itself. Through the restricted unpickler a DictConfig / ListConfig is an inert
# record whose state holds "_content" (key -> node, or a list of nodes), and each value node's state holds "_val".
_OMEGACONF_CONTAINERS = ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig")
_OMEGACONF_NODES = "omegaconf.nodes."
_CONFIG_DEPTH = 32


def config_tree(obj: Any, depth: int = 0) -> Any:
    """A training config read by :class:`RestrictedUnpickler` as plain data: dicts, lists, str/int/float/bool/None.

    OmegaConf containers and value nodes are unwrapped (their metadata and parent links dropped); anything else
    the unpickler refused stays a :class:`RefusedGlobal` (the caller names it). Raises ValueError past
    32 levels of nesting (a cyclic or hostile pickle).
    """
    if depth > _CONFIG_DEPTH:
        raise ValueError(f"nest deeper than {_CONFIG_DEPTH} levels; not a training config")
    if isinstance(obj, RefusedGlobal):
        state = getattr(obj, "state", None)
        if isinstance(state, dict):
            if obj.origin in _OMEGACONF_CONTAINERS and "_content" in state:
                return config_tree(state["_content"], depth + 1)
            if obj.origin.startswith(_OMEGACONF_NODES) and "_val" in state:
                return config_tree(state["_val"], depth + 1)
        return obj
    if isinstance(obj, dict):
        return {key: config_tree(value, depth + 1) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [config_tree(value, depth + 1) for value in obj]
    return obj


# --- TorchScript archives (OpenAI's CLIP release): tensors read from the zip, no TorchScript run -------------------

# Globals a TorchScript data.pkl names besides tensors: its module classes (``__torch__.*``, kept as inert records
# holding their attributes) and the typed-list helpers it writes for non-tensor attributes (not needed here).
_TORCHSCRIPT_MODULES = "__torch__."
_TORCHSCRIPT_INERT = (_TORCHSCRIPT_MODULES, "torch.jit._pickle.")


def torchscript_archive_name(path: str | Path) -> str | None:
    """The archive name (``<name>/data.pkl``) of a TorchScript zip, or None for anything else.

    ``torch.save`` writes the same zip layout; only TorchScript adds ``<name>/constants.pkl`` and ``code/``.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return _archive_name(archive)
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def _archive_name(archive: zipfile.ZipFile) -> str | None:
    names = set(archive.namelist())
    for name in names:
        top, _, rest = name.partition("/")
        if rest == "data.pkl" and f"{top}/constants.pkl" in names:
            return top
    return None


class _ForeignGlobal(pickle.UnpicklingError):
    """A TorchScript data.pkl names a global no archive needs (``os.system``, ...): the file is refused."""


class _TorchScriptUnpickler(RestrictedUnpickler):
    """:class:`RestrictedUnpickler` that stops at the first global outside tensors and TorchScript's own classes,
    and whose persistent ids ``("storage", type, key, location, numel)`` are the archive's ``<name>/data/<key>``
    entries, read as bytes onto the CPU (the saved device is ignored)."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, name: str) -> None:
        super().__init__(file)
        self.archive = archive
        self.name = name
        self.storages: dict[str, torch.storage.TypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if isinstance(found, type) and issubclass(found, RefusedGlobal) and \
                not found.origin.startswith(_TORCHSCRIPT_INERT):
            raise _ForeignGlobal(found.origin)  # still only a name: nothing was imported
        return found

    def persistent_load(self, saved_id: Any) -> torch.storage.TypedStorage:
        kind, storage_type, key, _location, numel = saved_id
        if kind != "storage" or not isinstance(key, str):
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        if key not in self.storages:
            with warnings.catch_warnings():  # a legacy storage class's dtype warns that TypedStorage is deprecated
                warnings.simplefilter("ignore", UserWarning)
                dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
            data = bytearray(self.archive.read(f"{self.name}/data/{key}"))
            nbytes = int(numel) * torch.empty((), dtype=dtype).element_size()
            if len(data) != nbytes:
                raise pickle.UnpicklingError(f"storage {key} holds {len(data)} bytes, {nbytes} expected")
            untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self.storages[key]


def _module_tensors(module: RefusedGlobal, prefix: str, ancestors: frozenset[int],
                    out: dict[str, torch.Tensor]) -> None:
    """Every tensor attribute of a TorchScript module record and its submodules, under dotted names.

    A traced module's tensor attributes are exactly its parameters and buffers (plain tensors become constants),
    so this is what ``torch.jit.load(path).state_dict()`` returns.
    """
    for name, value in getattr(module, "state", {}).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif (isinstance(value, RefusedGlobal) and value.origin.startswith(_TORCHSCRIPT_MODULES)
              and id(value) not in ancestors):  # a shared submodule gets every name, a cycle none
            _module_tensors(value, f"{prefix}{name}.", ancestors | {id(value)}, out)


def read_torchscript_tensors(path: str | Path, release: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive (what ``clip.load`` downloads), by dotted name.

    ``torch.jit.load`` would compile and run the archive's code; instead ``data.pkl`` is read through
    :class:`RestrictedUnpickler` (module objects become inert records keeping their attributes) and its storages
    from the zip entries. A pickle naming any other global (``os.system``, ...) is refused before it is unpickled
    further, and nothing is imported; any unreadable file is one CheckpointError naming ``release`` (what to
    download again).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            name = _archive_name(archive)
            if name is None:
                raise zipfile.BadZipFile("no <name>/data.pkl beside <name>/constants.pkl")
            # torch records the byte order since 1.10; archives from before were little-endian in practice
            order = archive.read(f"{name}/byteorder").decode().strip() \
                if f"{name}/byteorder" in archive.namelist() else "little"
            if order != sys.byteorder:
                raise CheckpointError(f"{path} holds {order}-endian tensors and this machine is {sys.byteorder}-"
                                      f"endian; embedkit does not convert them")
            with archive.open(f"{name}/data.pkl") as data:
                unpickler = _TorchScriptUnpickler(data, archive, name)
                root = unpickler.load()
        tensors: dict[str, torch.Tensor] = {}
        if isinstance(root, RefusedGlobal) and root.origin.startswith(_TORCHSCRIPT_MODULES):
            _module_tensors(root, "", frozenset({id(root)}), tensors)
    except CheckpointError:
        raise
    except _ForeignGlobal as exc:
        raise CheckpointError(f"{path}: its data.pkl asks for {exc}, which a TorchScript checkpoint never needs "
                              f"(refused, nothing was run); download {release} again") from None
    except Exception as exc:  # noqa: BLE001 - a damaged zip or pickle fails in many ways
        raise CheckpointError(f"{path} is not a readable TorchScript archive ({type(exc).__name__}: truncated, "
                              f"damaged or not a model); download {release} again") from None
    if not tensors:
        raise CheckpointError(f"{path} is a TorchScript archive without a module's tensors; download {release} "
                              "again")
    return tensors

"""One registry: a model name maps to a small spec; each family module owns how it builds and loads.

Adding a model is one entry here plus, for a new family, one module under ``embedkit/models/``.
Family modules are imported lazily (they pull in torch, open_clip or transformers).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from embedkit.constants import RANDOM_INIT_PREFIX, WEIGHTS_ENV
from embedkit.errors import EmbedkitError

if TYPE_CHECKING:
    from embedkit.models.base import ModelFamily


class UnknownModelError(EmbedkitError, ValueError):
    pass


class MissingWeightsError(EmbedkitError, FileNotFoundError):
    pass


# Where a model's weights were found, in the order embedkit looks (see ModelSpec.locate_weights).
WeightsPlace = Literal["--weights", "weights-dir", "hf-cache"]

_CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def file_problem(path: Path) -> str | None:
    """What a weights file is instead of what its name promises, or None when it looks right. Reads its first
    bytes only: every file must be more than a Git LFS pointer, an HTML page or nothing, and a checkpoint must
    open like one (torch's zip, a pickle, a safetensors header); whether it loads is the loader's to say."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not head:
        return "is empty"
    if head.startswith(LFS_POINTER):
        return ("is a Git LFS pointer (a small text file standing for the real one, which was never downloaded): "
                "fetch the file itself (`git lfs pull` in the clone it came from)")
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "is an HTML page, not the file (a download that saved an error or login page)"
    if path.suffix not in _CHECKPOINT_SUFFIXES:
        return None
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip, and TorchScript's
        return None
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle: torch.save's legacy format
        return None
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:  # safetensors
        return None
    return f"is not a checkpoint (it opens with {head[:16]!r}, not a zip, pickle or safetensors header)"


@dataclass(frozen=True)
class ReleaseFile:
    """One file of an authors' release that `embedkit models pull` fetches into the model's weights folder."""

    url: str  # "{hf}" stands for the Hugging Face endpoint (HF_ENDPOINT, else https://huggingface.co); "" = the
    # authors give no fixed URL (a Google Drive folder): `models pull NAME --url URL` takes the link
    file: str  # its name in $EMBEDKIT_WEIGHTS/<model>/
    # Of the file as served (the archive, for a zip): a download that does not match is deleted, never used. None:
    # the authors publish no checksum; the first pull records the digest in the folder's SHA256SUMS (sha256sum's
    # format) and every later pull must match it; a digest the user writes there first is checked from the start.
    sha256: str | None = None
    pointer: bool = False  # the URL serves a one-line text file holding the download URL (MedCLIP's convention)
    member: str | None = None  # the URL serves a zip archive: ``file`` is its member of this name (at any depth)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What embedkit needs to know about one model name (keyword-built: each field says what it is).

    ``module`` names the family module ``embedkit.models.<module>``; its ``FAMILY`` (a
    :class:`~embedkit.models.base.ModelFamily`) builds, loads and scores zero-shot for every spec of the family.
    """

    name: str
    module: str
    config: str  # the family's own architecture name (e.g. "ViT-B-16-quickgelu", "swin", "tiny")
    embed_dim: int
    weight_files: tuple[str, ...]  # what the user must download (relative to the model's weights folder)
    weight_source: str  # where users get them
    hf_repo: str | None = None  # the Hugging Face hub repository holding weight_files (same relative paths)
    releases: tuple[ReleaseFile, ...] = ()  # checksummed release files `models pull` may fetch (non-hub models)
    lora_rank: int = 16  # the paper's LoRA rank for this image tower
    embed_rate: tuple[float, float] = (5.0, 600.0)  # images/s of the embedding pass (2-core CPU, one GPU): plans
    tiny_embed_dim: int = 32  # the embedding width of the model's tiny twin
    tiny: bool = False
    description: str = ""

    @property
    def family(self) -> ModelFamily:
        """The family's behaviour (imported on first use: family modules pull in torch, open_clip, transformers)."""
        return importlib.import_module(f"embedkit.models.{self.module}").FAMILY

    def build(self, seed: int = 0):
        """Build the real architecture with random weights (deterministic for ``seed``)."""
        return self.family.build(self, seed)

    def load(self, path: str | Path):
        """Load the authors' released weights from ``path`` (a file or folder, per docs/models.md)."""
        from embedkit.models.base import CheckpointError

        path = Path(path)
        if not path.exists():
            raise MissingWeightsError(self.missing_message(path))
        if path.is_dir():
            problem = self.unusable(path)
        else:
            problem = file_problem(path)
            problem = problem and f"{path} {problem}"
        if problem:
            raise CheckpointError(problem)
        model = self.family.load(self, path)
        _refuse_non_finite(model, path)
        return model

    def tiny_twin(self) -> "ModelSpec":
        """The same code path at small widths, random init only: ``tiny-<name>`` for tests and the demo."""
        return replace(self, name="tiny-" + self.name, config="tiny-" + self.config, embed_dim=self.tiny_embed_dim,
                       embed_rate=TINY_EMBED_RATE, tiny=True, hf_repo=None, releases=(),
                       description=f"tiny {self.name} (same code path, small widths; tests and demo)")

    def how_to_get(self) -> str:
        """How a user gets this model's files: `embedkit models pull` where it can fetch them, and by hand."""
        files = ", ".join(self.weight_files)
        by_hand = (f"download {files} from {self.weight_source}, then pass --weights PATH, or put them in "
                   f"$EMBEDKIT_WEIGHTS/{self.name}/")
        if self.hf_repo:
            return (f"`embedkit models pull {self.name}` fetches them from the Hugging Face hub ({self.hf_repo}) "
                    f"into its cache; or {by_hand}")
        unfixed = [r.file for r in self.releases if not r.url]
        if unfixed:
            return (f"{by_hand}; or, with a direct link to {', '.join(unfixed)}, `embedkit models pull {self.name} "
                    f"--url URL` fetches it (and the rest) into $EMBEDKIT_WEIGHTS/{self.name}/")
        if self.releases:
            fetched = ", ".join(r.file for r in self.releases)
            return (f"`embedkit models pull {self.name}` fetches {fetched} from the authors' release into "
                    f"$EMBEDKIT_WEIGHTS/{self.name}/; or {by_hand}")
        return by_hand

    def missing_message(self, where: Path | None, weights_dir: str | Path | None = None) -> str:
        """The one-line error for absent weights: what is needed, how to get it, and the random-init way out.
        ``where``: the path that lacks them; None: every place :meth:`locate_weights` looked (with ``weights_dir``)."""
        place = f" at {where}" if where else f" (looked in {' and '.join(self.looked_in(weights_dir))})"
        return (
            f"No weights for model '{self.name}'{place}. "
            f"It needs: {', '.join(self.weight_files)}. To get them: {self.how_to_get()}; "
            f"or run with --random-init for random weights (labelled random-init in the store)."
        )

    def unusable(self, folder: Path) -> str | None:
        """The first of this model's files in ``folder`` that is not what it should be (:func:`file_problem`),
        as "<path> <what it is>"; None when every file there looks right (absent files are not looked at)."""
        for name in self.weight_files:
            path = folder / name
            problem = file_problem(path) if path.exists() else None
            if problem:
                release = next((r for r in self.releases if r.file == name), None)
                pull = (f"; `embedkit models pull {self.name}` fetches it" if self.hf_repo or (release and release.url)
                        else f"; `embedkit models pull {self.name} --url LINK` fetches it from its download link"
                        if release else "")
                return f"{path} {problem}{pull}"
        return None

    def unusable_copy(self, weights_dir: str | Path | None = None) -> str | None:
        """What is wrong with a copy of the files that is there but not used (:meth:`unusable`: the weights folder's,
        then the Hugging Face cache's); None when there is none."""
        folder = self.weights_folder(weights_dir)
        for place in (folder if folder is not None and folder.is_dir() else None, self._hf_cache_snapshot()):
            problem = self.unusable(place) if place is not None else None
            if problem:
                return problem
        return None

    def looked_in(self, weights_dir: str | Path | None = None) -> list[str]:
        """Where :meth:`locate_weights` looks without a --weights path, in words (for "not found")."""
        folder = self.weights_folder(weights_dir)
        places = [f"{folder}/" if folder else f"${WEIGHTS_ENV}/{self.name}/ (not set; nor is --weights-dir)"]
        if self.hf_repo:
            from huggingface_hub import constants

            places.append(f"the Hugging Face cache {constants.HF_HUB_CACHE} ({self.hf_repo})")
        return places

    def weights_folder(self, weights_dir: str | Path | None = None) -> Path | None:
        """This model's folder ``<root>/<name>``, root ``weights_dir`` or $EMBEDKIT_WEIGHTS; None if neither is set."""
        root = weights_dir or os.environ.get(WEIGHTS_ENV)
        return Path(root) / self.name if root else None

    def locate_weights(self, weights: str | Path | None = None,
                       weights_dir: str | Path | None = None) -> tuple[Path | None, WeightsPlace | None]:
        """Where this model's weights are, and which place that is; ``(None, None)`` when nowhere.

        The order: ``weights`` (--weights PATH, taken as given: loading checks it); ``weights_dir`` (or
        $EMBEDKIT_WEIGHTS) ``/<name>/`` holding every weight file, each what it should be (:meth:`unusable`: not
        a Git LFS pointer, ...); the snapshot folder of the standard Hugging Face
        cache (HF_HUB_CACHE / HF_HOME) holding them, for models published on the hub. Only local files are read:
        nothing here reaches the network (fetching is `embedkit models pull`).
        """
        if weights:
            return Path(weights), "--weights"
        folder = self.weights_folder(weights_dir)
        if folder is not None and folder.is_dir() and all((folder / f).exists() for f in self.weight_files) \
                and self.unusable(folder) is None:
            return folder, "weights-dir"
        snapshot = self._hf_cache_snapshot()
        if snapshot is not None and self.unusable(snapshot) is None:
            return snapshot, "hf-cache"
        return None, None

    def find_weights(self, weights_dir: str | Path | None = None) -> Path | None:
        """The weights folder :meth:`locate_weights` finds without a --weights path; None if absent."""
        return self.locate_weights(None, weights_dir)[0]

    def _hf_cache_snapshot(self) -> Path | None:
        """The cached snapshot (of refs/main) holding every weight file, read with huggingface_hub's own lookup."""
        if not self.hf_repo:
            return None
        from huggingface_hub import try_to_load_from_cache

        # try_to_load_from_cache only reads the cache folder (refs, snapshots; a dangling link counts as absent).
        cached = [try_to_load_from_cache(self.hf_repo, f) for f in self.weight_files]
        if not all(isinstance(p, str) for p in cached):
            return None
        return Path(cached[0]).parents[len(Path(self.weight_files[0]).parts) - 1]


OPENAI_CLIP_REPO = "timm/vit_base_patch16_clip_224.openai"
BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
OPENAI_CLIP_SOURCE = (f"https://huggingface.co/{OPENAI_CLIP_REPO} (open_clip_model.safetensors), "
                      "or open_clip's 'openai' pretrained tag")
BIOMEDCLIP_SOURCE = f"https://huggingface.co/{BIOMEDCLIP_REPO} (all files)"
CLINICAL_BERT_VOCAB = "vocab.txt from https://huggingface.co/emilyalsentzer/Bio_ClinicalBERT"
MEDCLIP_SOURCE = "the MedCLIP authors' release (github.com/RyanWangZf/MedCLIP, README 'pretrained weights'): unzip"
# MedCLIP's own download (medclip/constants.py, PRETRAINED_URL_MEDCLIP_*): a text file on GitHub whose body is the
# URL of a zip holding pytorch_model.bin at its root. Bio_ClinicalBERT's vocabulary is on the hub.
MEDCLIP_POINTER = "https://github.com/RyanWangZf/MedCLIP/raw/main/medclip/medclip_{}_weight.txt"
CLINICAL_BERT_VOCAB_URL = "{hf}/emilyalsentzer/Bio_ClinicalBERT/resolve/main/vocab.txt"


CLINICAL_BERT_VOCAB_RELEASE = ReleaseFile(url=CLINICAL_BERT_VOCAB_URL, file="vocab.txt")


def _medclip_release(tower: str) -> tuple[ReleaseFile, ...]:
    return (ReleaseFile(url=MEDCLIP_POINTER.format(tower), file="pytorch_model.bin", pointer=True,
                        member="pytorch_model.bin"), CLINICAL_BERT_VOCAB_RELEASE)

GLORIA_SOURCE = ("the GLoRIA authors' release (github.com/marshuang80/gloria, README 'pretrained models'); "
                 + CLINICAL_BERT_VOCAB)

TINY_EMBED_RATE = (45.0, 1000.0)  # images/s of every tiny twin (CPU, GPU)

_SPECS: list[ModelSpec] = [
    ModelSpec(name="clip", module="openclip", config="ViT-B-16-quickgelu", embed_dim=512,
              weight_files=("open_clip_model.safetensors",), weight_source=OPENAI_CLIP_SOURCE,
              hf_repo=OPENAI_CLIP_REPO,
              description="OpenAI CLIP ViT-B/16 (QuickGELU), the general-domain baseline"),
    ModelSpec(name="biomedclip", module="openclip", config="biomedclip", embed_dim=512,
              weight_files=("open_clip_config.json", "open_clip_pytorch_model.bin", "vocab.txt",
                            "tokenizer_config.json"),
              weight_source=BIOMEDCLIP_SOURCE, hf_repo=BIOMEDCLIP_REPO,
              description="BiomedCLIP: timm ViT-B/16 + PubMedBERT, trained on PMC-15M"),
    ModelSpec(name="medclip-rn50", module="medclip", config="resnet50", embed_dim=512,
              weight_files=("pytorch_model.bin", "vocab.txt"),
              weight_source=MEDCLIP_SOURCE + " medclip-pretrained.zip; " + CLINICAL_BERT_VOCAB,
              releases=_medclip_release("resnet"), lora_rank=4, embed_rate=(6.0, 800.0),
              description="MedCLIP with a ResNet-50 image tower and Bio_ClinicalBERT"),
    ModelSpec(name="medclip-vit", module="medclip", config="swin", embed_dim=512,
              weight_files=("pytorch_model.bin", "vocab.txt"),
              weight_source=MEDCLIP_SOURCE + " medclip-vit-pretrained.zip; " + CLINICAL_BERT_VOCAB,
              releases=_medclip_release("vit"), embed_rate=(4.0, 500.0),
              description="MedCLIP with a Swin-Tiny image tower ('ViT' in the paper) and Bio_ClinicalBERT"),
    ModelSpec(name="gloria", module="gloria", config="resnet50", embed_dim=768,
              weight_files=("chexpert_resnet50.ckpt", "vocab.txt"), weight_source=GLORIA_SOURCE,
              releases=(ReleaseFile(url="", file="chexpert_resnet50.ckpt"), CLINICAL_BERT_VOCAB_RELEASE),
              lora_rank=4, embed_rate=(2.0, 300.0), tiny_embed_dim=48,
              description="GLoRIA ResNet-50 with global and local (word x region) features"),
    ModelSpec(name="chexzero", module="chexzero", config="ViT-B-32-quickgelu", embed_dim=512,
              weight_files=("best_64_5e-05_original_22000_0.864.pt",),
              weight_source="the CheXzero authors' checkpoints (github.com/rajpurkarlab/CheXzero, README 'Model "
                            "Checkpoints')",
              releases=(ReleaseFile(url="", file="best_64_5e-05_original_22000_0.864.pt"),),
              embed_rate=(15.0, 1500.0),  # ViT-B/32: a quarter of ViT-B/16's image tokens
              description="CheXzero: OpenAI CLIP ViT-B/32 trained on MIMIC-CXR images and reports"),
]
# Tiny twins: the same code paths at small widths, for tests and the demo (random init only).
_SPECS += [s.tiny_twin() for s in list(_SPECS)]

MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def get_spec(name: str) -> ModelSpec:
    """Return the spec of model ``name``; an unknown name raises with the nearest known one and the full list."""
    try:
        return MODELS[name]
    except KeyError:
        import difflib

        near = difflib.get_close_matches(str(name), list(MODELS), n=1, cutoff=0.6)
        guess = f"; did you mean {near[0]}?" if near else ""
        raise UnknownModelError(f"unknown model '{name}'{guess} (known models: {', '.join(MODELS)})") from None


def random_init_id(name: str, seed: int) -> str:
    return f"{RANDOM_INIT_PREFIX}{name}:{seed}"


def instantiate(spec: ModelSpec, weights: str | Path | None = None, random_init: bool = False, seed: int = 0,
                weights_dir: str | Path | None = None):
    """Build or load a model; returns ``(model, weights_id, source)``.

    ``random_init`` builds the real architecture with random weights, labelled ``random-init:<model>:<seed>``;
    otherwise weights come from the first place :meth:`ModelSpec.locate_weights` finds them (``weights``,
    ``weights_dir`` / $EMBEDKIT_WEIGHTS ``/<model>/``, the Hugging Face cache), and are labelled by a content hash
    of what was loaded. No weights found is an error that says how to get them; nothing is downloaded.
    """
    from embedkit.models.base import state_dict_hash

    if random_init:
        return spec.build(seed), random_init_id(spec.name, seed), "random-init"
    if spec.tiny:
        raise MissingWeightsError(f"'{spec.name}' is a test configuration with no released weights: use --random-init")
    path, _place = spec.locate_weights(weights, weights_dir)
    if path is None:
        problem = spec.unusable_copy(weights_dir)
        if problem:  # the files are there but are not what they should be: say that, not "no weights"
            from embedkit.models.base import CheckpointError

            raise CheckpointError(problem)
        raise MissingWeightsError(spec.missing_message(None, weights_dir))
    model = spec.load(path)
    return model, state_dict_hash(model), str(path)


def _refuse_non_finite(model, path: Path) -> None:
    """NaN or infinite weights would embed every image as NaN: refuse them before a pass starts, naming the tensor."""
    import torch

    from embedkit.models.base import CheckpointError

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: weight '{name}' holds NaN or infinite values; the file is damaged or "
                                  "was saved from a diverged run: use the released weights")

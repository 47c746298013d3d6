"""Prompt sets: class -> list of prompts, one place for every set embedkit ships.

- ``clip``: CLIP/BiomedCLIP-style templates (BiomedCLIP's authors score with "this is a photo of {label}").
- ``chexpert-nih``: CheXpert-style severity x subtype x location prompts (the style MedCLIP and GLoRIA were
  trained with) written for NIH's six classes, including Pneumothorax and NIH's "Effusion".
- ``chexpert-authors``: the MedCLIP/GLoRIA authors' CheXpert prompt table (its "Pleural Effusion" answers NIH's
  Effusion). The table has no Pneumothorax entry; that one class takes ``chexpert-nih``'s prompts (documented).
- a YAML or JSON file of ``{class: [prompt, ...]}`` for the user's own (its set name is the file's stem).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from embedkit.errors import EmbedkitError


class PromptError(EmbedkitError):
    pass


# Plain-language names used inside templates.
_CLASS_NAMES = {"Effusion": "pleural effusion"}

CLIP_TEMPLATES = (
    "this is a photo of {name}",
    "a chest x-ray showing {name}",
    "a radiograph of a patient with {name}",
)

# The authors' CheXpert prompt table (MedCLIP / GLoRIA), as published: severity x subtype x location.
CHEXPERT_AUTHORS = {
    "Atelectasis": {
        "severity": ["", "mild", "minimal"],
        "subtype": ["subsegmental atelectasis", "linear atelectasis", "trace atelectasis", "bibasilar atelectasis",
                    "retrocardiac atelectasis", "bandlike atelectasis", "residual atelectasis"],
        "location": ["at the mid lung zone", "at the upper lung zone", "at the right lung zone",
                     "at the left lung zone", "at the lung bases", "at the right lung base", "at the left lung base",
                     "at the bilateral lung bases", "at the left lower lobe", "at the right lower lobe"],
    },
    "Cardiomegaly": {
        "severity": [""],
        "subtype": ["cardiac silhouette size is upper limits of normal", "cardiomegaly which is unchanged",
                    "mildly prominent cardiac silhouette", "portable view of the chest demonstrates stable cardiomegaly",
                    "portable view of the chest demonstrates mild cardiomegaly", "persistent severe cardiomegaly",
                    "heart size is borderline enlarged", "cardiomegaly unchanged",
                    "heart size is at the upper limits of normal", "redemonstration of cardiomegaly",
                    "ap erect chest radiograph demonstrates the heart size is the upper limits of normal",
                    "cardiac silhouette size is mildly enlarged",
                    "mildly enlarged cardiac silhouette, likely left ventricular enlargement. other chambers are less prominent",
                    "heart size remains at mildly enlarged", "persistent cardiomegaly with prominent upper lobe vessels"],
        "location": [""],
    },
    "Consolidation": {
        "severity": ["", "increased", "improved", "apperance of"],
        "subtype": ["bilateral consolidation", "reticular consolidation", "retrocardiac consolidation",
                    "patchy consolidation", "airspace consolidation", "partial consolidation"],
        "location": ["at the lower lung zone", "at the upper lung zone", "at the left lower lobe",
                     "at the right lower lobe", "at the left upper lobe", "at the right uppper lobe",
                     "at the right lung base", "at the left lung base"],
    },
    "Edema": {
        "severity": ["", "mild", "improvement in", "presistent", "moderate", "decreased"],
        "subtype": ["pulmonary edema", "trace interstitial edema", "pulmonary interstitial edema"],
        "location": [""],
    },
    "Effusion": {  # "Pleural Effusion" in the authors' table
        "severity": ["", "small", "stable", "large", "decreased", "increased"],
        "location": ["left", "right", "tiny"],
        "subtype": ["bilateral pleural effusion", "subpulmonic pleural effusion", "bilateral pleural effusion"],
    },
}

# embedkit's own table for NIH's six classes, in the same style; Pneumothorax is new.
CHEXPERT_NIH = {
    **CHEXPERT_AUTHORS,
    "Effusion": {
        "severity": ["", "small", "stable", "large", "decreased", "increased"],
        "subtype": ["pleural effusion", "bilateral pleural effusion", "subpulmonic pleural effusion",
                    "layering pleural effusion"],
        "location": ["", "on the left", "on the right"],
    },
    "Pneumothorax": {
        "severity": ["", "small", "tiny", "moderate", "large"],
        "subtype": ["pneumothorax", "apical pneumothorax", "basilar pneumothorax", "loculated pneumothorax"],
        "location": ["", "on the right", "on the left", "at the right apex", "at the left apex"],
    },
}

BUILTIN_SETS = ("clip", "chexpert-nih", "chexpert-authors")
PROMPTS_PER_CLASS = 10  # CheXpert-style prompts sampled per class, as the authors sampled n per class
PROMPT_SEED = 0


def _combinations(table: dict) -> list[str]:
    combos = itertools.product(table["severity"], table["subtype"], table["location"])
    # The authors' table repeats an entry; a set keeps each prompt once.
    return sorted({" ".join(part for part in combo if part) for combo in combos})


def _sample_chexpert(table: dict[str, dict], classes: tuple[str, ...], n: int, seed: int) -> dict[str, list[str]]:
    out = {}
    for cls in classes:
        entry = table.get(cls) or CHEXPERT_NIH.get(cls)
        if entry is None:
            raise PromptError(f"no CheXpert-style prompts for class '{cls}'; pass --prompts FILE with your own")
        prompts = _combinations(entry)
        rng = random.Random(f"{seed}:{cls}")  # seeded per class: adding a class does not change the others
        out[cls] = sorted(rng.sample(prompts, min(n, len(prompts))))
    return out


def prompt_set(name: str, classes: tuple[str, ...], n: int = PROMPTS_PER_CLASS) -> dict[str, list[str]]:
    """The prompts of set ``name`` (a built-in set or a YAML/JSON file path) for ``classes``, in class order."""
    if name == "clip":
        return {c: [t.format(name=_CLASS_NAMES.get(c, c.lower())) for t in CLIP_TEMPLATES] for c in classes}
    if name == "chexpert-nih":
        return _sample_chexpert(CHEXPERT_NIH, classes, n, PROMPT_SEED)
    if name == "chexpert-authors":
        return _sample_chexpert(CHEXPERT_AUTHORS, classes, n, PROMPT_SEED)
    return _load_file(Path(name), classes)


def set_name(name: str) -> str:
    """The name a set is stored under: built-in names as they are, files by their stem."""
    return name if name in BUILTIN_SETS else Path(name).stem


def _load_file(path: Path, classes: tuple[str, ...]) -> dict[str, list[str]]:
    if not path.is_file():
        raise PromptError(f"unknown prompt set '{path}': use one of {', '.join(BUILTIN_SETS)} or a YAML/JSON file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different types; both mean the same to the user
        raise PromptError(f"{path}: cannot parse prompts ({exc})") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and v and all(isinstance(p, str) and p.strip() for p in v) for v in data.values()
    ):
        raise PromptError(f"{path}: expected a mapping of class -> non-empty list of prompt strings")
    missing = [c for c in classes if c not in data]
    if missing:
        raise PromptError(f"{path}: no prompts for class(es) {missing}; the cohort's classes are {list(classes)}")
    return {c: list(data[c]) for c in classes}

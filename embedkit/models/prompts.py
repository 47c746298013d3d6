"""Prompt sets: class -> list of prompts, one place for every set embedkit ships.

- ``clip``: CLIP/BiomedCLIP-style templates (BiomedCLIP's authors score with "this is a photo of {label}").
- ``chexpert-nih``: embedkit's CheXpert-style prompts (severity, subtype, location: the style MedCLIP and GLoRIA
  were trained with) written for NIH's six classes, including Pneumothorax and NIH's "Effusion".
- ``chexpert-authors``: MedCLIP's draw from the authors' CheXpert prompt table, 10 per class, seeded.
- ``chexpert-gloria``: GLoRIA's draw from the same table, 5 per class after ``random.seed(6)``: its exact prompts.
- ``pairs``: multi-label zero-shot's (positive, negative) pair per label, CheXzero / vlm-fairness style:
  ``"{finding}"`` and ``"no {finding}"`` (NIH's "No Finding": ``"normal chest x-ray"`` / ``"abnormal chest x-ray"``).
- a YAML or JSON file of ``{class: [prompt, ...]}`` for the user's own (its set name is the file's stem).

In the authors' sets NIH's "Effusion" takes the table's "Pleural Effusion"; the table has no Pneumothorax, so that
class takes ``chexpert-nih``'s prompts.
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

BIOMEDCLIP_TEMPLATE = "this is a photo of {name}"  # the one template BiomedCLIP's authors score with
CLIP_TEMPLATES = (
    "this is a photo of {name}",
    "a chest x-ray showing {name}",
    "a radiograph of a patient with {name}",
)

# The authors' CheXpert prompt table, as published (GLoRIA's and MedCLIP's constants hold the same one), under
# the authors' class names. Their generator combines each class's three lists by POSITION, not by name, so the
# order of the lists is part of the table: "Pleural Effusion" lists severity, location, subtype.
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
    "Pleural Effusion": {
        "severity": ["", "small", "stable", "large", "decreased", "increased"],
        "location": ["left", "right", "tiny"],
        "subtype": ["bilateral pleural effusion", "subpulmonic pleural effusion", "bilateral pleural effusion"],
    },
}

# The authors' class name of a cohort class where the two differ.
_AUTHORS_CLASS = {"Effusion": "Pleural Effusion"}

# How each authors' set is drawn from the table: (prompts per class, seed of Python's `random`). Both authors call
# random.sample(all of a class's prompts, n) class after class in table order on the one module-level generator.
AUTHORS_DRAWS = {
    # MedCLIP: n = 10 (README, pretraining script); the README's draw is unseeded, so embedkit records its own
    # seed: 42, the one MedCLIP's pretraining script sets before it draws its evaluation prompts this way. (That
    # script's draw itself follows random.seed(1): its collator's textaugment EDA() reseeds in its constructor.)
    "chexpert-authors": (10, 42),
    # GLoRIA: n = 5 (the default its README's zero-shot example uses) after the random.seed(6) that importing
    # gloria runs, nothing drawing in between: GLoRIA's prompts exactly.
    "chexpert-gloria": (5, 6),
}

# embedkit's own table for NIH's six classes in the same style, combined severity x subtype x location by name:
# the authors' first four classes, and its own Effusion and Pneumothorax (which the authors' table lacks).
CHEXPERT_NIH = {
    **{cls: CHEXPERT_AUTHORS[cls] for cls in ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema")},
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

PAIR_SET = "pairs"  # multi-label zero-shot: [positive, negative] per label, positive first (docs/multilabel.md)
PAIR_NEGATION = "no {}"
# A label whose negation does not read as "no ...": its own pair.
_PAIR_PHRASES = {"No Finding": ("normal chest x-ray", "abnormal chest x-ray")}

BUILTIN_SETS = ("clip", "biomedclip-authors", "chexpert-nih", *AUTHORS_DRAWS, PAIR_SET)
_NIH_PER_CLASS = 10
_NIH_SEED = 0


def _authors_prompts(entry: dict[str, list[str]]) -> list[str]:
    """Every prompt the authors generate for one class of their table, in their order: the first list x the
    second x the third, by position, each ``f"{first} {second} {third}"``. Empty attributes leave their spaces
    (" cardiomegaly unchanged "), kept because GLoRIA's zero-shot counts a prompt's raw characters; a repeated
    entry gives repeated prompts, as upstream."""
    first, second, third = entry.values()
    return [f"{a} {b} {c}" for a in first for b in second for c in third]


def _authors_draw(name: str) -> dict[str, list[str]]:
    """The authors' draw of set ``name`` for every class of their table, under the authors' class names."""
    n, seed = AUTHORS_DRAWS[name]
    rng = random.Random(seed)  # the state random.seed(seed) gives the module-level generator
    drawn = {}
    for cls, entry in CHEXPERT_AUTHORS.items():  # every class in order: each one's draw moves the generator on
        prompts = _authors_prompts(entry)
        drawn[cls] = rng.sample(prompts, n) if n < len(prompts) else prompts
    return drawn


def _nih_combinations(table: dict[str, list[str]]) -> list[str]:
    combos = itertools.product(table["severity"], table["subtype"], table["location"])
    return sorted({" ".join(part for part in combo if part) for combo in combos})


def _nih_prompts(cls: str) -> list[str]:
    entry = CHEXPERT_NIH.get(cls)
    if entry is None:
        raise PromptError(f"no CheXpert-style prompts for class '{cls}'; pass --prompts FILE with your own")
    prompts = _nih_combinations(entry)
    rng = random.Random(f"{_NIH_SEED}:{cls}")  # seeded per class: adding a class does not change the others
    return sorted(rng.sample(prompts, min(_NIH_PER_CLASS, len(prompts))))


def _authors_set(name: str, classes: tuple[str, ...]) -> dict[str, list[str]]:
    drawn = _authors_draw(name)
    # A class outside the authors' table (NIH's Pneumothorax) takes chexpert-nih's prompts, so that every class of
    # an NIH cohort is scored.
    return {c: drawn.get(_AUTHORS_CLASS.get(c, c)) or _nih_prompts(c) for c in classes}


def prompt_set(name: str, classes: tuple[str, ...]) -> dict[str, list[str]]:
    """The prompts of set ``name`` (a built-in set or a YAML/JSON file path) for ``classes``, in class order."""
    if name == "clip":
        return {c: [t.format(name=_CLASS_NAMES.get(c, c.lower())) for t in CLIP_TEMPLATES] for c in classes}
    if name == "biomedclip-authors":
        return {c: [BIOMEDCLIP_TEMPLATE.format(name=_CLASS_NAMES.get(c, c.lower()))] for c in classes}
    if name == "chexpert-nih":
        return {c: _nih_prompts(c) for c in classes}
    if name in AUTHORS_DRAWS:
        return _authors_set(name, classes)
    if name == PAIR_SET:
        return {c: list(_pair(c)) for c in classes}
    return _load_file(Path(name), classes)


def _pair(cls: str) -> tuple[str, str]:
    """(positive, negative) prompt of one label: its plain name ("Pleural_Thickening" -> "pleural thickening")."""
    if cls in _PAIR_PHRASES:
        return _PAIR_PHRASES[cls]
    phrase = _CLASS_NAMES.get(cls, cls.replace("_", " ").lower())
    return phrase, PAIR_NEGATION.format(phrase)


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

"""Prompt sets: the built-in ones for NIH's six classes (the authors' drawn as the authors draw them) and the
user's own file."""

from __future__ import annotations

import hashlib
import itertools
import json
import random

import pytest

from embedkit.constants import NIH_CLASSES
from embedkit.models.prompts import PromptError, prompt_set, set_name

# The authors' CheXpert prompt table, transcribed independently from GLoRIA @416466a gloria/constants.py (MedCLIP
# @9c3396f medclip/constants.py holds the same): per class, its three attribute lists in the order the authors'
# dict lists them, which is the order their generator combines them in.
_ATELECTASIS_AT = ["mid lung zone", "upper lung zone", "right lung zone", "left lung zone", "lung bases",
                   "right lung base", "left lung base", "bilateral lung bases", "left lower lobe", "right lower lobe"]
_CONSOLIDATION_AT = ["lower lung zone", "upper lung zone", "left lower lobe", "right lower lobe", "left upper lobe",
                     "right uppper lobe", "right lung base", "left lung base"]
AUTHORS_TABLE = {
    "Atelectasis": (
        ["", "mild", "minimal"],
        [k + " atelectasis" for k in ("subsegmental", "linear", "trace", "bibasilar", "retrocardiac", "bandlike",
                                      "residual")],
        ["at the " + w for w in _ATELECTASIS_AT],
    ),
    "Cardiomegaly": (
        [""],
        ["cardiac silhouette size is upper limits of normal", "cardiomegaly which is unchanged",
         "mildly prominent cardiac silhouette", "portable view of the chest demonstrates stable cardiomegaly",
         "portable view of the chest demonstrates mild cardiomegaly", "persistent severe cardiomegaly",
         "heart size is borderline enlarged", "cardiomegaly unchanged", "heart size is at the upper limits of normal",
         "redemonstration of cardiomegaly",
         "ap erect chest radiograph demonstrates the heart size is the upper limits of normal",
         "cardiac silhouette size is mildly enlarged",
         "mildly enlarged cardiac silhouette, likely left ventricular enlargement. "
         "other chambers are less prominent",
         "heart size remains at mildly enlarged", "persistent cardiomegaly with prominent upper lobe vessels"],
        [""],
    ),
    "Consolidation": (
        ["", "increased", "improved", "apperance of"],
        [k + " consolidation" for k in ("bilateral", "reticular", "retrocardiac", "patchy", "airspace", "partial")],
        ["at the " + w for w in _CONSOLIDATION_AT],
    ),
    "Edema": (
        ["", "mild", "improvement in", "presistent", "moderate", "decreased"],
        ["pulmonary edema", "trace interstitial edema", "pulmonary interstitial edema"],
        [""],
    ),
    "Pleural Effusion": (  # severity, then LOCATION, then subtype; "bilateral" is listed twice
        ["", "small", "stable", "large", "decreased", "increased"],
        ["left", "right", "tiny"],
        [k + " pleural effusion" for k in ("bilateral", "subpulmonic", "bilateral")],
    ),
}
NIH_NAME = {"Pleural Effusion": "Effusion"}  # NIH's name for the authors' class


def _upstream_pools() -> dict[str, list[str]]:
    """Every prompt of each class as the authors' generator makes it: product by position, joined by one space."""
    return {cls: [" ".join(parts) for parts in itertools.product(*lists)] for cls, lists in AUTHORS_TABLE.items()}


def _upstream_draw(seed: int, n: int) -> dict[str, list[str]]:
    """random.seed(seed), then random.sample(pool, n) class after class in table order, under NIH's names."""
    pools = _upstream_pools()
    assert all(n < len(pool) for pool in pools.values())  # both authors sample every class at these n
    state = random.getstate()
    try:
        random.seed(seed)
        return {NIH_NAME.get(cls, cls): random.sample(pool, n) for cls, pool in pools.items()}
    finally:
        random.setstate(state)


def test_builtin_sets_cover_nih_classes_deterministically():
    clip = prompt_set("clip", NIH_CLASSES)
    assert clip["Effusion"][0] == "this is a photo of pleural effusion"  # BiomedCLIP's template, NIH's name mapped
    for name in ("chexpert-nih", "chexpert-authors", "chexpert-gloria"):
        prompts = prompt_set(name, NIH_CLASSES)
        assert list(prompts) == list(NIH_CLASSES)
        assert prompts == prompt_set(name, NIH_CLASSES)  # seeded: the same prompts every time
    nih = prompt_set("chexpert-nih", NIH_CLASSES)
    assert all(len(v) == 10 and len(set(v)) == 10 for v in nih.values())
    assert any("pneumothorax" in p for p in nih["Pneumothorax"])
    authors = prompt_set("chexpert-authors", ("Atelectasis",))["Atelectasis"]
    assert all("atelectasis" in p for p in authors)


def test_chexpert_nih_is_unchanged():
    nih = prompt_set("chexpert-nih", NIH_CLASSES)
    # sha256 of the set as it was before the authors' sets were made exact: its prompts must not move.
    digest = hashlib.sha256(json.dumps(nih, sort_keys=True).encode()).hexdigest()
    assert digest == "9fe599eb6c9abfe8d549345e1686a60f966441c47f0f81e3e2febcf79d566f74"
    assert nih["Effusion"][:2] == ["decreased bilateral pleural effusion on the right",
                                   "decreased subpulmonic pleural effusion on the right"]
    assert prompt_set("chexpert-nih", ("Edema",))["Edema"] == nih["Edema"]  # per-class seeds: classes independent


def test_authors_sets_hold_only_strings_the_authors_generate():
    pools = {NIH_NAME.get(c, c): pool for c, pool in _upstream_pools().items()}
    assert len(pools["Effusion"]) == 54 and len(set(pools["Effusion"])) == 36  # the repeated entry, kept
    for name in ("chexpert-authors", "chexpert-gloria"):
        prompts = prompt_set(name, NIH_CLASSES)
        for cls, pool in pools.items():
            assert prompts[cls] and all(p in pool for p in prompts[cls]), (name, cls)
        effusion = " ".join(prompts["Effusion"])
        assert "effusion left" not in effusion and "effusion right" not in effusion  # never combined by name
    assert "increased bilateral pleural effusion left" not in pools["Effusion"]
    assert "small left bilateral pleural effusion" in pools["Effusion"]


def test_chexpert_gloria_is_glorias_seed_6_draw_verbatim():
    gloria = prompt_set("chexpert-gloria", NIH_CLASSES)
    expected = _upstream_draw(6, 5)
    assert {c: gloria[c] for c in expected} == expected
    # Pinned as well, so a Python whose random.sample drew otherwise than GLoRIA's could not pass unnoticed.
    assert gloria["Atelectasis"][0] == "minimal residual atelectasis at the left lung zone"
    assert gloria["Cardiomegaly"][0] == " portable view of the chest demonstrates mild cardiomegaly "
    assert gloria["Effusion"] == ["increased left subpulmonic pleural effusion",
                                  "stable tiny bilateral pleural effusion", "large tiny subpulmonic pleural effusion",
                                  "decreased tiny subpulmonic pleural effusion", " tiny bilateral pleural effusion"]


def test_chexpert_authors_is_medclips_procedure_with_seed_42():
    medclip = prompt_set("chexpert-authors", NIH_CLASSES)
    expected = _upstream_draw(42, 10)
    assert {c: medclip[c] for c in expected} == expected
    # Upstream's duplicated "bilateral pleural effusion" entry can be drawn twice; this seed does, and it stays.
    assert medclip["Effusion"].count("increased right bilateral pleural effusion") == 2


def test_authors_sets_map_nih_names_and_borrow_pneumothorax():
    nih = prompt_set("chexpert-nih", NIH_CLASSES)
    for name in ("chexpert-authors", "chexpert-gloria"):
        prompts = prompt_set(name, NIH_CLASSES)
        assert prompts["Pneumothorax"] == nih["Pneumothorax"]  # not in the authors' table
        by_authors_name = prompt_set(name, ("Pleural Effusion", "Edema"))  # a CheXpert cohort's class names
        assert by_authors_name == {"Pleural Effusion": prompts["Effusion"], "Edema": prompts["Edema"]}
        assert prompt_set(name, ("Edema",)) == {"Edema": prompts["Edema"]}  # one draw over the whole table
        with pytest.raises(PromptError, match="no CheXpert-style prompts for class 'Fracture'"):
            prompt_set(name, ("Fracture",))


def test_user_file_in_json_and_yaml(tmp_path):
    data = {c: [f"an x-ray with {c.lower()}", f"{c.lower()} is present"] for c in NIH_CLASSES}
    (tmp_path / "mine.json").write_text(json.dumps(data))
    (tmp_path / "mine.yaml").write_text("\n".join(f"{c}:\n  - {v[0]}\n  - {v[1]}" for c, v in data.items()))
    assert prompt_set(str(tmp_path / "mine.json"), NIH_CLASSES) == data
    assert prompt_set(str(tmp_path / "mine.yaml"), NIH_CLASSES) == data
    assert set_name(str(tmp_path / "mine.yaml")) == "mine"


def test_bad_prompt_files_say_what_is_wrong(tmp_path):
    (tmp_path / "short.json").write_text(json.dumps({"Atelectasis": ["x"]}))
    with pytest.raises(PromptError, match="no prompts for class"):
        prompt_set(str(tmp_path / "short.json"), NIH_CLASSES)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PromptError, match="cannot parse"):
        prompt_set(str(tmp_path / "bad.json"), NIH_CLASSES)
    (tmp_path / "shape.json").write_text(json.dumps({c: "one string" for c in NIH_CLASSES}))
    with pytest.raises(PromptError, match="non-empty list"):
        prompt_set(str(tmp_path / "shape.json"), NIH_CLASSES)
    with pytest.raises(PromptError, match="unknown prompt set"):
        prompt_set("nope", NIH_CLASSES)


def test_embed_stores_a_user_prompt_set_beside_the_default(store, small_cohort, tmp_path):
    from embedkit.data.cohort import import_cohort, validate_cohort
    from embedkit.embed import embed_cohort
    from embedkit.models.registry import get_spec, instantiate

    frame, folder = small_cohort
    import_cohort(store, validate_cohort(frame, "c", images_dir=folder), "c")
    (tmp_path / "mine.json").write_text(json.dumps({c: [f"{c} seen"] for c in NIH_CLASSES}))
    spec = get_spec("tiny-clip")
    net, weights_id, source = instantiate(spec, random_init=True)
    embed_cohort(store, spec, net, weights_id, source, "c", device="cpu", workers=0, progress=False,
                 extra_prompt_sets=[str(tmp_path / "mine.json")])
    prompts = store.read("prompts_tiny_clip").to_pandas()
    assert sorted(prompts["prompt_set"].unique()) == ["biomedclip-authors", "clip", "mine"]  # the family's two
    assert prompts.loc[prompts["prompt_set"] == "mine", "prompt"].tolist() == [f"{c} seen" for c in NIH_CLASSES]

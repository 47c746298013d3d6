"""Prompt sets: the built-in ones for NIH's six classes and the user's own file."""

from __future__ import annotations

import json

import pytest

from embedkit.constants import NIH_CLASSES
from embedkit.models.prompts import PromptError, prompt_set, set_name


def test_builtin_sets_cover_nih_classes_deterministically():
    clip = prompt_set("clip", NIH_CLASSES)
    assert clip["Effusion"][0] == "this is a photo of pleural effusion"  # BiomedCLIP's template, NIH's name mapped
    for name in ("chexpert-nih", "chexpert-authors"):
        prompts = prompt_set(name, NIH_CLASSES)
        assert list(prompts) == list(NIH_CLASSES)
        assert all(len(v) == 10 and len(set(v)) == 10 for v in prompts.values())
        assert prompts == prompt_set(name, NIH_CLASSES)  # seeded: the same prompts every time
    assert any("pneumothorax" in p for p in prompt_set("chexpert-nih", NIH_CLASSES)["Pneumothorax"])
    authors = prompt_set("chexpert-authors", ("Atelectasis",))["Atelectasis"]
    assert all("atelectasis" in p for p in authors)


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
    assert sorted(prompts["prompt_set"].unique()) == ["clip", "mine"]
    assert prompts.loc[prompts["prompt_set"] == "mine", "prompt"].tolist() == [f"{c} seen" for c in NIH_CLASSES]

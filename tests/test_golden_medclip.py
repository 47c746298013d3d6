"""Golden tests for MedCLIP: embedkit against golden_medclip, an independent transcription of the authors' code.

Each test writes a checkpoint in the authors' layout (``pytorch_model.bin`` with their transformers-4 key names and
stale buffers, ``vocab.txt`` beside it), loads it with embedkit, and compares with the transcription run on the
same state dict: preprocessed pixels, image and text embeddings, zero-shot class scores, to 1e-5. The prompt-set
tests check ``chexpert-authors`` against the authors' generator over every combination it can produce.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import golden_medclip as G
import numpy as np
import pytest
import torch
from PIL import Image

from embedkit.constants import NIH_CLASSES
from embedkit.heads.zeroshot import class_scores
from embedkit.models import bert, prompts
from embedkit.models import medclip as M
from embedkit.models.registry import get_spec

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
REAL_CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-cxr"
REAL_FILES = ("00000001_000.png", "00027426_000.png", "16747_3_1.jpg")  # 512 x 512 L, 512 x 512 L, 1036 x 885 RGB
AUTHORS_CLASSES = tuple(G.CHEXPERT_CLASS_PROMPTS)  # the authors' names: "Pleural Effusion", not NIH's "Effusion"

TINY_BERT = G.BertSize(vocab_size=bert.TINY_BERT["vocab_size"], hidden=bert.TINY_BERT["hidden_size"],
                       layers=bert.TINY_BERT["num_hidden_layers"], heads=bert.TINY_BERT["num_attention_heads"],
                       intermediate=bert.TINY_BERT["intermediate_size"])
TINY_SWIN = G.SwinSize(embed_dim=M.TINY_SWIN["embed_dim"], depths=tuple(M.TINY_SWIN["depths"]),
                       heads=tuple(M.TINY_SWIN["num_heads"]))
TINY_RESNET = G.ResNetSize(blocks=(1, 1, 1, 1), width_per_group=M.TINY_RESNET_WIDTH)
# Each tiny twin's checkpoint has its logit_scale on one side of the authors' clamp at 4.6052: above it (as a
# trained model's may be: the clamp runs before each step) for the ResNet, below for the Swin.
TINY = {
    "tiny-medclip-rn50": (G.MedCLIPSize("resnet", bert=TINY_BERT, resnet=TINY_RESNET, proj_dim=32), 4.7),
    "tiny-medclip-vit": (G.MedCLIPSize("swin", bert=TINY_BERT, swin=TINY_SWIN, proj_dim=32), 3.1),
}


def _vocab() -> list[str]:
    """A WordPiece vocabulary with [PAD] = 0: characters, their ## forms, the prompts' short words and a few word
    pieces, so that tokenising the real prompts takes whole words, pieces and single characters."""
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    words = sorted({w for pool in G.chexpert_class_combinations().values() for p in pool
                    for w in p.replace(",", " ").replace(".", " ").split() if len(w) <= 8})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *words,
            "atel", "##ectasis", "cardio", "##megaly", "consol", "##idation", "##ary"]


def _write_vocab(folder: Path) -> Path:
    (folder / "vocab.txt").write_text("\n".join(_vocab()) + "\n")
    return folder / "vocab.txt"


def _write_release(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """The authors' release, unzipped: their state dict, and Bio_ClinicalBERT's vocab.txt the user puts beside it."""
    folder.mkdir(parents=True)
    torch.save(state, folder / "pytorch_model.bin")
    _write_vocab(folder)
    return folder


class Release:
    """One checkpoint in the authors' format, loaded by embedkit, and the transcription's view of it."""

    def __init__(self, name: str, folder: Path, size: G.MedCLIPSize, logit_scale: float, seed: int) -> None:
        self.name, self.size = name, size
        self.state = G.authors_state_dict(size, seed=seed, logit_scale=logit_scale)
        _write_release(folder, self.state)
        self.model = get_spec(name).load(folder)
        self.tokenizer = G.WordPieceTokenizer(folder / "vocab.txt")


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Release]:
    root = tmp_path_factory.mktemp("golden-medclip")
    return {name: Release(name, root / name, size, scale, seed=i)
            for i, (name, (size, scale)) in enumerate(TINY.items())}


def _textured(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    values = 120 + 90 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + rng.normal(0, 30, (height, width))
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")


def _images() -> dict[str, Image.Image]:
    """The real X-rays of ../shared/data (when present) and synthetic ones: non-square, and smaller than 224."""
    images = {f.name: Image.open(f) for f in (REAL_CXR / n for n in REAL_FILES) if f.is_file()}
    images["synthetic-300x260"] = _textured(300, 260)
    images["synthetic-rgb-180x120"] = _textured(180, 120, seed=1).convert("RGB")
    return images


REFERENCE_PREPROCESSING = {"upstream": G.feature_extractor, "study": G.study_transform}


def _authors_draw() -> dict[str, list[str]]:
    """MedCLIP's chexpert prompts drawn the authors' way with the (n, seed) embedkit records for chexpert-authors."""
    n, seed = prompts.AUTHORS_DRAWS["chexpert-authors"]
    state = random.getstate()
    try:
        random.seed(seed)
        return G.generate_chexpert_class_prompts(n=n)
    finally:
        random.setstate(state)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("preprocess", ["upstream", "study"])
def test_preprocessed_pixels_match_the_authors(preprocess):
    model = get_spec("tiny-medclip-rn50").build(0)
    transform, reference = model.image_transform(preprocess), REFERENCE_PREPROCESSING[preprocess]
    images = _images()
    for name, image in images.items():
        got, expected = transform(image), reference(image)
        assert got.shape == expected.shape == (1, 224, 224), name
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_study_preprocessing_is_not_medclips_zeroshot_dataset():
    # MedCLIP's own ZeroShotImageDataset pads to a square before Resize((224, 224)); the study crops. They agree
    # on a square scan and differ on any other (docs/models.md says so).
    study = get_spec("tiny-medclip-rn50").build(0).image_transform("study")
    square, wide = _textured(512, 512), _textured(400, 300)
    torch.testing.assert_close(study(square), G.zeroshot_dataset_transform(square), atol=ATOL, rtol=0)
    assert (study(wide) - G.zeroshot_dataset_transform(wide)).abs().max() > 0.5


# ---------------------------------------------------------------------------------------------------------------
# Encoders


@pytest.mark.parametrize("name", list(TINY))
def test_image_embeddings_match_the_authors(releases, name):
    release = releases[name]
    images = list(_images().values())
    for preprocess, reference in REFERENCE_PREPROCESSING.items():
        transform = release.model.image_transform(preprocess)
        with torch.no_grad():
            got = release.model.encode_image(torch.stack([transform(i) for i in images]))  # what a pass stores
            raw = G.vision_model_forward(release.state, release.size, torch.stack([reference(i) for i in images]))
        torch.testing.assert_close(got, raw / raw.norm(dim=-1, keepdim=True), atol=ATOL, rtol=0)
        assert raw.norm(dim=-1).min() > 0.1  # unit vectors of something, not of noise around zero
    upstream, some = release.model.image_transform("upstream"), images[:2]
    with torch.no_grad():  # before normalisation too (the study's LoRA head reads these)
        got_raw = release.model.encode_image_raw(torch.stack([upstream(i) for i in some]))
        expected_raw = G.vision_model_forward(release.state, release.size,
                                              torch.stack([G.feature_extractor(i) for i in some]))
    torch.testing.assert_close(got_raw, expected_raw, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name", list(TINY))
def test_text_embeddings_of_real_prompts_match_the_authors(releases, name):
    release = releases[name]
    by_class = prompts.prompt_set("chexpert-authors", NIH_CLASSES)
    long = {"truncated": ["Mild, " * 60 + "atelectasis", "Cardiomegaly."]}  # 122 pieces: cut to 77 tokens
    assert release.tokenizer(long["truncated"])["input_ids"].shape == (2, 77)
    for cls, texts in {**by_class, **long}.items():  # class by class, as embedkit's pass and the authors tokenise
        tokens, reference_tokens = release.model.tokenize(texts), release.tokenizer(texts)
        torch.testing.assert_close(tokens["input_ids"], reference_tokens["input_ids"], atol=0, rtol=0)
        torch.testing.assert_close(tokens["attention_mask"], reference_tokens["attention_mask"], atol=0, rtol=0)
        with torch.no_grad():
            got = release.model.encode_text(tokens)
            expected = G.encode_text(release.state, release.size, reference_tokens)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m: f"{cls}: {m}")
    assert (release.tokenizer(by_class["Cardiomegaly"])["attention_mask"] == 0).any()  # padding is in the mean
    unk = release.tokenizer.vocab["[UNK]"]
    assert not (release.tokenizer(sum(by_class.values(), []))["input_ids"] == unk).any()


def test_text_rule_matches_the_authors_with_layers_1_2_and_last_apart(tmp_path):
    # The tiny tower has 2 layers, so hidden state 2 is the last; at 4 layers the three are distinct.
    size = G.BertSize(vocab_size=512, hidden=32, layers=4, heads=2, intermediate=64)
    state = G.authors_state_dict(G.MedCLIPSize("resnet", bert=size, resnet=TINY_RESNET, proj_dim=16), seed=5)
    text = M.ClinicalBertText({**bert.TINY_BERT, "num_hidden_layers": 4}, embed_dim=16).eval()
    own = {k[len("text_model."):]: v for k, v in state.items()
           if k.startswith("text_model.") and not k.endswith("position_ids")}
    text.load_state_dict(own, strict=True)
    tokenizer = G.WordPieceTokenizer(_write_vocab(tmp_path))
    tokens = tokenizer(prompts.prompt_set("chexpert-authors", ("Atelectasis",))["Atelectasis"])
    with torch.no_grad():
        got = text(tokens["input_ids"], tokens["attention_mask"])
        expected = G.text_model_forward(state, size, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot scoring


@pytest.mark.parametrize("value", [-1.0, 0.0, 2.5, math.log(100), 4.6052, 4.60521, 4.7, 9.0])
def test_logit_scale_is_clamped_where_the_authors_clamp_it(releases, value):
    model = releases["tiny-medclip-rn50"].model
    before = model.logit_scale.detach().clone()
    try:
        with torch.no_grad():
            model.logit_scale.fill_(value)
        scale, _ = M.FAMILY.logit_scale(model.zeroshot_logit_scale(), "test")
        expected = float(G.clamped_logit_scale({"logit_scale": torch.tensor(value)}))
        assert scale == pytest.approx(expected, abs=ATOL, rel=0)
    finally:
        with torch.no_grad():
            model.logit_scale.copy_(before)


@pytest.mark.parametrize("name", list(TINY))
def test_zero_shot_scores_match_the_authors_prompt_classifier(releases, name):
    release = releases[name]
    model = release.model
    by_class = prompts.prompt_set("chexpert-authors", AUTHORS_CLASSES)
    images = list(_images().values())
    with torch.no_grad():
        # embedkit's path: the stored vectors (float32), then the family's rule off them
        image_vectors = model.encode_image(torch.stack([model.image_transform("upstream")(i) for i in images]))
        prompt_vectors = [model.encode_text(model.tokenize(texts)) for texts in by_class.values()]
        reference_pixels = torch.stack([G.feature_extractor(i) for i in images])
    prompt_class = np.concatenate([np.full(len(v), c) for c, v in enumerate(prompt_vectors)])
    vectors = torch.cat(prompt_vectors).float().numpy()
    scale, _ = M.FAMILY.logit_scale(model.zeroshot_logit_scale(), "weights table")
    reference_inputs = G.process_class_prompts(_authors_draw(), release.tokenizer)
    for ensemble, authors_flag in (("mean", True), ("max", False)):
        got = class_scores(M.FAMILY, image_vectors.float().numpy(), vectors, prompt_class, len(by_class), scale,
                           ensemble)
        expected, names = G.prompt_classifier(release.state, release.size, reference_pixels, reference_inputs,
                                              ensemble=authors_flag)
        assert names == list(by_class)
        np.testing.assert_allclose(got, expected.numpy(), atol=ATOL, rtol=0, err_msg=f"{name} {ensemble}")
    assert np.ptp(expected.numpy()) > 1.0  # scores that differ: a wrong scale or class would show


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def test_chexpert_authors_strings_all_occur_in_the_authors_generation():
    combinations = G.chexpert_class_combinations()  # every prompt the generator can draw, not a sample
    assert {c: len(v) for c, v in combinations.items()} == {
        "Atelectasis": 210, "Cardiomegaly": 15, "Consolidation": 192, "Edema": 18, "Pleural Effusion": 54}
    embedkit_set = prompts.prompt_set("chexpert-authors", NIH_CLASSES)
    authors_name = {"Effusion": "Pleural Effusion"}
    for cls, texts in embedkit_set.items():
        if cls == "Pneumothorax":  # not in the authors' table: embedkit borrows chexpert-nih's (docs/models.md)
            assert "Pneumothorax" not in combinations
            assert texts == prompts.prompt_set("chexpert-nih", ("Pneumothorax",))["Pneumothorax"]
            continue
        pool = set(combinations[authors_name.get(cls, cls)])
        assert texts and all(t in pool for t in texts), cls


def test_the_recorded_seed_reproduces_chexpert_authors():
    draw = _authors_draw()
    n, _ = prompts.AUTHORS_DRAWS["chexpert-authors"]
    assert all(len(v) == n for v in draw.values())
    assert prompts.prompt_set("chexpert-authors", AUTHORS_CLASSES) == draw
    nih = prompts.prompt_set("chexpert-authors", NIH_CLASSES)
    assert nih["Effusion"] == draw["Pleural Effusion"]


# ---------------------------------------------------------------------------------------------------------------
# Full size


@pytest.mark.slow
@pytest.mark.parametrize("name", ["medclip-rn50", "medclip-vit"])
def test_full_size_checkpoint_matches_the_authors(tmp_path, name):
    # Random weights in the authors' full-size layout (133 M / 137 M parameters): ResNet-50 or Swin-Tiny and a
    # 12-layer Bio_ClinicalBERT-shaped text tower. Two images and one class's prompts keep it to a few seconds.
    size = G.MedCLIPSize("resnet" if name == "medclip-rn50" else "swin")
    release = Release(name, tmp_path / name, size, logit_scale=4.7, seed=11)
    model = release.model
    images = [_textured(300, 260), _textured(180, 120, seed=1).convert("RGB")]
    texts = prompts.prompt_set("chexpert-authors", ("Edema",))["Edema"]
    with torch.no_grad():
        got_image = model.encode_image(torch.stack([model.image_transform("upstream")(i) for i in images]))
        got_text = model.encode_text(model.tokenize(texts))
        expected_image = G.encode_image(release.state, size, torch.stack([G.feature_extractor(i) for i in images]))
        expected_text = G.encode_text(release.state, size, release.tokenizer(texts))
    torch.testing.assert_close(got_image, expected_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_text, expected_text, atol=ATOL, rtol=0)
    scale, _ = M.FAMILY.logit_scale(model.zeroshot_logit_scale(), "weights table")
    got = class_scores(M.FAMILY, got_image.numpy(), got_text.numpy(), np.zeros(len(texts), int), 1, scale, "mean")
    expected = G.compute_logits(release.state, expected_image, expected_text).mean(1, keepdim=True)
    np.testing.assert_allclose(got, expected.numpy(), atol=ATOL, rtol=0)

"""Golden tests for OpenAI CLIP, BiomedCLIP and CheXzero: embedkit against the authors' code, to 1e-5.

Each test writes a checkpoint in the authors' own format (OpenAI's state dict and TorchScript archive, BiomedCLIP's
hub folder, CheXzero's ``torch.save(model.state_dict())``), loads it through ``get_spec(name).load``, and compares
what embedkit computes (pixels, tokens, image and text embeddings, the family's zero-shot class scores off the
vectors) with the independent transcriptions in ``tests/golden/`` and, where it is the authors' code or an
independent loader, with open_clip itself. Real X-rays from ../shared/data and synthetic images are the inputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported: never the hub

import copy
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from golden import biomedclip as ref_biomedclip
from golden import chexzero as ref_chexzero
from golden import openai_clip as ref_clip

from embedkit.constants import NIH_CLASSES
from embedkit.data.images import decode_image
from embedkit.heads.zeroshot import class_scores
from embedkit.models import bert, openclip
from embedkit.models.registry import get_spec
from embedkit.store.runs import softmax

ATOL = 1e-5
REAL_CXR = Path(__file__).parents[2] / "shared" / "data" / "real-cxr"
# The tiny twins' architectures (configs/openclip/tiny-*.json): the state dict does not say the head counts.
TINY_HEADS = dict(vision_heads=2, text_heads=2)
TINY_CLIP = dict(embed_dim=32, image_resolution=224, vision_layers=2, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=32, transformer_layers=2)
# Prompts beyond the shipped sets: what the BPE's cleaning (ftfy, html entities, whitespace, case) must handle.
ODD_PROMPTS = ["  Pleural   EFFUSION\n", "no &amp; sign of pneumothorax", "café-au-lait, 3 cm (left)"]


def assert_close(actual, expected, what: str) -> None:
    actual = torch.as_tensor(np.asarray(actual, dtype=np.float64))
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    """The real X-rays (grayscale PNGs, an RGB JPEG) and two synthetic files: a landscape colour image (its
    channels differ) and a portrait grayscale one with odd sides."""
    folder = tmp_path_factory.mktemp("golden-images")
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(size=(210, 333, 3)), axis=1)
    smooth = (255 * (smooth - smooth.min()) / (smooth.max() - smooth.min())).astype(np.uint8)
    Image.fromarray(smooth, mode="RGB").save(folder / "colour-landscape.png")
    Image.fromarray(rng.integers(0, 256, (301, 187), dtype=np.uint8), mode="L").save(folder / "gray-portrait.png")
    real = sorted(REAL_CXR.glob("*.png")) + sorted(REAL_CXR.glob("*.jpg")) if REAL_CXR.is_dir() else []
    return real + sorted(folder.iterdir())


def assert_logits_close(scores, logits, scale: float, what: str = "") -> None:
    """Zero-shot logits are ``scale`` (100) x cosines: float32 embeddings that agree to 1e-7 give logits that agree
    to 1e-5 only up to that factor, so they are compared as cosines (logits / scale) and as softmax probabilities."""
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    assert_close(np.asarray(scores) / scale, logits / scale, "zero-shot logits / logit scale" + what)
    assert_close(softmax(np.asarray(scores)), logits.softmax(dim=1), "zero-shot probabilities" + what)


def test_the_inputs_include_real_x_rays(image_files):
    if not REAL_CXR.is_dir():
        pytest.skip(f"no real chest X-rays under {REAL_CXR}")
    assert sum(p.parent == REAL_CXR for p in image_files) >= 3


def opened(path: Path) -> Image.Image:
    """``Image.open(path)`` as the authors' examples pass it to their transforms, read and the file closed."""
    with Image.open(path) as image:
        return image.copy()  # closing destroys the image's data


def nih_prompts(family_name: str, prompt_set: str) -> tuple[list[str], list[list[str]], np.ndarray]:
    """(flat prompts, prompts per class, each prompt's class) of embedkit's set for NIH's classes."""
    family = get_spec(family_name).family
    _, per_class = family.prompts(prompt_set, NIH_CLASSES)
    flat = [p for c in NIH_CLASSES for p in per_class[c]]
    prompt_class = np.array([i for i, c in enumerate(NIH_CLASSES) for _ in per_class[c]])
    return flat, [per_class[c] for c in NIH_CLASSES], prompt_class


# --------------------------------------------------------------------------------------------------------------
# OpenAI CLIP (clip): openai/CLIP's model, transform, tokenizer and the notebook's zero-shot


def write_openai_archive(model: ref_clip.CLIP, state: dict[str, torch.Tensor], file: Path,
                         half: bool = False, methods: tuple[str, ...] = ("forward", "encode_image", "encode_text")
                         ) -> Path:
    """What ``clip.load`` downloads: the model traced (forward, encode_image, encode_text; ``methods``: fewer, which
    changes no tensor of the archive) and saved with torch.jit.save, its JIT integers as tensors; ``half``: fp16
    weights, as OpenAI released them."""
    traced_model = copy.deepcopy(model)
    for name in ref_clip.JIT_INTEGERS:
        traced_model.__dict__.pop(name, None)  # the reference keeps context_length as a plain int
        traced_model.register_buffer(name, state[name].clone())
    pixels = torch.zeros(1, 3, traced_model.visual.input_resolution, traced_model.visual.input_resolution)
    text = ref_clip.tokenize(["a chest x-ray"], model.context_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        inputs = {"forward": (pixels, text), "encode_image": (pixels,), "encode_text": (text,)}
        traced = torch.jit.trace_module(traced_model, {m: inputs[m] for m in methods}, check_trace=False)
        torch.jit.save(traced.half() if half else traced, str(file))
    return file


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A random OpenAI-layout ViT at tiny-clip's sizes: the reference model, a plain state dict file (OpenAI's key
    names and JIT integers) and a TorchScript archive of the reference model itself."""
    folder = tmp_path_factory.mktemp("golden-clip")
    state = ref_clip.random_state_dict(seed=11, **TINY_CLIP)
    model = ref_clip.build_model(state, **TINY_HEADS)
    torch.save(state, folder / "clip_state_dict.pt")
    (folder / "clip").mkdir()
    write_openai_archive(model, state, folder / "clip" / "ViT-B-16.pt")
    return model, state, {"state dict": folder / "clip_state_dict.pt", "torchscript": folder / "clip" / "ViT-B-16.pt"}


def test_clip_tokens_are_openai_tokenize():
    prompts = nih_prompts("clip", "clip")[0] + nih_prompts("clip", "biomedclip-authors")[0] + ODD_PROMPTS
    model = get_spec("tiny-clip").build(seed=0)
    assert torch.equal(model.tokenize(prompts)["input_ids"], ref_clip.tokenize(prompts))


def test_clip_pixels_are_openai_transform(image_files):
    transform = get_spec("tiny-clip").build(seed=0).image_transform()
    for path in image_files:
        with Image.open(path) as image:  # clip's README: preprocess(Image.open(path))
            expected = ref_clip.Preprocess(224)(image)
        assert_close(transform(decode_image(path)), expected, path.name)


@pytest.mark.parametrize("layout", ["state dict", "torchscript"])
def test_clip_checkpoint_embeds_and_scores_as_openai(clip_files, image_files, layout):
    reference, _, files = clip_files
    spec = get_spec("tiny-clip")
    loaded = spec.load(files[layout])
    pixels = torch.stack([ref_clip.Preprocess(224)(opened(p)) for p in image_files])
    flat, per_class, prompt_class = nih_prompts("clip", "clip")
    with torch.no_grad():
        raw = loaded.encode_image_raw(pixels)
        image = loaded.encode_image(pixels)
        text = loaded.encode_text(loaded.tokenize(flat + ODD_PROMPTS))
        expected_raw = reference.encode_image(pixels)
        expected_text = reference.encode_text(ref_clip.tokenize(flat + ODD_PROMPTS))
    assert_close(raw, expected_raw, "image features")
    assert_close(image, expected_raw / expected_raw.norm(dim=-1, keepdim=True), "unit image features")
    assert_close(text, expected_text / expected_text.norm(dim=-1, keepdim=True), "unit text features")
    assert math.isclose(loaded.zeroshot_logit_scale(), 100.0, rel_tol=1e-6)  # the released scale, ln(100)

    # embedkit's rule off the vectors (its default ensemble) against the notebook's classifier
    family = spec.family
    scores = class_scores(family, image.numpy(), text[:len(flat)].numpy(), prompt_class, len(NIH_CLASSES),
                          loaded.zeroshot_logit_scale(), family.ensembles[0])
    expected = ref_clip.zeroshot_logits(reference, pixels, ref_clip.zeroshot_classifier(reference, per_class))
    assert_logits_close(scores, expected, 100.0)
    assert (scores.argmax(axis=1) == expected.argmax(dim=1).numpy()).all()


def test_clip_open_clip_agrees_with_the_reference(clip_files, image_files, tmp_path):
    """open_clip's own loader (local-dir: its config and its weights file) on the same weights, another check of
    the reference: pixels, tokens and embeddings."""
    import open_clip

    reference, state, _ = clip_files
    (tmp_path / "open_clip_config.json").write_text(json.dumps(openclip.model_config(get_spec("tiny-clip"))))
    torch.save({k: v for k, v in state.items() if k not in ref_clip.JIT_INTEGERS},
               tmp_path / "open_clip_pytorch_model.bin")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    for path in image_files:
        with Image.open(path) as image:
            assert_close(preprocess(image), ref_clip.Preprocess(224)(image), path.name)
    prompts = nih_prompts("clip", "clip")[0] + ODD_PROMPTS
    assert torch.equal(tokenizer(prompts), ref_clip.tokenize(prompts))
    pixels = torch.stack([ref_clip.Preprocess(224)(opened(p)) for p in image_files])
    with torch.no_grad():
        assert_close(model.eval().encode_image(pixels), reference.encode_image(pixels), "image features")
        assert_close(model.encode_text(tokenizer(prompts)), reference.encode_text(ref_clip.tokenize(prompts)),
                     "text features")


@pytest.mark.slow
def test_full_size_vit_b16_torchscript_loads_and_matches_open_clip(tmp_path, image_files):
    """OpenAI's ViT-B/16 at full size, as released (a TorchScript archive of fp16 weights, ~300 MB): embedkit's
    ``clip`` matches the reference built by OpenAI's own rule (heads = width // 64) and open_clip's
    ``load_openai_model``. Tracing dominates the time: only ``forward`` is traced (both towers' modules, every
    tensor; neither loader runs the archive's methods)."""
    import open_clip

    full = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_layers=12)
    state = ref_clip.random_state_dict(seed=5, **full)
    state = {k: v.half().float() if v.is_floating_point() and k != "logit_scale" else v for k, v in state.items()}
    reference = ref_clip.build_model(state)
    assert (reference.visual.transformer.resblocks[0].attn.heads, reference.transformer.resblocks[0].attn.heads) \
        == (12, 8)
    file = write_openai_archive(reference, state, tmp_path / "ViT-B-16.pt", half=True, methods=("forward",))
    pixels = ref_clip.Preprocess(224)(opened(image_files[0]))[None]
    prompts = nih_prompts("clip", "clip")[0][:2]
    with torch.no_grad():
        expected_image = reference.encode_image(pixels)
        expected_text = reference.encode_text(ref_clip.tokenize(prompts))
        del reference
        loaded = get_spec("clip").load(file)
        assert_close(loaded.encode_image_raw(pixels), expected_image, "image features")
        assert_close(loaded.encode_text(loaded.tokenize(prompts)),
                     expected_text / expected_text.norm(dim=-1, keepdim=True), "unit text features")
        del loaded
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice (the test's own file)
            theirs = open_clip.load_openai_model(str(file), device="cpu").eval()
        assert_close(theirs.encode_image(pixels), expected_image, "open_clip image features")
        assert_close(theirs.encode_text(ref_clip.tokenize(prompts)), expected_text, "open_clip text features")


# --------------------------------------------------------------------------------------------------------------
# BiomedCLIP: its authors' code is open_clip; the hub folder, open_clip's loader, the model card's zero-shot

BIOMEDCLIP_HUB_BERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
# The labels a user gives the card's example for NIH's classes (embedkit's biomedclip-authors names).
BIOMEDCLIP_LABELS = ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion", "pneumothorax"]


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm gains and biases too), logit_scale ln(100) as released."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name == "logit_scale":
                p.fill_(math.log(100.0))
            elif p.ndim == 1 and ("norm" in name.lower() or "ln" in name.split(".")[-2]) and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * math.prod(p.shape[1:]) ** -0.5)


@pytest.fixture(scope="module")
def biomedclip_folders(tmp_path_factory):
    """(hub folder, open_clip's offline copy): the hub repository's layout at tiny-biomedclip's sizes, random weights.

    The hub's ``open_clip_config.json`` names the BERT on the hub; open_clip's copy points the text tower's config
    at the shipped tiny BERT config and its tokenizer at the folder's own vocab.txt (the one change offline needs).
    """
    import open_clip

    hub = tmp_path_factory.mktemp("biomedclip-hub")
    config = openclip.model_config(get_spec("tiny-biomedclip"))
    config["model_cfg"]["text_cfg"].update(hf_model_name=BIOMEDCLIP_HUB_BERT, hf_tokenizer_name=BIOMEDCLIP_HUB_BERT)
    (hub / "open_clip_config.json").write_text(json.dumps(config, indent=4))
    words = tuple({w for label in BIOMEDCLIP_LABELS for w in label.split()} | {"this", "is", "a", "photo", "of"})
    bert.write_tokenizer_folder(hub, bert.synthetic_vocab(bert.TINY_BERT["vocab_size"], words=tuple(sorted(words))))

    local = tmp_path_factory.mktemp("biomedclip-open-clip")
    offline = copy.deepcopy(config)
    offline["model_cfg"]["text_cfg"].update(hf_model_name=str(openclip.CONFIG_DIR / "tiny-bert"),
                                            hf_tokenizer_name=str(local))
    (local / "open_clip_config.json").write_text(json.dumps(offline))
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(hub / name, local / name)
    openclip._register_tiny_timm_vit()  # the tiny timm ViT stands in for timm's vit_base_patch16_224
    model = open_clip.create_model(f"local-dir:{local}", pretrained_text=False)  # the architecture, no weights
    randomise(model, seed=3)
    state = dict(model.state_dict())
    state["text.transformer.embeddings.position_ids"] = torch.arange(512)[None]  # the released file's stale buffer
    torch.save(state, hub / "open_clip_pytorch_model.bin")
    shutil.copy(hub / "open_clip_pytorch_model.bin", local / "open_clip_pytorch_model.bin")
    return hub, local


def test_biomedclip_hub_folder_embeds_and_scores_as_open_clip(biomedclip_folders, image_files):
    hub, local = biomedclip_folders
    spec = get_spec("tiny-biomedclip")
    loaded = spec.load(hub)
    model, preprocess, tokenizer = ref_biomedclip.load(local)
    for path in image_files:
        with Image.open(path) as image:
            assert_close(loaded.image_transform()(decode_image(path)), preprocess(image), path.name)
    flat, _, prompt_class = nih_prompts("tiny-biomedclip", "biomedclip-authors")
    card = [ref_biomedclip.TEMPLATE + label for label in BIOMEDCLIP_LABELS]
    assert flat == card  # embedkit's set is the card's template over the class names
    prompts = flat + ODD_PROMPTS
    assert torch.equal(loaded.tokenize(prompts)["input_ids"], tokenizer(prompts, context_length=256))
    assert (loaded.tokenize(prompts)["input_ids"] != 100).all()  # no [UNK]: the vocabulary file was read

    pixels = torch.stack([preprocess(opened(p)) for p in image_files])
    with torch.no_grad():
        image = loaded.encode_image(pixels)
        text = loaded.encode_text(loaded.tokenize(prompts))
        assert_close(loaded.encode_image_raw(pixels), model.encode_image(pixels), "image features")
        assert_close(image, model.encode_image(pixels, normalize=True), "unit image features")
        assert_close(text, model.encode_text(tokenizer(prompts, context_length=256), normalize=True),
                     "unit text features")
    logits, probs = ref_biomedclip.zero_shot(model, tokenizer, pixels, BIOMEDCLIP_LABELS)
    scale = loaded.zeroshot_logit_scale()
    assert math.isclose(scale, 100.0, rel_tol=1e-6)
    for ensemble in spec.family.ensembles:  # one prompt per class: every ensemble is the card's rule
        scores = class_scores(spec.family, image.numpy(), text[:len(flat)].numpy(), prompt_class,
                              len(NIH_CLASSES), scale, ensemble)
        assert_logits_close(scores, logits, scale, f" ({ensemble})")
        assert_close(softmax(scores), probs, f"the card's probabilities ({ensemble})")


# --------------------------------------------------------------------------------------------------------------
# CheXzero: its 320 px HDF5 images, test-time transform and positive/negative softmax; OpenAI's ViT-B/32

# The authors' label names for NIH's classes (their CheXpert labels; NIH's "Effusion" is "Pleural Effusion").
CHEXZERO_LABELS = {"Effusion": "Pleural Effusion"}


def test_chexzero_pixels_are_the_authors(image_files):
    transform = get_spec("tiny-chexzero").build(seed=0).image_transform()
    for path in image_files:
        expected = ref_chexzero.eval_transform(ref_chexzero.stored(ref_chexzero.read_rgb(path)))
        assert_close(transform(decode_image(path)), expected, path.name)


def test_chexzero_checkpoint_scores_as_the_authors(tmp_path, image_files):
    tiny = dict(TINY_CLIP, vision_patch_size=32)  # configs/openclip/tiny-ViT-B-32-quickgelu.json
    state = ref_clip.random_state_dict(seed=7, **tiny)
    reference = ref_clip.build_model(state, **TINY_HEADS)
    # torch.save(model.state_dict()) of a model clip.load(jit=False) built: build_model deleted the JIT integers
    checkpoint = tmp_path / "best_64_5e-05_original_22000_0.864.pt"
    torch.save(dict(reference.state_dict()), checkpoint)
    spec = get_spec("tiny-chexzero")
    loaded = spec.load(tmp_path)

    pixels = torch.stack([ref_chexzero.eval_transform(ref_chexzero.stored(ref_chexzero.read_rgb(p)))
                          for p in image_files])
    labels = [CHEXZERO_LABELS.get(c, c) for c in NIH_CLASSES]
    flat, _, prompt_class = nih_prompts("tiny-chexzero", "chexzero-pairs")
    assert flat == [t.format(label) for label in labels for t in ref_chexzero.PAIR_TEMPLATE]
    with torch.no_grad():
        image = loaded.encode_image(pixels)
        text = loaded.encode_text(loaded.tokenize(flat))
        expected_image = reference.encode_image(pixels)
        expected_text = reference.encode_text(ref_clip.tokenize(flat))
    assert_close(image, expected_image / expected_image.norm(dim=-1, keepdim=True), "unit image features")
    assert_close(text, expected_text / expected_text.norm(dim=-1, keepdim=True), "unit text features")

    scores = class_scores(spec.family, image.numpy(), text.numpy(), prompt_class, len(NIH_CLASSES),
                          spec.family.default_logit_scale, spec.family.ensembles[0])
    present = ref_chexzero.run_softmax_eval(reference, pixels, labels)
    # embedkit's class score is the log-odds of the authors' per-class probability
    assert_close(1 / (1 + np.exp(-scores)), present, "probability that each class is present")

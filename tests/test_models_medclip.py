"""MedCLIP family: architecture and key names (meta device), checkpoint round trips, preprocessing, text pooling."""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedkit.models import bert
from embedkit.models.base import state_dict_hash
from embedkit.models.medclip import (
    PIXEL_MEAN,
    PIXEL_STD,
    CheckpointError,
    ClinicalBertText,
    MedCLIPStudyTransform,
    MedCLIPTransform,
)
from embedkit.models.registry import MissingWeightsError, get_spec

REAL_CXR = Path(__file__).parents[2] / "shared" / "data" / "real-cxr"
BLACK = (0.0 - PIXEL_MEAN) / PIXEL_STD  # a black pixel after normalisation
WHITE = (1.0 - PIXEL_MEAN) / PIXEL_STD
PROMPTS = ["Mild atelectasis", "severe bilateral pleural effusion at the left lower lobe", "cardiomegaly"]


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module]:
    return {name: get_spec(name).build(seed=0) for name in ("tiny-medclip-rn50", "tiny-medclip-vit")}


def _images(n: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, 1, 224, 224, generator=gen)


# ---------------------------------------------------------------------------------------------------------------
# Full-size architecture on the meta device


def test_full_resnet_variant_keys_shapes_and_counts():
    with torch.device("meta"):
        model = get_spec("medclip-rn50").build()
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["vision_model.model.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["vision_model.model.layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert shapes["vision_model.model.fc.weight"] == (512, 2048)
    assert "vision_model.model.fc.bias" not in state
    assert shapes["text_model.model.embeddings.word_embeddings.weight"] == (28996, 768)
    assert shapes["text_model.model.encoder.layer.11.output.dense.weight"] == (768, 3072)
    assert shapes["text_model.model.pooler.dense.weight"] == (768, 768)
    assert shapes["text_model.projection_head.weight"] == (512, 768)
    assert shapes["logit_scale"] == ()
    # docs/models.md's 133.3 M parameters and 520 keys: the 520 count the 53 BatchNorm num_batches_tracked buffers
    # (319 vision + 200 text + logit_scale) and no embeddings.position_ids.
    assert round(_n_params(model) / 1e6, 1) == 133.3
    assert _n_params(model) == 133_260_097
    assert len(state) == 520
    assert sum(k.endswith("num_batches_tracked") for k in state) == 53
    assert not any("position_ids" in k for k in state)
    # Shapes flow through the image tower without weights; 1 channel is repeated to 3 inside.
    with torch.device("meta"):
        assert model.encode_image(torch.empty(2, 1, 224, 224)).shape == (2, 512)


def test_full_swin_variant_keys_shapes_and_counts():
    with torch.device("meta"):
        model = get_spec("medclip-vit").build()
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["vision_model.model.embeddings.patch_embeddings.projection.weight"] == (96, 3, 4, 4)
    # (2*7-1)^2 relative offsets x 24 heads in the last stage
    block = "vision_model.model.encoder.layers.3.blocks.1.attention."
    assert shapes[block + "relative_position_bias.relative_position_bias_table"] == (169, 24)
    assert shapes["vision_model.model.encoder.layers.2.blocks.5.mlp.fc1.weight"] == (1536, 384)
    assert shapes["vision_model.model.layernorm.weight"] == (768,)
    assert shapes["vision_model.projection_head.weight"] == (512, 768)
    assert "vision_model.projection_head.bias" not in state
    assert shapes["text_model.projection_head.weight"] == (512, 768)
    # Measured under transformers 5 (no relative_position_index, no position_ids in the state dict).
    assert _n_params(model) == 136_616_059  # 27.9 M Swin + 108.7 M text + logit_scale
    assert len(state) == 421
    assert not any("relative_position_index" in k or "position_ids" in k for k in state)
    with torch.device("meta"):
        assert model.encode_image(torch.empty(2, 1, 224, 224)).shape == (2, 512)


# ---------------------------------------------------------------------------------------------------------------
# Random init


def test_random_init_is_deterministic_and_leaves_global_rng_alone(tiny_models):
    rng_before = torch.get_rng_state()
    again = get_spec("tiny-medclip-rn50").build(seed=0)
    other = get_spec("tiny-medclip-rn50").build(seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert state_dict_hash(again) == state_dict_hash(tiny_models["tiny-medclip-rn50"])
    assert state_dict_hash(other) != state_dict_hash(again)
    swin_again = get_spec("tiny-medclip-vit").build(seed=0)
    assert state_dict_hash(swin_again) == state_dict_hash(tiny_models["tiny-medclip-vit"])


def test_tiny_models_embed_and_scale(tiny_models):
    for model in tiny_models.values():
        img = model.encode_image(_images())
        txt = model.encode_text(model.tokenize(PROMPTS))
        assert img.shape == (2, 32) and txt.shape == (3, 32)
        assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
        # 1 channel is the same as that channel repeated to 3.
        assert torch.allclose(img, model.encode_image(_images().repeat(1, 3, 1, 1)), atol=1e-6)
        assert model.image_tower() is model.vision_model
    model = tiny_models["tiny-medclip-rn50"]
    assert model.zeroshot_logit_scale() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        assert model.zeroshot_logit_scale() == pytest.approx(100.00296)  # clamped at 4.6052, not log(100)
        model.logit_scale.fill_(math.log(1 / 0.07))


def test_tokenize_lower_cases_pads_and_truncates(tiny_models):
    model = tiny_models["tiny-medclip-rn50"]
    tokens = model.tokenize(["Edema", "edema", "a"])
    ids = tokens["input_ids"]
    assert torch.equal(ids[0], ids[1])  # cased input, lower-cased tokenisation
    # The synthetic vocab spells "edema" in 5 pieces: [CLS] + 5 + [SEP] = 7; "a" is padded with [PAD] = 0.
    assert ids.shape == (3, 7)
    assert ids[2].tolist() == [2, ids[2, 1].item(), 3, 0, 0, 0, 0]
    assert torch.equal(tokens["attention_mask"], (ids != 0).long())
    long = model.tokenize(["x " * 200])["input_ids"]
    assert long.shape == (1, 77)


# ---------------------------------------------------------------------------------------------------------------
# Text pooling rule


def _medclip_rule(text_model: ClinicalBertText, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """MedCLIP's text embedding written out directly: layers 1, 2, last; mean over every position."""
    out = text_model.model(
        input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], output_hidden_states=True
    )
    hs = out.hidden_states
    length = tokens["input_ids"].shape[1]
    per_layer = [hs[i].sum(dim=1) / length for i in (1, 2, len(hs) - 1)]
    pooled = (per_layer[0] + per_layer[1] + per_layer[2]) / 3
    return torch.nn.functional.normalize(pooled @ text_model.projection_head.weight.T, dim=-1)


def test_text_embedding_matches_direct_rule_on_tiny_model(tiny_models):
    model = tiny_models["tiny-medclip-rn50"]
    tokens = model.tokenize(PROMPTS)
    assert (tokens["attention_mask"] == 0).any()  # padding present, so the rule is tested with it
    with torch.no_grad():
        got = model.encode_text(tokens)
        expected = _medclip_rule(model.text_model, tokens)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_text_rule_uses_layers_1_2_last_and_counts_padding():
    # TINY_BERT has 2 layers (so layer 2 is the last); a 4-layer tower tells the three layers apart.
    torch.manual_seed(0)
    text = ClinicalBertText({**bert.TINY_BERT, "num_hidden_layers": 4}, embed_dim=16).eval()
    tok = bert.synthetic_tokenizer(bert.TINY_BERT["vocab_size"])
    tokens = dict(tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt"))
    with torch.no_grad():
        got = torch.nn.functional.normalize(text(tokens["input_ids"], tokens["attention_mask"]), dim=-1)
        torch.testing.assert_close(got, _medclip_rule(text, tokens), atol=1e-6, rtol=1e-5)
        # The rule differs from a mask-aware mean and from using only the last layer: the test can fail.
        hs = text.model(**{k: tokens[k] for k in ("input_ids", "attention_mask")}).hidden_states
        mask = tokens["attention_mask"][..., None].float()
        masked = torch.stack([(hs[i] * mask).sum(1) / mask.sum(1) for i in (1, 2, 4)]).mean(0)
        assert not torch.allclose(got, torch.nn.functional.normalize(text.projection_head(masked), dim=-1))
        last_only = hs[4].mean(1)
        assert not torch.allclose(got, torch.nn.functional.normalize(text.projection_head(last_only), dim=-1))
    # Padding counts: the same prompt embeds differently alone and next to a longer one.
    alone = dict(tok(["cardiomegaly"], return_tensors="pt"))
    with torch.no_grad():
        emb_alone = text(alone["input_ids"], alone["attention_mask"])
        emb_padded = text(tokens["input_ids"], tokens["attention_mask"])[2]
    assert not torch.allclose(emb_alone[0], emb_padded, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint round trips

# transformers-4 Swin names, as in the authors' checkpoint (written independently of the loader's table).
_TO_LEGACY_SWIN = [
    ("attention.q_proj.", "attention.self.query."),
    ("attention.k_proj.", "attention.self.key."),
    ("attention.v_proj.", "attention.self.value."),
    ("attention.relative_position_bias.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
]


def _authors_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights as the authors ship them: plain state dict, stale buffers, old Swin names."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["text_model.model.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    if model.variant == "swin":
        legacy = {}
        for key, value in state.items():
            for new, old in _TO_LEGACY_SWIN:
                if key.startswith("vision_model.model.encoder.layers.") and new in key:
                    key = key.replace(new, old)
                    break
            legacy[key] = value
        for name, buf in model.named_buffers():
            if name.endswith("relative_position_index"):
                legacy[re.sub(r"attention\.relative_position_bias\.", "attention.self.", name)] = buf.clone()
        state = legacy
    return state


def _write_release(folder: Path, state: dict[str, torch.Tensor], vocab: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    if vocab:
        (folder / "vocab.txt").write_text("\n".join(bert.synthetic_vocab(bert.TINY_BERT["vocab_size"])) + "\n")
    return folder


@pytest.mark.parametrize("name", ["tiny-medclip-rn50", "tiny-medclip-vit"])
def test_round_trip_authors_checkpoint(tiny_models, tmp_path, name):
    built = tiny_models[name]
    state = _authors_state_dict(built)
    assert "text_model.model.embeddings.position_ids" in state
    if built.variant == "swin":
        assert sum(k.endswith("attention.self.relative_position_index") for k in state) == 8  # 4 stages x 2
        assert any(k.endswith("attention.self.query.weight") for k in state)
    folder = _write_release(tmp_path / "release", state)

    loaded = get_spec(name).load(folder)
    assert state_dict_hash(loaded) == state_dict_hash(built)
    assert not loaded.training
    images = _images()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), built.encode_image(images))
        tokens_built, tokens_loaded = built.tokenize(PROMPTS), loaded.tokenize(PROMPTS)
        assert torch.equal(tokens_loaded["input_ids"], tokens_built["input_ids"])
        assert torch.equal(loaded.encode_text(tokens_loaded), built.encode_text(tokens_built))
    # The weights file itself is accepted too.
    assert state_dict_hash(get_spec(name).load(folder / "pytorch_model.bin")) == state_dict_hash(built)


def test_current_swin_names_load_too(tiny_models, tmp_path):
    built = tiny_models["tiny-medclip-vit"]
    folder = _write_release(tmp_path / "release", built.state_dict())
    assert state_dict_hash(get_spec("tiny-medclip-vit").load(folder)) == state_dict_hash(built)


def test_unexpected_and_missing_keys_are_named(tiny_models, tmp_path):
    built = tiny_models["tiny-medclip-rn50"]
    state = _authors_state_dict(built)
    state["vision_model.model.extra_head.weight"] = torch.zeros(3)
    named = r"unexpected key\(s\): vision_model\.model\.extra_head\.weight"
    with pytest.raises(CheckpointError, match=named):
        get_spec("tiny-medclip-rn50").load(_write_release(tmp_path / "extra", state))

    state = _authors_state_dict(built)
    del state["text_model.projection_head.weight"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\): text_model\.projection_head\.weight"):
        get_spec("tiny-medclip-rn50").load(_write_release(tmp_path / "missing", state))


def test_wrong_variant_checkpoint_says_which_model(tiny_models, tmp_path):
    swin_state = _authors_state_dict(tiny_models["tiny-medclip-vit"])
    with pytest.raises(CheckpointError, match="use model medclip-vit"):
        get_spec("tiny-medclip-rn50").load(_write_release(tmp_path / "swin", swin_state))


def test_missing_vocab_and_weights_name_the_file(tiny_models, tmp_path):
    folder = _write_release(tmp_path / "novocab", tiny_models["tiny-medclip-rn50"].state_dict(), vocab=False)
    with pytest.raises(FileNotFoundError, match=r"vocab\.txt.*huggingface\.co/emilyalsentzer/Bio_ClinicalBERT"):
        get_spec("tiny-medclip-rn50").load(folder)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match=r"pytorch_model\.bin not found"):
        get_spec("tiny-medclip-rn50").load(empty)
    with pytest.raises(MissingWeightsError, match=r"pytorch_model\.bin"):
        get_spec("medclip-vit").load(tmp_path / "does-not-exist")


def test_non_state_dict_file_is_refused(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    torch.save({"state_dict": {"a": torch.zeros(1)}, "epoch": 3}, folder / "pytorch_model.bin")
    (folder / "vocab.txt").write_text("\n".join(bert.synthetic_vocab(512)) + "\n")
    with pytest.raises(CheckpointError, match="plain state dict"):
        get_spec("tiny-medclip-rn50").load(folder)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


def test_transform_is_picklable_and_model_returns_it(tiny_models):
    transform = pickle.loads(pickle.dumps(tiny_models["tiny-medclip-vit"].image_transform("upstream")))
    assert isinstance(transform, MedCLIPTransform)
    out = transform(Image.new("L", (100, 60), 255))
    # A small white image is padded (not upscaled) onto a 224 canvas: centre white, corners black.
    assert out.shape == (1, 224, 224)
    assert out[0, 112, 112].item() == pytest.approx(WHITE, abs=1e-5)
    assert out[0, 0, 0].item() == pytest.approx(BLACK, abs=1e-6)
    assert out[0, 112, 10].item() == pytest.approx(BLACK, abs=1e-6)  # left of the 100-px-wide paste


def test_transform_real_rgb_jpeg_pads_to_square():
    path = REAL_CXR / "16747_3_1.jpg"
    if not path.is_file():
        pytest.skip(f"real CXR sample not found at {path}")
    image = Image.open(path)
    assert image.mode == "RGB" and image.size == (1036, 885)
    out = MedCLIPTransform()(image)
    assert out.shape == (1, 224, 224) and out.dtype == torch.float32
    assert out[0, 0, 0].item() == pytest.approx(BLACK, abs=1e-6)
    assert out[0, -1, -1].item() == pytest.approx(BLACK, abs=1e-6)
    # 1036 wide, 885 high: (1036-885)/2 = 75 black rows above and 76 below, i.e. ~16 of 224 rows each.
    # The scan's own darkest border is 3/255, never exactly black, so padding is told apart from content.
    assert torch.all(out[0, :15] == out[0, 0, 0]) and torch.all(out[0, -15:] == out[0, 0, 0])
    assert not torch.any(out[0, 20:204] == out[0, 0, 0])
    assert out.min().item() >= BLACK - 1e-5 and out.max().item() <= WHITE + 1e-5


def test_transform_real_grayscale_png():
    path = REAL_CXR / "00000001_000.png"
    if not path.is_file():
        pytest.skip(f"real CXR sample not found at {path}")
    image = Image.open(path)
    out = MedCLIPTransform()(image)
    assert out.shape == (1, 224, 224)
    # 512 x 512 is already square: no padding, a plain bicubic downscale of the normalised pixels.
    direct = np.asarray(image.convert("L").resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float32)
    torch.testing.assert_close(out[0], torch.from_numpy((direct / 255.0 - PIXEL_MEAN) / PIXEL_STD))


def _decode(path: Path) -> Image.Image:
    try:
        from embedkit.data.images import decode_image
    except ImportError:  # TODO: drop once embedkit.data.images.decode_image is in the tree for good
        with Image.open(path) as img:
            arr = np.asarray(img).astype(np.float64)
        arr = (arr - arr.min()) * (255.0 / (arr.max() - arr.min()))
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    return decode_image(path)


def test_transform_16bit_png_is_rescaled_not_clipped(tmp_path):
    # A 12-bit scan stored in 16 bits, 200 wide x 300 high: left half 1000, right half 3000.
    # PIL's own convert("L") would clip both halves to 255 (all white).
    arr = np.full((300, 200), 1000, dtype=np.uint16)
    arr[:, 100:] = 3000
    path = tmp_path / "scan16.png"
    Image.fromarray(arr).save(path)
    raw = Image.open(path)
    assert raw.mode.startswith("I")
    with pytest.raises(ValueError, match="decode_image"):
        MedCLIPTransform()(raw)

    out = MedCLIPTransform()(_decode(path))
    assert out.shape == (1, 224, 224)
    # Canvas 300 x 300, image pasted at x = 50..250: columns < 37 of 224 are padding (black).
    assert out[0, 112, 5].item() == pytest.approx(BLACK, abs=1e-6)
    assert out[0, 112, 60].item() == pytest.approx(BLACK, abs=1e-5)  # left half: the minimum -> 0
    assert out[0, 112, 160].item() == pytest.approx(WHITE, abs=1e-5)  # right half: the maximum -> 255


def _textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """A grayscale image with noise and edges, where every resampling filter leaves its mark."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    values = 127 + 80 * np.sin(xx / 7.0) * np.cos(yy / 11.0) + rng.normal(0, 25, (height, width))
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")


SIZES = [(224, 224), (512, 512), (1036, 885), (885, 1036), (300, 299), (100, 60), (225, 1000)]


@pytest.mark.parametrize("size", SIZES)
def test_study_preprocessing_is_torchvision_resize_bilinear_and_centre_crop(size):
    # The study's code and MedCLIP's zero-shot dataset, transcribed with torchvision itself.
    from torchvision import transforms as T

    reference = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize([PIXEL_MEAN], [PIXEL_STD])])
    image = _textured(*size)
    got = get_spec("tiny-medclip-rn50").build(0).image_transform("study")(image)
    assert got.shape == (1, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference(image), atol=1e-6, rtol=0)
    rgb = image.convert("RGB")  # colour files are read as grayscale first
    torch.testing.assert_close(MedCLIPStudyTransform()(rgb), reference(rgb.convert("L")), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_upstream_preprocessing_is_the_readme_feature_extractor(size):
    # MedCLIPFeatureExtractor: pad onto a black square of side max(224, w, h), centred; resize 224 bicubic;
    # rescale by 1/255; normalise. Transcribed with numpy padding and torchvision's PIL resize.
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = _textured(*size)
    width, height = image.size
    side = max(224, width, height)
    canvas = np.zeros((side, side), np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top: top + height, left: left + width] = np.asarray(image)
    resized = TF.resize(Image.fromarray(canvas), [224, 224], interpolation=InterpolationMode.BICUBIC)
    reference = (torch.from_numpy(np.asarray(resized, np.float32) / 255.0)[None] - PIXEL_MEAN) / PIXEL_STD
    got = get_spec("tiny-medclip-vit").build(0).image_transform("upstream")(image)
    torch.testing.assert_close(got, reference, atol=1e-6, rtol=0)


def test_study_is_the_default_and_the_two_preprocessings_differ():
    model = get_spec("tiny-medclip-rn50").build(0)
    assert list(model.image_transforms()) == ["study", "upstream"] and model.default_preprocessing() == "study"
    assert isinstance(pickle.loads(pickle.dumps(model.image_transform())), MedCLIPStudyTransform)
    image = _textured(1036, 885)
    gap = (model.image_transform("study")(image) - model.image_transform("upstream")(image)).abs().max().item()
    assert gap > 0.1  # a 1036 x 885 scan: cropped in one, padded in the other

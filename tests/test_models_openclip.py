"""OpenAI CLIP and BiomedCLIP via open_clip: full-size shapes on `meta`, tiny round trips, preprocessing, tokenizers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported: never the hub

import copy
import dataclasses
import json
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from embedkit.models import bert, openclip
from embedkit.models.base import VisionLanguageModel, state_dict_hash
from embedkit.models.openclip import (
    CONFIG_DIR,
    OPENAI_MEAN,
    OPENAI_STD,
    ClipImageTransform,
    CheckpointError,
    model_config,
)
from embedkit.models.registry import MissingWeightsError, get_spec

REAL_CXR = Path(__file__).parents[2] / "shared" / "data" / "real-cxr"
PROMPTS = ["this is a photo of pleural effusion", "this is a photo of   no finding"]
WORDS = ("this", "is", "a", "photo", "of", "pleural", "effusion")  # whole words in the test vocabulary


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pixels(seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- full size, meta


def test_full_clip_shapes_on_meta():
    with torch.device("meta"):
        model = get_spec("clip").build(seed=0)
    assert isinstance(model, VisionLanguageModel) and model.embed_dim == 512
    sd = model.model.state_dict()
    assert n_params(model.model) == 149_620_737
    assert round(n_params(model.model) / 1e6, 1) == 149.6
    # vision: 224 px, patch 16, width 768, 12 layers
    assert sd["visual.conv1.weight"].shape == (768, 3, 16, 16)
    assert sd["visual.positional_embedding"].shape == (14 * 14 + 1, 768)
    assert sd["visual.proj"].shape == (768, 512)
    assert len(model.image_tower().transformer.resblocks) == 12
    # text: vocab 49408, context 77, width 512, 8 heads, 12 layers
    assert sd["token_embedding.weight"].shape == (49408, 512)
    assert sd["positional_embedding"].shape == (77, 512)
    assert sd["text_projection"].shape == (512, 512)
    assert len(model.model.transformer.resblocks) == 12
    assert model.model.transformer.resblocks[0].attn.num_heads == 8
    assert sd["logit_scale"].shape == ()
    # OpenAI weights need QuickGELU
    assert type(model.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert model.tokenize(["a chest x-ray"])["input_ids"].shape == (1, 77)


def test_full_biomedclip_shapes_on_meta():
    with torch.device("meta"):
        model = get_spec("biomedclip").build(seed=0)
    assert model.embed_dim == 512
    sd = model.model.state_dict()
    assert n_params(model.model) == 195_902_721
    assert round(n_params(model.model) / 1e6, 1) == 195.9
    assert all(k == "logit_scale" or k.startswith(("visual.trunk.", "visual.head.", "text.transformer.", "text.proj."))
               for k in sd)
    assert sd["visual.head.proj.weight"].shape == (512, 768)
    assert sd["visual.trunk.patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert len(model.image_tower().trunk.blocks) == 12
    assert sd["text.transformer.embeddings.word_embeddings.weight"].shape == (30522, 768)
    assert sd["text.transformer.embeddings.position_embeddings.weight"].shape == (512, 768)
    assert sd["text.transformer.embeddings.token_type_embeddings.weight"].shape == (2, 768)
    assert len(model.model.text.transformer.encoder.layer) == 12
    assert sd["text.proj.0.weight"].shape == (640, 768)  # MLP 768 -> 640 -> 512, no bias
    assert sd["text.proj.2.weight"].shape == (512, 640)
    assert not any(k.startswith("text.proj.") and k.endswith(".bias") for k in sd)
    assert not any(".pooler." in k or k.endswith("position_ids") for k in sd)
    assert model.tokenize(["a chest x-ray"])["input_ids"].shape == (1, 256)


def test_shipped_bert_configs_match_bert_module():
    # The config.json folders are package data; bert.py holds the same facts: keep them in sync.
    for folder, fields in (("biomedbert", bert.PUBMED_BERT), ("tiny-bert", bert.TINY_BERT)):
        shipped = json.loads((CONFIG_DIR / folder / "config.json").read_text())
        assert shipped["model_type"] == "bert"
        assert {k: shipped[k] for k in fields} == fields


# ---------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-biomedclip"])
def test_random_init_is_deterministic_per_seed(name):
    spec = get_spec(name)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = spec.build(seed=3)
    assert torch.equal(torch.rand(3), expected_next)  # building does not shift the caller's RNG
    b, c = spec.build(seed=3), spec.build(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert math.isclose(a.zeroshot_logit_scale(), 1 / 0.07, rel_tol=1e-6)  # open_clip's init
    assert state_dict_hash(a) == state_dict_hash(b) != state_dict_hash(c)  # logit_scale is 0-dim: hashed too


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-biomedclip"])
def test_tiny_embeddings_are_normalised(name):
    model = get_spec(name).build(seed=0)
    with torch.no_grad():
        img = model.encode_image(pixels())
        txt = model.encode_text(model.tokenize(PROMPTS))
    assert img.shape == (2, 32) and txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(img[0], img[1])


# ---------------------------------------------------------------------------------------------- round trips


def embeddings(model: VisionLanguageModel, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(pixels(7)), model.encode_text(tokens)


def write_clip_checkpoint(model: VisionLanguageModel, file: Path, extra: dict | None = None) -> Path:
    state = {k: v.contiguous() for k, v in model.model.state_dict().items()}
    state["logit_scale"] = torch.tensor(math.log(100.0))  # the OpenAI value
    state.update(extra or {})
    file.parent.mkdir(parents=True, exist_ok=True)
    if file.suffix == ".safetensors":
        save_file(state, str(file))
    else:
        torch.save(state, file)
    return file


@pytest.mark.parametrize("filename", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_clip_round_trip_file_and_folder(tmp_path, filename):
    spec = get_spec("tiny-clip")
    source = spec.build(seed=1)
    file = write_clip_checkpoint(source, tmp_path / filename)
    tokens = source.tokenize(PROMPTS)
    img0, txt0 = embeddings(source, tokens)
    for path in (file, tmp_path):
        loaded = spec.load(path)
        img1, txt1 = embeddings(loaded, loaded.tokenize(PROMPTS))
        assert torch.equal(img0, img1) and torch.equal(txt0, txt1)
        assert math.isclose(loaded.zeroshot_logit_scale(), 100.0, rel_tol=1e-6)
        assert not loaded.training
    # and loading really replaced the random init (load builds from seed 0)
    assert not torch.equal(embeddings(spec.build(seed=0), tokens)[0], img0)


def test_clip_from_hugging_face_cache_layout(tmp_path):
    spec = get_spec("tiny-clip")
    source = spec.build(seed=2)
    repo = tmp_path / "models--timm--vit_base_patch16_clip_224.openai"
    write_clip_checkpoint(source, repo / "snapshots" / "0123abc" / "open_clip_model.safetensors")
    write_clip_checkpoint(spec.build(seed=5), repo / "snapshots" / "old999" / "open_clip_model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")  # refs/main, not the newest folder, names the snapshot
    tokens = source.tokenize(PROMPTS)
    expected = embeddings(source, tokens)[0]
    assert torch.equal(embeddings(spec.load(repo), tokens)[0], expected)
    # the cache root works too for models whose repository is known (the full `clip` maps to this repo)
    hub_spec = dataclasses.replace(spec, hf_repo="timm/vit_base_patch16_clip_224.openai")
    assert torch.equal(embeddings(hub_spec.load(tmp_path), tokens)[0], expected)


def test_clip_extra_key_is_named(tmp_path):
    spec = get_spec("tiny-clip")
    write_clip_checkpoint(spec.build(), tmp_path / "open_clip_model.safetensors",
                          extra={"visual.surprise.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): visual\.surprise\.weight"):
        spec.load(tmp_path)


def test_clip_missing_file_names_it(tmp_path):
    spec = get_spec("tiny-clip")
    with pytest.raises(MissingWeightsError) as err:
        spec.load(tmp_path)  # an empty folder
    assert isinstance(err.value, FileNotFoundError)
    assert "open_clip_model.safetensors" in str(err.value)
    assert "huggingface.co/timm/vit_base_patch16_clip_224.openai" in str(err.value)


# ---------------------------------------------------------------------------------------------- OpenAI's own files


def write_openai_torchscript(model: VisionLanguageModel, file: Path) -> Path:
    """What ``clip.load`` downloads: a traced CLIP saved with torch.jit.save, OpenAI's key names, the JIT integers.

    OpenAI's model keeps the text causal mask as a plain attribute (tracing makes it a constant) and
    ``input_resolution``, ``context_length``, ``vocab_size`` as buffers; open_clip's CLIP is made to match.
    """
    clip = copy.deepcopy(model.model)
    mask = clip.attn_mask
    delattr(clip, "attn_mask")
    clip.attn_mask = mask
    for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        clip.__dict__.pop(name, None)  # open_clip keeps two of them as plain ints
        clip.register_buffer(name, torch.tensor(value))
    text = model.tokenize(PROMPTS)["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        traced = torch.jit.trace_module(clip, {"forward": (pixels(7), text), "encode_image": (pixels(7),),
                                               "encode_text": (text,)}, check_trace=False)
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(traced, str(file))
    return file


def test_openai_torchscript_archive_loads_without_running_it(tmp_path, monkeypatch):
    from embedkit.models.base import read_torchscript_tensors

    spec = get_spec("tiny-clip")
    source = spec.build(seed=1)
    file = write_openai_torchscript(source, tmp_path / "clip" / "ViT-B-16.pt")
    expected = set(source.model.state_dict()) | set(openclip.OPENAI_JIT_KEYS)
    assert set(read_torchscript_tensors(file, "it")) == expected  # torch.jit.load(file).state_dict()'s keys

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", refuse)
    tokens = source.tokenize(PROMPTS)
    img0, txt0 = embeddings(source, tokens)
    for path in (file, file.parent):  # the file, or the folder clip.load caches it in
        loaded = spec.family.load(spec, path)
        img1, txt1 = embeddings(loaded, loaded.tokenize(PROMPTS))
        assert torch.allclose(img0, img1, atol=1e-5) and torch.allclose(txt0, txt1, atol=1e-5)
        assert math.isclose(loaded.zeroshot_logit_scale(), source.zeroshot_logit_scale(), rel_tol=1e-6)
    assert not torch.allclose(embeddings(spec.build(seed=0), tokens)[0], img0, atol=1e-3)


def test_openai_torchscript_half_precision(tmp_path):
    # OpenAI's released archives hold fp16 weights (HalfStorage); they load into the fp32 model.
    spec = get_spec("tiny-clip")
    source = spec.build(seed=4)
    file = write_openai_torchscript(source, tmp_path / "ViT-B-16.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        traced = torch.jit.load(str(file))  # the test's own file: running it here is fine
        torch.jit.save(traced.half(), str(file))
    rounded = spec.build(seed=4)
    rounded.model.load_state_dict({k: v.half().float() for k, v in source.model.state_dict().items()})
    tokens = source.tokenize(PROMPTS)
    img0, txt0 = embeddings(rounded, tokens)
    img1, txt1 = embeddings(spec.load(file), tokens)
    assert torch.allclose(img0, img1, atol=1e-5) and torch.allclose(txt0, txt1, atol=1e-5)


def test_openai_state_dict_with_jit_integers_loads_and_nothing_else_is_forgiven(tmp_path):
    spec = get_spec("tiny-clip")
    source = spec.build(seed=3)
    jit = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
           "vocab_size": torch.tensor(49408)}
    file = write_clip_checkpoint(source, tmp_path / "ok" / "clip_state_dict.pt", extra=jit)
    tokens = source.tokenize(PROMPTS)
    img0, txt0 = embeddings(source, tokens)
    img1, txt1 = embeddings(spec.load(file), tokens)
    assert torch.equal(img0, img1) and torch.equal(txt0, txt1)
    file = write_clip_checkpoint(source, tmp_path / "extra" / "clip_state_dict.pt",
                                 extra={**jit, "image_resolution": torch.tensor(224)})
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): image_resolution\b"):
        spec.load(file)
    # under a JIT key's name, anything but an integer is no JIT integer
    file = write_clip_checkpoint(source, tmp_path / "float" / "clip_state_dict.pt",
                                 extra={"vocab_size": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): vocab_size"):
        spec.load(file)


def _replace_entry(archive: Path, suffix: str, data: bytes, out: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename.endswith(suffix) else src.read(info))
    return out


def test_hostile_or_damaged_torchscript_is_one_error(tmp_path, monkeypatch):
    import pickletools
    import zipfile

    spec = get_spec("tiny-clip")
    good = write_openai_torchscript(spec.build(seed=1), tmp_path / "good" / "ViT-B-16.pt")
    marker = tmp_path / "ran"
    command = f"touch {marker}".encode()
    payload = b"\x80\x02cos\nsystem\nX" + len(command).to_bytes(4, "little") + command + b"\x85R."
    # what pickle.loads would do with it: os.system(command)
    assert [(op.name, arg) for op, arg, _ in pickletools.genops(payload)][1:5] == [
        ("GLOBAL", "os system"), ("BINUNICODE", command.decode()), ("TUPLE1", None), ("REDUCE", None)]
    hostile = _replace_entry(good, "/data.pkl", payload, tmp_path / "hostile.pt")
    with zipfile.ZipFile(hostile) as z:
        assert any(n.endswith("/constants.pkl") for n in z.namelist())  # still looks like TorchScript
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    with pytest.raises(CheckpointError) as err:
        spec.load(hostile)
    assert "os.system" in str(err.value) and str(hostile) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()

    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    # a storage entry cut short inside an intact zip, and a data.pkl that is not a pickle
    short = _replace_entry(good, "/data/0", b"\x00" * 4, tmp_path / "short.pt")
    garbage = _replace_entry(good, "/data.pkl", b"not a pickle at all", tmp_path / "garbage.pt")
    for bad in (truncated, short, garbage):
        with pytest.raises(CheckpointError) as err:
            spec.load(bad)
        message = str(err.value)
        assert str(bad) in message and "huggingface.co/timm/vit_base_patch16_clip_224.openai" in message, message
        assert "\n" not in message and "weights_only" not in message, message


def write_biomedclip_folder(model: VisionLanguageModel, folder: Path, extra: dict | None = None) -> Path:
    """A folder in the authors' layout (what the Hugging Face repository holds), from a tiny model."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model_config(get_spec("tiny-biomedclip"))
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = dict(model.model.state_dict())
    hidden = model.model.text.config.hidden_size
    # What the released file carries beyond the modules: the stale buffer and BERT's unused pooler.
    state["text.transformer.embeddings.position_ids"] = torch.arange(512)[None]
    state["text.transformer.pooler.dense.weight"] = torch.zeros(hidden, hidden)
    state["text.transformer.pooler.dense.bias"] = torch.zeros(hidden)
    state["logit_scale"] = torch.tensor(math.log(100.0))
    state.update(extra or {})
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    bert.write_tokenizer_folder(folder, bert.synthetic_vocab(bert.TINY_BERT["vocab_size"], words=WORDS))
    return folder


def test_biomedclip_round_trip_local_dir(tmp_path):
    spec = get_spec("tiny-biomedclip")
    source = spec.build(seed=1)
    folder = write_biomedclip_folder(source, tmp_path / "biomedclip")
    loaded = spec.load(folder)
    tokens = loaded.tokenize(PROMPTS)
    assert tokens["input_ids"].shape == (2, 256)
    img0, txt0 = embeddings(source, tokens)
    img1, txt1 = embeddings(loaded, tokens)
    assert torch.equal(img0, img1) and torch.equal(txt0, txt1)
    assert math.isclose(loaded.zeroshot_logit_scale(), 100.0, rel_tol=1e-6)
    # the tokenizer came from the folder's vocab.txt (whole words), not the synthetic one (characters)
    assert not torch.equal(tokens["input_ids"], source.tokenize(PROMPTS)["input_ids"])


def test_biomedclip_unexpected_and_missing_keys_are_named(tmp_path):
    spec = get_spec("tiny-biomedclip")
    model = spec.build()
    folder = write_biomedclip_folder(model, tmp_path / "extra", extra={"text.transformer.extra_head.weight":
                                                                       torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): text\.transformer\.extra_head\.weight"):
        spec.load(folder)
    folder = write_biomedclip_folder(model, tmp_path / "missing")
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    del state["visual.head.proj.weight"]
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): visual\.head\.proj\.weight"):
        spec.load(folder)


@pytest.mark.parametrize("name", ["vocab.txt", "open_clip_config.json", "open_clip_pytorch_model.bin"])
def test_biomedclip_missing_file_names_it(tmp_path, name):
    spec = get_spec("tiny-biomedclip")
    folder = write_biomedclip_folder(spec.build(), tmp_path / "biomedclip")
    (folder / name).unlink()
    with pytest.raises(FileNotFoundError) as err:
        spec.load(folder)
    assert name in str(err.value)
    assert "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in str(err.value)


def test_biomedclip_tokenizer_reads_vocab_file(tmp_path):
    # transformers 5 trap: BertTokenizer(vocab_file=...) ignores the file and maps every word to [UNK].
    spec = get_spec("tiny-biomedclip")
    folder = write_biomedclip_folder(spec.build(), tmp_path / "biomedclip")
    vocab = (folder / "vocab.txt").read_text().split("\n")
    ids = spec.load(folder).tokenize(["Pleural   EFFUSION"])["input_ids"][0]
    expected = [vocab.index("[CLS]"), vocab.index("pleural"), vocab.index("effusion"), vocab.index("[SEP]")]
    assert ids[:4].tolist() == expected
    assert vocab.index("[UNK]") not in ids.tolist()
    assert (ids[4:] == 0).all()  # padded with [PAD] = 0 up to 256


# ---------------------------------------------------------------------------------------------- preprocessing


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(OPENAI_STD)[:, None, None] + torch.tensor(OPENAI_MEAN)[:, None, None]


def test_transform_known_pixel_values_and_pickle():
    transform = get_spec("tiny-clip").build().image_transform()
    out = transform(Image.new("L", (300, 200), 128))  # uniform gray, not square
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    assert torch.allclose(out[:, 100, 100], expected, atol=1e-6)
    assert torch.allclose(out, expected[:, None, None].expand(3, 224, 224), atol=1e-5)
    clone = pickle.loads(pickle.dumps(transform))
    assert clone == transform and torch.equal(clone(Image.new("RGB", (224, 240), (10, 20, 30))),
                                             transform(Image.new("RGB", (224, 240), (10, 20, 30))))


def real_images() -> list[Path]:
    if not REAL_CXR.is_dir():
        return []
    return sorted(list(REAL_CXR.glob("*.png")) + list(REAL_CXR.glob("*.jpg")))


@pytest.mark.skipif(not real_images(), reason=f"no real chest X-rays under {REAL_CXR}")
@pytest.mark.parametrize("path", real_images(), ids=lambda p: p.name)
def test_transform_real_images_match_open_clip(path):
    from open_clip import image_transform

    from embedkit.data.images import decode_image

    image = decode_image(path)
    ours = ClipImageTransform()(image)
    assert ours.shape == (3, 224, 224)
    reference = image_transform(224, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)(image)
    assert torch.allclose(ours, reference, atol=1e-6)
    raw = unnormalise(ours)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert 0.05 < float(raw.mean()) < 0.95  # an X-ray, not a blank
    if image.mode == "L":  # grayscale is repeated on the three channels before normalising
        assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


def test_transform_16_bit_png(tmp_path):
    from embedkit.data.images import decode_image

    gradient = np.tile(np.linspace(0, 4095, 256).astype(np.uint16), (256, 1))  # 12-bit scan stored in 16 bits
    path = tmp_path / "scan16.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode.startswith("I")
    transform = ClipImageTransform()
    raw = unnormalise(transform(decode_image(path)))
    # rescaled, not clipped: the full range survives (PIL's convert would make every pixel > 255 white)
    assert float(raw.min()) < 0.02 and float(raw.max()) > 0.98
    assert float(raw[0, 112, 10]) < float(raw[0, 112, 200])
    with pytest.raises(ValueError, match="decode_image"):
        transform(Image.open(path))

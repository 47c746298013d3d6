"""GLoRIA: architecture, checkpoint loading (restricted unpickler), preprocessing and zero-shot scoring."""

from __future__ import annotations

import math
import os
from dataclasses import replace
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from golden import gloria as R
from embedkit.data.images import decode_image
from embedkit.models import bert
from embedkit.models import gloria as G
from conftest import main_cli
from embedkit.models import registry
from embedkit.models.registry import MissingWeightsError, get_spec

REAL_CXR = Path(__file__).parents[2] / "shared" / "data" / "real-cxr"
PROMPTS = ["Mild atelectasis at the left lung base.", "small pneumothorax", "xyzzy heartsize"]


class Evil:
    """Unpickling this runs a shell command, unless the unpickler refuses os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def tiny() -> G.Gloria:
    return get_spec("tiny-gloria").build(seed=3)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    # Not base.state_dict_hash: it cannot view 0-dim tensors (BatchNorm's num_batches_tracked) as bytes.
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _pixels(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _write_ckpt(model: G.Gloria, folder: Path, extra_state: dict | None = None, overrides: dict | None = None,
                hyper_parameters: object = None, no_config: bool = False, drop: tuple[str, ...] = ()) -> Path:
    """A checkpoint of ``model`` as Lightning 1.1.4 saved the authors' (their config as an OmegaConf DictConfig
    under hyper_parameters, with tiny-gloria's sizes and ``overrides``), plus the synthetic vocab.txt beside it."""
    state = {**model.state_dict(), **{k.removeprefix("gloria."): v for k, v in (extra_state or {}).items()}}
    state = {k: v for k, v in state.items() if k not in drop}
    cfg = None if no_config else R.authors_config({**R.TINY_OVERRIDES, **(overrides or {})})
    path = R.write_authors_checkpoint(folder / "chexpert_resnet50.ckpt", state, cfg, hyper_parameters)
    (folder / "vocab.txt").write_text("\n".join(bert.synthetic_vocab(bert.TINY_BERT["vocab_size"])) + "\n")
    return path


# --- architecture -----------------------------------------------------------------------------------------------


def test_full_size_architecture_on_meta():
    with torch.device("meta"):
        model = get_spec("gloria").build(seed=0)
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 134_178_368  # docs/models.md: 134.2 M
    assert len(sd) == 520
    shapes = {
        "img_encoder.model.conv1.weight": (64, 3, 7, 7),
        "img_encoder.model.layer3.5.conv3.weight": (1024, 256, 1, 1),
        "img_encoder.model.layer4.2.bn3.running_var": (2048,),
        "img_encoder.global_embedder.weight": (768, 2048),
        "img_encoder.global_embedder.bias": (768,),
        "img_encoder.local_embedder.weight": (768, 1024, 1, 1),
        "text_encoder.model.embeddings.word_embeddings.weight": (28996, 768),
        "text_encoder.model.encoder.layer.11.output.dense.weight": (768, 3072),
        "text_encoder.model.pooler.dense.weight": (768, 768),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("img_encoder.model.fc") for k in sd)
    assert "img_encoder.local_embedder.bias" not in sd
    assert not any(k.endswith("position_ids") for k in sd)
    assert model.embed_dim == 768 and model.zeroshot_logit_scale() == 1.0
    assert model.image_tower() is model.img_encoder
    with torch.device("meta"):
        g, loc = model.encode_image_local(torch.empty(2, 3, 224, 224))
    assert tuple(g.shape) == (2, 768) and tuple(loc.shape) == (2, 768, 19, 19)


def test_build_is_deterministic_per_seed():
    spec = get_spec("tiny-gloria")
    assert _same_weights(spec.build(0), spec.build(0))
    assert not _same_weights(spec.build(0), spec.build(1))


def test_tiny_shapes_and_normalisation(tiny):
    tokens = tiny.tokenize(PROMPTS)
    with torch.no_grad():
        g, loc = tiny.encode_image_local(_pixels())
        img, txt = tiny.encode_image(_pixels()), tiny.encode_text(tokens)
    assert tuple(loc.shape) == (2, 48, 19, 19) and tuple(g.shape) == (2, 48)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(img, torch.nn.functional.normalize(g, dim=1))


# --- text -------------------------------------------------------------------------------------------------------


def test_clean_prompt_follows_the_authors():
    assert G.clean_prompt("Mild, left-sided\neffusion. 2. Small pneumothorax") == \
        "mild left sided effusion small pneumothorax"
    assert G.clean_prompt("Small effusion. Fine. Big heart") == "small effusion big heart"  # 1-word sentence dropped
    assert G.clean_prompt("Pneumothorax.") == "pneumothorax"  # kept: dropping it would leave nothing


def test_tokenize_groups_word_pieces(tiny):
    tokens = tiny.tokenize(["xyzzy heartsize"])
    pieces = tiny.tokenizer.convert_ids_to_tokens(tokens["input_ids"][0, :18].tolist())
    # The synthetic vocab spells words from characters: 'x', '##y', ... ; each word is one slot.
    assert pieces[:3] == ["[CLS]", "x", "##y"] and pieces[6] == "h" and pieces[15] == "[SEP]"
    expected = [0] + [1] * 5 + [2] * 9 + [3, -1, -1]
    assert tokens["word_index"][0, :18].tolist() == expected
    assert tokens["word_index"][0, 16:].eq(-1).all()
    assert tokens["input_ids"].shape == (1, 97) and tokens["token_type_ids"].eq(0).all()
    assert tokens["n_words"].tolist() == [2] and tokens["n_chars"].tolist() == [15]


def test_word_and_sentence_embeddings_are_sums_of_last_four_layers(tiny):
    tokens = tiny.tokenize(["xyzzy heartsize"])
    with torch.no_grad():
        text = tiny.encode_text_words(tokens)
        out = tiny.text_encoder.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                      token_type_ids=tokens["token_type_ids"], output_hidden_states=True)
    states = sum(out.hidden_states[-4:])[0]  # [97, D]
    torch.testing.assert_close(text.words[0, 0], states[0])  # [CLS]
    torch.testing.assert_close(text.words[0, 1], states[1:6].sum(0))  # 'xyzzy' = 5 pieces summed
    torch.testing.assert_close(text.words[0, 2], states[6:15].sum(0))  # 'heartsize' = 9 pieces
    torch.testing.assert_close(text.words[0, 3], states[15])  # [SEP]
    assert text.words[0, 4:].eq(0).all()
    # Mean over the 97 word slots: padding slots count in the divisor but their BERT states do not.
    torch.testing.assert_close(text.sentence[0], states[:16].sum(0) / 97)
    # The authors' word set: as many slots after [CLS] as the prompt has characters (15 here).
    assert text.word_mask[0].nonzero().flatten().tolist() == list(range(1, 16))
    prompt_only = G.word_mask(tokens, 97, "prompt")
    assert prompt_only[0].nonzero().flatten().tolist() == [1, 2]


# --- checkpoints ------------------------------------------------------------------------------------------------


def test_round_trip_through_lightning_checkpoint(tiny, tmp_path):
    path = _write_ckpt(tiny, tmp_path / "w")
    with pytest.raises(pickle.UnpicklingError):  # the fixture is meaningful: weights_only cannot read it
        torch.load(path, weights_only=True)
    spec = get_spec("tiny-gloria")
    for where in (path.parent, path):
        loaded = spec.load(where)
        assert not loaded.training
        assert _same_weights(loaded, tiny)
        tokens, tokens_loaded = tiny.tokenize(PROMPTS), loaded.tokenize(PROMPTS)
        assert torch.equal(tokens["input_ids"], tokens_loaded["input_ids"])
        with torch.no_grad():
            for a, b in zip(tiny.encode_image_local(_pixels()), loaded.encode_image_local(_pixels())):
                assert torch.equal(a, b)
            assert torch.equal(tiny.encode_text(tokens), loaded.encode_text(tokens_loaded))
            assert torch.equal(tiny.encode_text_words(tokens).words, loaded.encode_text_words(tokens_loaded).words)


def test_malicious_pickle_never_runs(tiny, tmp_path):
    marker = tmp_path / "pwned"
    # Control: an ordinary unpickler does run it, so this test can fail.
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()
    marker.unlink()

    # 1) Hostile object as the hyper_parameters: the state dict reads, nothing runs, and the loader refuses a
    # config it cannot check; the same inside the authors' config, as one of its values.
    path = _write_ckpt(tiny, tmp_path / "a", hyper_parameters=Evil(marker))
    state = G.read_checkpoint_state_dict(path)
    assert len(state) == len(tiny.state_dict()) + 1 and not marker.exists()
    with pytest.raises(G.CheckpointError, match=r"hyper_parameters is <refused global (posix|os)\.system>, not a "
                                                r"training config"):
        get_spec("tiny-gloria").load(path)
    path = _write_ckpt(tiny, tmp_path / "a2", overrides={"model.text.norm": Evil(marker)})
    with pytest.raises(G.CheckpointError, match=r"model\.text\.norm = <refused global (posix|os)\.system> "
                                                r"\(supported: False\)"):
        get_spec("tiny-gloria").load(path)
    assert not marker.exists()
    # 2) Hostile object inside the state_dict: refused with a clear error.
    path = _write_ckpt(tiny, tmp_path / "b", extra_state={"gloria.evil": Evil(marker)})
    with pytest.raises(G.CheckpointError, match="not tensors.*gloria.evil"):
        get_spec("tiny-gloria").load(path)
    # 3) A bare pickle (not a torch file) whose top object is hostile.
    bare = tmp_path / "c" / "chexpert_resnet50.ckpt"
    bare.parent.mkdir()
    bare.write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(G.CheckpointError):
        G.read_checkpoint_state_dict(bare)
    assert not marker.exists()


def test_unexpected_and_missing_keys_are_named(tiny, tmp_path):
    spec = get_spec("tiny-gloria")
    path = _write_ckpt(tiny, tmp_path / "u", extra_state={"gloria.img_encoder.extra_head.weight": torch.zeros(2)})
    with pytest.raises(G.CheckpointError, match=r"1 unexpected key\(s\): img_encoder.extra_head.weight"):
        spec.load(path)
    path = _write_ckpt(tiny, tmp_path / "m", drop=("img_encoder.local_embedder.weight",))
    with pytest.raises(G.CheckpointError, match=r"1 missing key\(s\): img_encoder.local_embedder.weight"):
        spec.load(path)


def test_hyper_parameters_are_read_from_the_omegaconf_pickle(tiny, tmp_path):
    path = _write_ckpt(tiny, tmp_path / "h")
    state, hparams = G.read_lightning_checkpoint(path)
    assert len(state) == len(tiny.state_dict()) + 1  # + the stale position_ids
    assert hparams == R.authors_config(R.TINY_OVERRIDES)  # every value, through DictConfig and AnyNode records
    assert hparams["model"]["gloria"]["temp1"] == 4.0 and hparams["data"]["text"]["word_num"] == 97


def test_supported_values_are_the_authors_pretraining_config():
    authors = R.authors_config()  # configs/chexpert_pretrain_config.yaml as run.py saved it
    supported = G.inference_hyper_parameters(G.ARCHS["resnet50"])
    assert supported == {key: R.cfg_get(authors, key) for key in supported}
    tiny = G.inference_hyper_parameters(G.ARCHS["tiny-resnet50"])
    assert {k for k in supported if supported[k] != tiny[k]} == set(R.TINY_OVERRIDES)


def _store_with_a_cohort(tmp_path):
    from conftest import write_cohort_images
    from embedkit.data.cohort import import_cohort, validate_cohort
    from embedkit.store.store import Store

    frame = write_cohort_images(tmp_path / "images", n_per_class=1)
    import_cohort(Store(tmp_path / "s"), validate_cohort(frame, "c", images_dir=tmp_path / "images"), "c")


@pytest.mark.parametrize("key, value", [
    ("model.text.last_n_layers", 1),
    ("model.text.aggregate_method", "mean"),
    ("model.text.norm", True),
    ("model.text.agg_tokens", False),
    ("data.text.word_num", 128),
    ("data.image.imsize", 299),
    ("transforms.norm", "imagenet"),
    ("transforms.random_crop.crop_size", 256),
    ("model.vision.model_name", "resnet_18"),
    ("model.text.bert_type", "emilyalsentzer/Bio_ClinicalBERT"),  # right for gloria, not for the tiny tower
    ("phase", "classification"),
    ("model.text.last_n_layers", 4.0),  # the type counts: 4.0 would break the authors' slicing
    ("model.text.norm", 0),
])
def test_unsupported_hyper_parameter_is_one_error_line(tiny, tmp_path, monkeypatch, capsys, key, value):
    path = _write_ckpt(tiny, tmp_path / "w", overrides={key: value})
    expected = G.inference_hyper_parameters(G.ARCHS["tiny-resnet50"])[key]
    # Through the CLI: tiny-gloria stands in for gloria (which refuses --weights only because it is a test model).
    monkeypatch.setitem(registry.MODELS, "tiny-gloria", replace(registry.MODELS["tiny-gloria"], tiny=False))
    _store_with_a_cohort(tmp_path)  # embed refuses a store that does not exist before it loads any weights
    code, out, err = main_cli(monkeypatch, capsys, "--store", str(tmp_path / "s"), "embed", "--model", "tiny-gloria",
                              "--weights", str(path), "--cohort", "c")
    assert code == 1 and out == ""
    assert err == (f"error: {path}: hyper_parameters that embedkit's 'tiny-gloria' does not support: {key} = "
                   f"{value!r} (supported: {expected!r}). embedkit builds GLoRIA only as the authors' chexpert "
                   "pretraining config (configs/chexpert_pretrain_config.yaml) does, and cannot score a model "
                   "trained otherwise as its authors would.\n")


def test_missing_and_several_unsupported_hyper_parameters_are_all_named(tiny, tmp_path):
    path = _write_ckpt(tiny, tmp_path / "w", overrides={"transforms.random_crop": None, "data.image.imsize": 224})
    with pytest.raises(G.CheckpointError) as err:
        get_spec("tiny-gloria").load(path)
    assert "data.image.imsize = 224 (supported: 256); transforms.random_crop.crop_size is missing (supported: 224)" \
        in str(err.value)


def test_hyper_parameters_inference_does_not_read_are_ignored(tiny, tmp_path):
    ignored = {"model.gloria.temp1": 2.0, "model.gloria.temp2": 7.0, "model.gloria.temp3": 3.0,
               "model.gloria.local_loss_weight": 0.5, "model.vision.pretrained": False,
               "model.vision.freeze_cnn": True, "model.text.freeze_bert": True, "model.norm": True,
               "data.text.captions_per_image": 1, "data.dataset": "mimic", "train.batch_size": 8,
               "lightning.trainer.lr": 1e-3, "experiment_name": "another"}
    loaded = get_spec("tiny-gloria").load(_write_ckpt(tiny, tmp_path / "w", overrides=ignored))
    assert _same_weights(loaded, tiny)


def test_checkpoint_without_hyper_parameters_loads(tiny, tmp_path):
    path = _write_ckpt(tiny, tmp_path / "w", no_config=True)
    assert G.read_lightning_checkpoint(path)[1] is None
    assert _same_weights(get_spec("tiny-gloria").load(path), tiny)
    bare = tmp_path / "bare" / "chexpert_resnet50.ckpt"  # a plain state dict, no Lightning wrapper
    bare.parent.mkdir()
    torch.save({"gloria." + k: v for k, v in tiny.state_dict().items()}, bare)
    (bare.parent / "vocab.txt").write_text((path.parent / "vocab.txt").read_text())
    assert _same_weights(get_spec("tiny-gloria").load(bare), tiny)


def test_missing_vocab_says_where_to_get_it(tiny, tmp_path):
    path = _write_ckpt(tiny, tmp_path / "v")
    (path.parent / "vocab.txt").unlink()
    with pytest.raises(MissingWeightsError, match=r"vocab\.txt.*huggingface\.co/emilyalsentzer/Bio_ClinicalBERT"):
        get_spec("tiny-gloria").load(path)


# --- preprocessing ----------------------------------------------------------------------------------------------


def _normalised(values: np.ndarray) -> np.ndarray:
    return (values / 255.0 - 0.5) / 0.5


@pytest.mark.skipif(not REAL_CXR.is_dir(), reason=f"real chest X-rays not present at {REAL_CXR}")
def test_preprocess_real_images():
    transform = get_spec("tiny-gloria").build(0).image_transform()
    transform = pickle.loads(pickle.dumps(transform))  # DataLoader workers need a picklable transform

    # NIH 512 x 512 'L': no padding; INTER_AREA halves exactly, so each output pixel is a 2 x 2 source mean.
    nih = decode_image(REAL_CXR / "00000001_000.png")
    x = transform(nih)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    src = np.asarray(nih, dtype=np.float64)
    for y, c in [(0, 0), (100, 57), (223, 223)]:
        block = src[2 * (y + 16): 2 * (y + 16) + 2, 2 * (c + 16): 2 * (c + 16) + 2].mean()
        assert abs(x[0, y, c].item() - _normalised(block)) <= 2 / 255 + 1e-6

    # 1036 x 885 RGB JPEG: resized to 256 x 218, padded 19 rows top and bottom; after the 16 px crop offset,
    # rows 0-2 and 221-223 are padding (0 -> -1 after normalisation).
    jpg = transform(decode_image(REAL_CXR / "16747_3_1.jpg"))
    assert jpg.shape == (3, 224, 224)
    assert jpg[0, 0, 0].item() == -1.0
    assert jpg[:, :3].eq(-1).all() and jpg[:, 221:].eq(-1).all()
    assert not jpg[:, 3].eq(-1).all() and not jpg[:, 220].eq(-1).all()


def test_preprocess_16bit_png(tmp_path):
    # 12-bit values stored in 16 bits, 300 tall x 200 wide, a horizontal ramp.
    ramp = np.tile(np.linspace(1000, 4000, 200), (300, 1)).astype(np.uint16)
    path = tmp_path / "scan16.png"
    Image.fromarray(ramp).save(path)
    raw = Image.open(path)
    assert raw.mode.startswith("I")
    transform = G.GloriaImageTransform()
    with pytest.raises(ValueError, match="decode_image"):
        transform(raw)  # PIL would clip, so the transform refuses and names the fix
    x = transform(decode_image(path))
    # Resized to 170 x 256 (int(200 * 256 / 300)), padded 43 columns each side; crop offset 16 leaves
    # columns 0-26 and 197-223 as padding.
    assert x[:, :, :27].eq(-1).all() and x[:, :, 197:].eq(-1).all()
    row = x[0, 100, 27:197].numpy()
    assert np.all(np.diff(row) >= 0)  # the ramp survives
    assert row[0] < -0.95 and row[-1] > 0.95  # rescaled to the full 8-bit range, not clipped
    assert abs(x[0, 100, 111].item()) < 0.05  # the ramp's middle maps to mid-gray


# --- zero-shot --------------------------------------------------------------------------------------------------


def _reference_local_similarity(local: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """The formula spelt out one number at a time."""
    bsz, dim = local.shape[:2]
    regions = [[local[b, :, i, j].tolist() for i in range(local.shape[2]) for j in range(local.shape[3])]
               for b in range(bsz)]
    dot = lambda u, v: sum(a * c for a, c in zip(u, v))  # noqa: E731
    out = []
    for b in range(bsz):
        row = []
        for p in range(words.shape[0]):
            ws = [words[p, w].tolist() for w in range(words.shape[1]) if mask[p, w]]
            vs = regions[b]
            a = [[math.exp(dot(v, e)) for e in ws] for v in vs]
            a = [[x / sum(r) for x in r] for r in a]  # softmax over words, per region
            best = -math.inf
            for k, e in enumerate(ws):
                z = [math.exp(4.0 * a[r][k]) for r in range(len(vs))]
                att = [x / sum(z) for x in z]  # softmax over regions, temperature 4
                ctx = [sum(att[r] * vs[r][d] for r in range(len(vs))) for d in range(dim)]
                cos = dot(e, ctx) / max(math.sqrt(dot(e, e)) * math.sqrt(dot(ctx, ctx)), 1e-8)
                best = max(best, math.exp(5.0 * cos))
            row.append(math.log(best))
        out.append(row)
    return out


def test_local_similarity_matches_direct_loop():
    gen = torch.Generator().manual_seed(5)
    local = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
    words = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    words[:, 4:] = 0  # zero padding slots, as in the authors' layout
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    got = G.local_similarity(local, words, mask)
    expected = torch.tensor(_reference_local_similarity(local, words, mask), dtype=torch.float32)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Masked-out words do not matter; selected zero slots do (they join the softmax over words).
    words2 = words.clone()
    words2[0, 3] = 99.0
    torch.testing.assert_close(G.local_similarity(local, words2, mask), got)
    assert not torch.allclose(G.local_similarity(local, words, mask | torch.tensor([[0, 0, 0, 0, 1, 0]] * 3,
                                                                                 dtype=torch.bool))[:, 0], got[:, 0])


def test_local_similarity_for_composes_the_pieces(tiny):
    tokens = tiny.tokenize(PROMPTS)
    got = G.local_similarity_for(tiny, _pixels(), tokens)
    with torch.no_grad():
        _, local = tiny.encode_image_local(_pixels())
        text = tiny.encode_text_words(tokens)
    torch.testing.assert_close(got, G.local_similarity(local, text.words, text.word_mask))
    torch.testing.assert_close(G.local_similarity_for(tiny, _pixels(), text), got)  # precomputed text words
    assert got.shape == (2, 3) and torch.isfinite(got).all()
    assert not torch.allclose(G.local_similarity_for(tiny, _pixels(), tokens, word_set="prompt"), got)


def test_zeroshot_scores_max_over_prompts_then_z_normalise():
    rng = np.random.default_rng(0)
    global_sim, local_sim = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    prompt_class = np.array([0, 0, 1, 2, 2])
    scores = G.zeroshot_scores(global_sim, local_sim, prompt_class, 3)
    assert isinstance(scores, np.ndarray) and scores.shape == (6, 3)
    np.testing.assert_allclose(scores.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(scores.std(axis=0), 1.0, atol=1e-12)
    raw = (global_sim + local_sim) / 2
    class0 = raw[:, :2].max(axis=1)
    np.testing.assert_allclose(scores[:, 0], (class0 - class0.mean()) / class0.std(), atol=1e-12)
    # Torch in, torch out, same values.
    as_torch = G.zeroshot_scores(torch.tensor(global_sim), torch.tensor(local_sim), torch.tensor(prompt_class), 3)
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_allclose(as_torch.numpy(), scores, atol=1e-12)
    # One image: left unnormalised (the authors' rule); a class without prompts is an error.
    single = G.zeroshot_scores(global_sim[:1], local_sim[:1], prompt_class, 3)
    np.testing.assert_allclose(single[0, 0], raw[0, :2].max())
    with pytest.raises(ValueError, match="class 3 has no prompts"):
        G.zeroshot_scores(global_sim, local_sim, prompt_class, 4)


def _authors_resize_img(img: np.ndarray, scale: int) -> np.ndarray:
    """GLoRIA's ``_resize_img`` (gloria/datasets/pretraining_dataset.py @416466a), transcribed."""
    import cv2

    size = img.shape
    max_dim = max(size)
    max_ind = size.index(max_dim)
    if max_ind == 0:  # taller
        wpercent = scale / float(size[0])
        hsize = int((float(size[1]) * float(wpercent)))
        desireable_size = (scale, hsize)
    else:  # wider
        hpercent = scale / float(size[1])
        wsize = int((float(size[0]) * float(hpercent)))
        desireable_size = (wsize, scale)
    resized_img = cv2.resize(img, desireable_size[::-1], interpolation=cv2.INTER_AREA)
    if max_ind == 0:
        pad_size = scale - resized_img.shape[1]
        left, right, top, bottom = int(np.floor(pad_size / 2)), int(np.ceil(pad_size / 2)), 0, 0
    else:
        pad_size = scale - resized_img.shape[0]
        top, bottom, left, right = int(np.floor(pad_size / 2)), int(np.ceil(pad_size / 2)), 0, 0
    return np.pad(resized_img, [(top, bottom), (left, right)], "constant", constant_values=0)


@pytest.mark.parametrize("size", [(1024, 1024), (512, 512), (1036, 885), (885, 1036), (300, 200), (511, 257),
                                  (256, 256), (100, 60)])
def test_preprocess_is_the_authors_opencv_inter_area_resize(size):
    from torchvision import transforms as T

    rng = np.random.default_rng(size[0] * 7 + size[1])
    width, height = size
    gray = (127 + 60 * np.sin(np.arange(width) / 5.0)[None, :] + rng.normal(0, 30, (height, width)))
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    # The authors' get_imgs: cv2 grayscale -> _resize_img(256) -> PIL RGB -> CenterCrop(224), ToTensor, Normalize.
    test_transform = T.Compose([T.CenterCrop(224), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    reference = test_transform(Image.fromarray(_authors_resize_img(gray, 256)).convert("RGB"))
    got = get_spec("tiny-gloria").build(0).image_transform()(Image.fromarray(gray, "L"))
    torch.testing.assert_close(got, reference, atol=1e-6, rtol=0)
    if size == (1036, 885):  # a non-integer factor: PIL's BOX filter, what embedkit used before, is not this
        box = np.asarray(Image.fromarray(gray).resize((256, 218), Image.Resampling.BOX), np.int16)
        area = _authors_resize_img(gray, 256)[19:237].astype(np.int16)
        assert np.abs(box - area).max() >= 1


def test_gloria_has_one_preprocessing():
    model = get_spec("tiny-gloria").build(0)
    assert list(model.image_transforms()) == ["upstream"]
    assert G.FAMILY.legacy_preprocessing == "pil-box"  # stores embedded before OpenCV read as that

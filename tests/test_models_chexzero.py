"""CheXzero: OpenAI ViT-B/32 shapes, the authors' checkpoint format, their preprocessing and their zero-shot rule,
and the same commands as every other model (embed, zeroshot, probe, finetune) for chexzero and tiny-chexzero."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import write_cohort_images
from embedkit.cli import app
from embedkit.models.base import CheckpointError
from embedkit.models.registry import MissingWeightsError, get_spec, instantiate


def test_full_size_chexzero_is_openai_clip_vit_b32():
    with torch.device("meta"):  # real shapes, no memory
        model = get_spec("chexzero").build(0)
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    # OpenAI's ViT-B/32 state dict, key names as the authors' checkpoint carries them
    assert shapes["visual.conv1.weight"] == (768, 3, 32, 32)
    assert shapes["visual.positional_embedding"] == (50, 768)  # 7 x 7 patches + class token
    assert shapes["visual.proj"] == (768, 512)
    assert shapes["token_embedding.weight"] == (49408, 512)
    assert shapes["positional_embedding"] == (77, 512)
    assert shapes["text_projection"] == (512, 512)
    assert shapes["visual.transformer.resblocks.11.attn.in_proj_weight"] == (2304, 768)
    assert "visual.transformer.resblocks.12.ln_1.weight" not in shapes
    assert sum(p.numel() for p in model.parameters()) == 151_277_313


def test_the_authors_checkpoint_loads_strictly(tmp_path):
    spec = get_spec("tiny-chexzero")
    source = spec.build(seed=3)
    state = dict(source.model.state_dict())
    # torch.save(model.state_dict()) of the authors' model; OpenAI's JIT-era integers may ride along
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "best_64_5e-05_original_22000_0.864.pt"
    torch.save(state, path)
    for where in (path, tmp_path):  # the file, or its folder
        loaded = spec.family.load(spec, where)
        pixels = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            assert torch.equal(loaded.encode_image(pixels), source.encode_image(pixels))
    damaged = tmp_path / "others"
    damaged.mkdir()
    torch.save({k: v for k, v in state.items() if k != "text_projection"}, damaged / "a.pt")
    with pytest.raises(CheckpointError, match="missing key.*text_projection"):
        spec.family.load(spec, damaged)  # the folder's only .pt
    torch.save(state, damaged / "b.pt")
    with pytest.raises(MissingWeightsError, match="several .pt files"):
        spec.family.load(spec, damaged)


def test_preprocessing_is_the_authors_320_square_normalised_then_resized():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (200, 300), dtype=np.uint8), mode="L")  # landscape: 320 x 213
    got = get_spec("tiny-chexzero").build(0).image_transform()(image)
    # The authors' steps: longest side to 320 (Lanczos, sizes floored), pasted centred on black, 3 channels of
    # 0-255 floats, Normalize(101.48761, 83.43944), then torchvision's tensor Resize(224, bicubic) of their time.
    resized = image.resize((320, int(200 * 320 / 300)), Image.Resampling.LANCZOS)
    canvas = np.zeros((320, 320), dtype=np.float32)
    top = (320 - resized.height) // 2
    canvas[top:top + resized.height] = np.asarray(resized, dtype=np.float32)
    chw = TF.normalize(torch.from_numpy(canvas).repeat(3, 1, 1), [101.48761] * 3, [83.43944] * 3)
    expected = TF.resize(chw, [224], interpolation=InterpolationMode.BICUBIC, antialias=False)
    assert got.shape == (3, 224, 224)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert float(got[:, 0, 0].max()) == pytest.approx(-101.48761 / 83.43944, abs=1e-4)  # the black padding


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexzero")
    frame = write_cohort_images(root / "images", n_per_class=4, size=64)
    frame.to_csv(root / "cohort.csv", index=False)
    _cli(root, "data", "import", str(root / "cohort.csv"), "--images", str(root / "images"), "--cohort", "c")
    return root


def _cli(root, *args):
    result = CliRunner().invoke(app, ["--store", str(root / "store"), *args])
    assert result.exit_code == 0, result.output
    return result


def _stored(store_path, table):
    from embedkit.store.store import Store

    return Store(store_path).read(table).to_pandas()


@pytest.mark.parametrize("model", ["tiny-chexzero", pytest.param("chexzero", marks=pytest.mark.slow)])
def test_chexzero_goes_through_the_same_commands_as_every_model(cohort, model):
    _cli(cohort, "embed", "--model", model, "--cohort", "c", "--random-init", "--workers", "0", "--batch-size",
         "12", "--quiet", "--prompts", "clip")
    zeroshot = json.loads(_cli(cohort, "zeroshot", "--model", model, "--json").stdout)
    probe = json.loads(_cli(cohort, "probe", "--model", model, "--epochs", "3", "--json").stdout)
    tuned = json.loads(_cli(cohort, "finetune", "--model", model, "--cohort", "c", "--random-init", "--method",
                            "lora", "--epochs", "1", "--workers", "0", "--batch-size", "12", "--quiet",
                            "--json").stdout)
    runs = _stored(cohort / "store", "runs").set_index("run_id")
    assert runs.loc[zeroshot["run_id"], "method"] == "zeroshot"
    assert runs.loc[probe["run_id"], "method"] == "lp" and runs.loc[tuned["run_id"], "method"] == "lora"
    config = json.loads(runs.loc[zeroshot["run_id"], "config"])
    assert (config["rule"], config["prompt_set"], config["ensemble"]) == ("chexzero", "chexzero-pairs", "pair")
    assert set(config["prompts_per_class"].values()) == {2}
    tuned_config = json.loads(runs.loc[tuned["run_id"], "config"])
    assert tuned_config["lora_layout"] == "openclip-vit" and tuned_config["rank"] == 16

    # The rule, recomputed from the stored vectors: per class, the softmax over its pair of plain cosines.
    vectors = _stored(cohort / "store", "emb_" + model.replace("-", "_")).set_index("row_id")
    prompts = _stored(cohort / "store", "prompts_" + model.replace("-", "_"))
    pairs = prompts[prompts["prompt_set"] == "chexzero-pairs"].sort_values("prompt_index")
    assert pairs["prompt"].tolist()[8:10] == ["Pleural Effusion", "no Pleural Effusion"]  # NIH's Effusion
    text = np.stack(pairs["vector"].to_numpy()).astype(np.float64)
    preds = _stored(cohort / "store", "predictions")
    preds = preds[preds["run_id"] == zeroshot["run_id"]].set_index("row_id")
    image = np.stack(vectors.loc[preds.index, "vector"].to_numpy()).astype(np.float64)
    cos = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (text / np.linalg.norm(text, axis=1,
                                                                                         keepdims=True)).T
    present = np.exp(cos[:, 0::2]) / (np.exp(cos[:, 0::2]) + np.exp(cos[:, 1::2]))  # the authors' probability
    assert config["classes"] == list(dict.fromkeys(pairs["class"]))  # pair k is class k of the run
    assert (present.argmax(axis=1) == preds["y_pred"].to_numpy()).all()
    scores = cos[:, 0::2] - cos[:, 1::2]
    expected = np.exp(scores - scores.max(axis=1, keepdims=True))
    np.testing.assert_allclose(np.stack(preds["probs"].to_numpy()), expected / expected.sum(axis=1, keepdims=True),
                               atol=1e-5)

    refused = CliRunner().invoke(app, ["--store", str(cohort / "store"), "zeroshot", "--model", model,
                                       "--prompt-set", "clip"])
    assert refused.exit_code != 0 and "one (positive, negative) prompt pair per class" in str(refused.exception)


def test_tiny_chexzero_has_no_released_weights():
    with pytest.raises(MissingWeightsError, match="--random-init"):
        instantiate(get_spec("tiny-chexzero"))

"""LoRA and full fine-tuning: targets per family and preset, adapters-only training, merging, exact resume, runs in
the store.

Tiny models of every family on CPU; a 24-image cohort of 64x64 noise PNGs (6 classes x 4, train/val/test).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import write_cohort_images
from embedkit.constants import NIH_CLASSES
from embedkit.finetune.augment import Augment, epoch_order, stream
from embedkit.finetune.lora import ExactMultiheadAttention, LoraTargetError, apply_lora, count_parameters
from embedkit.finetune.train import (FinetuneConfig, FinetuneError, build_network, finetune, resumable_config, resume,
                                     train_step)
from embedkit.models.registry import get_spec

FAMILIES = ["tiny-clip", "tiny-chexzero", "tiny-biomedclip", "tiny-medclip-rn50", "tiny-medclip-vit", "tiny-gloria"]
_CLIP_EMBEDKIT = ["transformer.resblocks.0.attn", "transformer.resblocks.0.mlp.c_fc",
                  "transformer.resblocks.0.mlp.c_proj", "transformer.resblocks.1.attn",
                  "transformer.resblocks.1.mlp.c_fc", "transformer.resblocks.1.mlp.c_proj"]
# Modules that get LoRA under the embedkit preset, per tiny tower (2 blocks for the ViTs, 8 Swin blocks, 4 or 4
# ResNet blocks).
EXPECTED_MODULES = {
    "tiny-clip": _CLIP_EMBEDKIT,
    "tiny-chexzero": _CLIP_EMBEDKIT,
    "tiny-biomedclip": [f"trunk.blocks.{b}.{m}" for b in range(2)
                        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
    "tiny-medclip-rn50": [f"model.layer{s}.0.conv{c}" for s in range(1, 5) for c in (1, 2, 3)],
    "tiny-medclip-vit": [f"model.encoder.layers.{s}.blocks.{b}.{m}" for s in range(4) for b in range(2)
                         for m in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                                   "mlp.fc1", "mlp.fc2")],
    "tiny-gloria": [f"model.layer{s}.0.conv{c}" for s in range(1, 5) for c in (1, 2)],  # basic blocks: no conv3
}
_CLIP_STUDY = [f"transformer.resblocks.{b}.attn.in_proj" for b in range(2)]  # the MultiheadAttention's in_proj alone
# Under the study preset (the default): the attention input projection of the ViTs, the same ResNet convolutions.
STUDY_MODULES = {
    "tiny-clip": _CLIP_STUDY,
    "tiny-chexzero": _CLIP_STUDY,
    "tiny-biomedclip": [f"trunk.blocks.{b}.attn.qkv" for b in range(2)],
    "tiny-medclip-rn50": EXPECTED_MODULES["tiny-medclip-rn50"],
    "tiny-medclip-vit": [f"model.encoder.layers.{s}.blocks.{b}.attention.{m}" for s in range(4) for b in range(2)
                         for m in ("q_proj", "k_proj", "v_proj")],
    "tiny-gloria": EXPECTED_MODULES["tiny-gloria"],
}
PRESET_MODULES = {"study": STUDY_MODULES, "embedkit": EXPECTED_MODULES}


def _pixels(name: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    channels = 1 if name.startswith("tiny-medclip") else 3
    # ResNets take any size (GLoRIA resizes to 299 itself); the transformers need their 224.
    size = 64 if name in ("tiny-medclip-rn50", "tiny-gloria") else 224
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _frozen(name: str):
    spec = get_spec(name)
    model = spec.build(0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return spec, model


def _base_state(tower: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor of the tower (peft's base_layer prefixes removed), cloned."""
    return {k.replace("base_layer.", ""): v.detach().clone() for k, v in tower.state_dict().items()
            if "lora_" not in k}


@pytest.fixture(scope="module")
def cohort_store(tmp_path_factory):
    from embedkit.data.cohort import import_cohort, validate_cohort
    from embedkit.store.store import Store

    root = tmp_path_factory.mktemp("finetune")
    frame = write_cohort_images(root / "images", n_per_class=4, size=64)
    store = Store(root / "store")
    import_cohort(store, validate_cohort(frame, "c", images_dir=root / "images"), "c")
    return store


# ---- LoRA per family -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["study", "embedkit"])
@pytest.mark.parametrize("name", FAMILIES)
def test_lora_targets_change_the_output_and_merge_to_the_same_model(name, preset):
    spec, model = _frozen(name)
    x = _pixels(name)
    with torch.no_grad():
        before = model.encode_image(x)
    torch.manual_seed(0)
    lora = apply_lora(model, spec.lora_rank, 1.0, preset=preset)
    assert lora.modules == PRESET_MODULES[preset][name]
    assert not any(m.endswith("out_proj") for m in lora.modules)
    with torch.no_grad():
        at_init = model.encode_image(x)
    torch.testing.assert_close(at_init, before, atol=1e-6, rtol=0)  # B = 0: LoRA starts as the identity
    for pname, p in model.image_tower().named_parameters():
        if "lora_B" in pname:
            nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        adapted = model.encode_image(x)
    assert (adapted - before).abs().max() > 1e-3  # the adapters are in the forward pass
    lora.lora_model.merge_and_unload()
    assert not any("lora" in k for k in model.state_dict())
    with torch.no_grad():
        merged = model.encode_image(x)
    torch.testing.assert_close(merged, adapted, atol=2e-5, rtol=0)


@pytest.mark.parametrize("preset", ["study", "embedkit"])
@pytest.mark.parametrize("name", FAMILIES)
def test_lora_step_trains_adapters_and_head_only(name, preset):
    spec, model = _frozen(name)
    net, _, info = build_network(model, "lora", 3, seed=0, rank=spec.lora_rank, preset=preset)
    tower = net.tower
    base = _base_state(tower)
    lora_init = {n: p.detach().clone() for n, p in tower.named_parameters() if p.requires_grad}
    assert lora_init and all("lora_" in n for n in lora_init)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert info["trainable_params"] == sum(p.numel() for p in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-5)
    labels = torch.tensor([0, 2])
    train_step(net, opt, _pixels(name, seed=1), labels)
    train_step(net, opt, _pixels(name, seed=2), labels)  # step 2: B != 0, so A gets gradients too
    for n, p in tower.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert not torch.equal(p.detach(), lora_init[n]), n
    after = _base_state(tower)
    assert after.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], after[k])]
    assert changed == []  # bit-identical, BatchNorm statistics included


@pytest.mark.parametrize("name, preset, layout, n_modules, n_lora", [
    # embedkit: 12 blocks x (attn: in_proj 16*768 + 2304*16, out_proj 2*16*768; c_fc 16*768 + 3072*16; c_proj the
    # same)
    ("clip", "embedkit", "openclip-vit", 36, 2_359_296),
    ("chexzero", "embedkit", "openclip-vit", 36, 2_359_296),  # ViT-B/32: the same width 768, 12 blocks
    ("biomedclip", "embedkit", "timm-vit", 48, 2_359_296),  # qkv + proj = in_proj + out_proj: the same count
    # 12 Swin-T blocks (2, 2, 6, 2 at widths C = 96, 192, 384, 768) x q, k, v, o (16*C + C*16 each), fc1 and fc2
    # (16*C + 4C*16 each) = 288 C per block; sum of C over blocks 4416; 288 * 4416
    ("medclip-vit", "embedkit", "swin", 72, 1_271_808),
    ("medclip-rn50", "embedkit", "resnet", 48, 294_144),  # 16 bottlenecks x conv1-3 at rank 4
    ("gloria", "embedkit", "resnet", 48, 294_144),
    # study: the attention input projection alone, 12 blocks x in_proj (16*768 + 2304*16 = 49152) = 589824
    ("clip", "study", "openclip-vit", 12, 589_824),
    ("chexzero", "study", "openclip-vit", 12, 589_824),
    ("biomedclip", "study", "timm-vit", 12, 589_824),  # qkv is in_proj as a Linear: the same count
    ("medclip-vit", "study", "swin", 36, 423_936),  # q, k, v: 3 * 32 C = 96 C per block; 96 * 4416
    ("medclip-rn50", "study", "resnet", 48, 294_144),  # the study's ResNet LoRA is embedkit's
    ("gloria", "study", "resnet", 48, 294_144),
])
def test_full_size_towers_get_lora_where_the_paper_puts_it(name, preset, layout, n_modules, n_lora):
    spec = get_spec(name)
    with torch.device("meta"):  # real shapes, no memory
        net, lora, info = build_network(spec.build(0), "lora", 6, seed=0, rank=spec.lora_rank, preset=preset)
    head = spec.embed_dim * 1024 + 1024 + 1024 * 6 + 6
    assert (lora.layout.kind, len(lora.modules), info["trainable_params"] - head) == (layout, n_modules, n_lora)
    assert info["rank"] == (4 if layout == "resnet" else 16)
    # study: lora_alpha = r, so peft's scaling alpha / r is 1; embedkit: alpha 1, scaling 1 / r
    assert (info["alpha"], info["lora_scaling"]) == ((info["rank"], 1.0) if preset == "study"
                                                     else (1.0, 1 / info["rank"]))


def test_lora_parameter_counts_follow_rank():
    spec, model = _frozen("tiny-clip")
    apply_lora(model, 16, 1.0, preset="embedkit")
    # Per block (width 64, MLP 256, rank 16): in_proj 16*64 + 192*16, out_proj 16*64 + 64*16,
    # c_fc 16*64 + 256*16, c_proj 16*256 + 64*16 = 4096 + 2048 + 5120 + 5120; two blocks.
    assert count_parameters(model) == 2 * 16384
    _, study = _frozen("tiny-clip")
    apply_lora(study, 16)
    assert count_parameters(study) == 2 * 4096  # the study's: in_proj alone, 16*64 + 192*16 per block


def _lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """B @ A in the base weight's shape (a convolution's A is [r, in, k, k], its B [out, r, 1, 1])."""
    return (lora_b.flatten(1) @ lora_a.flatten(1)).reshape(shape)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_study_preset_adds_b_a_unscaled_to_the_study_modules_only(name):
    from peft.tuners.lora.layer import LoraLayer

    spec, model = _frozen(name)
    tower = model.image_tower()
    base = {k: v.clone() for k, v in tower.state_dict().items()}
    torch.manual_seed(0)
    lora = apply_lora(model, spec.lora_rank)  # the default preset is the study's
    assert lora.preset == "study" and lora.modules == STUDY_MODULES[name]
    assert (lora.rank, lora.alpha, lora.scaling) == (spec.lora_rank, float(spec.lora_rank), 1.0)
    layers = {n: m for n, m in tower.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == sorted(m.removesuffix(".in_proj") for m in STUDY_MODULES[name])
    assert {m.scaling["default"] for m in layers.values()} == {1.0}
    # out_proj untouched: the attention's own Linear, no LoRA tensor anywhere under it
    out_projs = [m for n, m in tower.named_modules() if n.endswith("out_proj")]
    assert len(out_projs) == (2 if name in ("tiny-clip", "tiny-chexzero") else 0)
    assert all(type(m) is nn.modules.linear.NonDynamicallyQuantizableLinear for m in out_projs)
    assert not any("out_proj" in n for n, p in tower.named_parameters() if p.requires_grad)
    for pname, p in tower.named_parameters():
        if "lora_B" in pname:
            nn.init.normal_(p, std=0.5)
    factors = {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
               for n, m in layers.items()}
    lora.lora_model.merge_and_unload()
    merged = tower.state_dict()
    assert merged.keys() == base.keys()
    expected_changed = {(f"{n}.in_proj_weight" if n + ".in_proj" in STUDY_MODULES[name] else f"{n}.weight")
                        for n in layers}
    assert {k for k in base if not torch.equal(base[k], merged[k])} == expected_changed
    for n, (lora_a, lora_b) in factors.items():
        key = next(k for k in expected_changed if k.rsplit(".", 1)[0] == n)
        torch.testing.assert_close(merged[key] - base[key], _lora_delta(lora_a, lora_b, base[key].shape),
                                   atol=1e-5, rtol=1e-5)  # delta W = B A: no 1 / r


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("preset", ["study", "embedkit"])
def test_the_head_reads_raw_features_under_study_and_unit_vectors_under_embedkit(name, preset):
    spec, model = _frozen(name)
    net, _, info = build_network(model, "lora", 3, seed=0, rank=spec.lora_rank, preset=preset)
    seen = []
    net.head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x = _pixels(name)
    with torch.no_grad():
        net(x)
        raw = model.encode_image_raw(x)
    (features,) = seen
    norms = features.norm(dim=-1)
    if preset == "study":
        assert info["head_features"] == "raw"
        torch.testing.assert_close(features, raw)
        assert (norms - 1).abs().max() > 1e-2  # not unit vectors: the tiny towers' raw norms are far from 1
    else:
        assert info["head_features"] == "unit"
        torch.testing.assert_close(features, nn.functional.normalize(raw, dim=-1))
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_in_proj_targets_refuse_a_whole_attention_beside_them():
    _, model = _frozen("tiny-clip")
    with pytest.raises(LoraTargetError, match="both whole and by its in_proj"):
        apply_lora(model, 4, targets=["attn", "attn.in_proj"])
    _, model = _frozen("tiny-clip")
    with pytest.raises(LoraTargetError, match="attn.in_proj"):  # named among the modules there
        apply_lora(model, 4, targets=["attn.q_proj"])


def test_attention_lora_is_w_plus_delta_once_and_never_moves_the_base():
    """peft's own MultiheadAttention LoRA adds the out_proj delta twice and rounds the frozen weights each step."""
    from peft import LoraConfig, LoraModel

    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(8, 2)
    reference = nn.MultiheadAttention(8, 2)
    reference.load_state_dict(holder.attn.state_dict())
    w_in, w_out = holder.attn.in_proj_weight.detach().clone(), holder.attn.out_proj.weight.detach().clone()
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["attn"])
    config._register_custom_module({nn.MultiheadAttention: ExactMultiheadAttention})
    lora = LoraModel(holder, config, "default")
    for n, p in holder.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p)
    attn = holder.attn
    x = torch.randn(5, 1, 8)
    for _ in range(5):
        y = attn(x, x, x, need_weights=False)[0]
    assert torch.equal(attn.in_proj_weight, w_in) and torch.equal(attn.out_proj.weight, w_out)
    with torch.no_grad():
        reference.in_proj_weight += attn.get_delta_weight("default")
        reference.out_proj.weight += attn.base_layer.out_proj.get_delta_weight("default")
        expected = reference(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    merged = lora.merge_and_unload()
    torch.testing.assert_close(merged.attn(x, x, x, need_weights=False)[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets, message", [
    (["attn.out_proj"], "inside nn.MultiheadAttention"),
    (["all-linear"], "all-linear"),
    (["mlp.nope"], "matches no module"),
    (["mlp"], "is a Sequential"),
])
def test_targets_peft_would_ignore_or_that_do_not_exist_are_refused(targets, message):
    _, model = _frozen("tiny-clip")
    with pytest.raises(LoraTargetError, match=message):
        apply_lora(model, 4, 1.0, targets)


def test_user_targets_narrow_the_default():
    _, model = _frozen("tiny-biomedclip")
    lora = apply_lora(model, 4, 1.0, ["attn.qkv"])
    assert lora.modules == ["trunk.blocks.0.attn.qkv", "trunk.blocks.1.attn.qkv"]


# ---- full fine-tuning ----------------------------------------------------------------------------------------


def test_full_finetuning_trains_every_tower_weight():
    _, model = _frozen("tiny-gloria")
    net, lora, info = build_network(model, "ft", 3, seed=0)
    tower = net.tower
    assert lora is None and all(p.requires_grad for p in tower.parameters())
    assert info["trainable_params"] == info["tower_params"] + 48 * 1024 + 1024 + 1024 * 3 + 3
    tower.train()
    before = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    train_step(net, opt, _pixels("tiny-gloria", n=4), torch.tensor([0, 1, 2, 0]))
    after = tower.state_dict()
    for key in ("model.conv1.weight", "model.layer3.0.conv2.weight", "global_embedder.weight",
                "model.bn1.running_mean"):
        assert not torch.equal(before[key], after[key]), key
    # The local embedder is not on the global path: it gets no gradient and stays as it was.
    assert torch.equal(before["local_embedder.weight"], after["local_embedder.weight"])
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


# ---- augmentations -------------------------------------------------------------------------------------------


def test_augmentations_are_a_function_of_seed_epoch_and_sample():
    from PIL import Image

    image = Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8) * 3, mode="L")
    aug = Augment()
    one = np.asarray(aug(image, stream(77, 1, 0, 5)))
    again = np.asarray(aug(image, stream(77, 1, 0, 5)))
    other_epoch = np.asarray(aug(image, stream(77, 1, 1, 5)))
    assert np.array_equal(one, again) and not np.array_equal(one, other_epoch)
    flip_only = Augment(hflip=1.0, vflip=0.0, degrees=0.0, brightness=0.0, contrast=0.0)
    assert np.array_equal(np.asarray(flip_only(image, stream(0, 1, 0, 0))), np.asarray(image)[:, ::-1])
    assert epoch_order(77, 3, 10) == epoch_order(77, 3, 10) != epoch_order(77, 4, 10)
    assert sorted(epoch_order(77, 3, 10)) == list(range(10))


# ---- runs, checkpoints, resume -------------------------------------------------------------------------------


def _predictions(store, run_id: str):
    from embedkit.store.store import sql_eq

    return store.read("predictions", sql_eq("run_id", run_id)).to_pandas().sort_values("row_id").reset_index(drop=True)


def test_finetune_writes_a_run_and_every_prediction(cohort_store):
    from embedkit.store.store import sql_eq

    config = FinetuneConfig(model="tiny-gloria", method="lora", cohort="c", random_init=True, epochs=2,
                            batch_size=8, workers=0, lora_preset="embedkit")
    result = finetune(cohort_store, config, progress=False)
    assert result.finished and result.epochs_done == 2
    run = cohort_store.read("runs", sql_eq("run_id", result.run_id)).to_pylist()[0]
    assert (run["method"], run["model"], run["cohort"], run["seed"]) == ("lora", "tiny-gloria", "c", 77)
    assert run["weights_id"] == "random-init:tiny-gloria:0"
    cfg, metrics = json.loads(run["config"]), result.metrics  # the result adds the views' per-split numbers
    assert "test" not in json.loads(run["metrics"])  # the store keeps training facts only
    assert cfg["classes"] == list(NIH_CLASSES)
    assert cfg["rank"] == 4 and cfg["alpha"] == 1.0 and cfg["lora_modules"] == 8
    assert cfg["trainable_params"] == result.trainable_params
    # head: 48*1024 + 1024 + 1024*6 + 6; LoRA rank 4 on 8 convolutions of the tiny GLoRIA ResNet.
    assert result.trainable_params == 56326 + 7584
    preds = _predictions(cohort_store, result.run_id)
    assert len(preds) == 24 and preds["row_id"].is_unique
    probs = np.stack(preds["probs"].to_numpy())
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs.argmax(axis=1) == preds["y_pred"].to_numpy()).all()
    test = preds[preds["split"] == "test"]
    assert metrics["test"]["n"] == len(test) == 6
    assert metrics["test"]["accuracy"] == pytest.approx(float((test["y_true"] == test["y_pred"]).mean()))
    assert metrics["best_epoch"] in (0, 1) and metrics["epochs_run"] == 2
    folder = result.checkpoint_dir
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "config.json"]
    best = torch.load(folder / "best.pt", weights_only=True)
    assert all("lora_" in k for k in best["state"]["tower"])  # adapters only, no base weights
    assert sum(v.numel() for v in best["state"]["tower"].values()) == 7584


def test_a_run_records_its_preset_and_every_resulting_lora_value(cohort_store):
    from embedkit.store.store import sql_eq

    default = FinetuneConfig(model="tiny-gloria", method="lora", cohort="c", random_init=True, epochs=1,
                             batch_size=12, workers=0, augment=False)
    overridden = FinetuneConfig(**{**default.__dict__, "rank": 2, "targets": ["conv1"]})
    for config, expected in (
        (default, dict(lora_preset="study", rank=4, alpha=4.0, lora_scaling=1.0, lora_layout="resnet",
                       lora_targets=["conv1", "conv2", "conv3"], lora_modules=8, head_features="raw",
                       lora_overrides={})),
        # --rank and --targets on top of the study preset: alpha follows the rank, so the scale stays 1
        (overridden, dict(lora_preset="study", rank=2, alpha=2.0, lora_scaling=1.0, lora_layout="resnet",
                          lora_targets=["conv1"], lora_modules=4, head_features="raw",
                          lora_overrides={"rank": 2, "targets": ["conv1"]})),
    ):
        result = finetune(cohort_store, config, progress=False)
        run = cohort_store.read("runs", sql_eq("run_id", result.run_id)).to_pylist()[0]
        recorded = json.loads(run["config"])
        assert {k: recorded[k] for k in expected} == expected


def test_a_resumed_run_keeps_its_preset(cohort_store):
    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.store.store import sql_eq

    config = FinetuneConfig(model="tiny-gloria", method="lora", cohort="c", random_init=True, epochs=2,
                            batch_size=12, workers=0, augment=False, lora_preset="embedkit")
    cut = finetune(cohort_store, config, progress=False, stop_after=1)
    refused = CliRunner().invoke(app, ["--store", str(cohort_store.path), "finetune", "--resume", cut.run_id,
                                       "--lora-preset", "study"])
    assert isinstance(refused.exception, FinetuneError) and "--lora-preset" in str(refused.exception)
    assert resumable_config(cohort_store, cut.run_id).lora_preset == "embedkit"
    # a checkpoint from before presets existed resumes as what it was: embedkit's layout
    meta_path = cut.checkpoint_dir / "config.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["lora_preset"]
    meta_path.write_text(json.dumps(meta))
    assert resumable_config(cohort_store, cut.run_id).lora_preset == "embedkit"
    resumed = resume(cohort_store, cut.run_id, progress=False)
    recorded = json.loads(cohort_store.read("runs", sql_eq("run_id", resumed.run_id)).to_pylist()[0]["config"])
    assert (recorded["lora_preset"], recorded["alpha"], recorded["lora_scaling"], recorded["head_features"]) == \
        ("embedkit", 1.0, 0.25, "unit")


def test_an_interrupted_run_resumed_ends_exactly_like_an_uninterrupted_one(cohort_store):
    config = dict(model="tiny-gloria", method="lora", cohort="c", random_init=True, epochs=2, batch_size=8,
                  workers=0)
    whole = finetune(cohort_store, FinetuneConfig(**config), progress=False)
    cut = finetune(cohort_store, FinetuneConfig(**config), progress=False, stop_after=1)
    assert not cut.finished and cut.epochs_done == 1
    assert (cut.checkpoint_dir / "last.pt").exists()
    with pytest.raises(FinetuneError, match="already exist"):
        finetune(cohort_store, FinetuneConfig(**config), progress=False, run_id=cut.run_id)
    a = _predictions(cohort_store, whole.run_id)
    # the resumed run is the same run as `whole` (same inputs, settings, seed): the store would keep one of them,
    # so `whole` goes before the resumed one is recorded, to compare the two bit for bit
    cohort_store.delete_run(whole.run_id)
    resumed = resume(cohort_store, cut.run_id, progress=False)
    assert resumed.finished and resumed.epochs_done == 2 and resumed.run_id == cut.run_id
    b = _predictions(cohort_store, resumed.run_id)
    assert np.array_equal(np.stack(a["probs"]), np.stack(b["probs"]))  # bit for bit
    assert [h["val_loss"] for h in whole.history] == [h["val_loss"] for h in resumed.history]
    assert whole.metrics == resumed.metrics
    with pytest.raises(FinetuneError, match="has finished"):
        resume(cohort_store, cut.run_id, progress=False)


@pytest.mark.slow
def test_full_finetuning_resume_with_worker_processes_is_exact(cohort_store):
    """FT (tower in train mode) decoded by 2 worker processes, against 0 workers interrupted and resumed."""
    config = dict(model="tiny-gloria", method="ft", cohort="c", random_init=True, epochs=2, batch_size=8)
    whole = finetune(cohort_store, FinetuneConfig(**config, workers=2), progress=False)
    cut = finetune(cohort_store, FinetuneConfig(**config, workers=0), progress=False, stop_after=1)
    last = torch.load(cut.checkpoint_dir / "last.pt", weights_only=True)
    assert any(k.endswith("running_mean") for k in last["state"]["tower"])  # ft keeps the whole tower
    resumed = resume(cohort_store, cut.run_id, workers=0, progress=False)
    a, b = _predictions(cohort_store, whole.run_id), _predictions(cohort_store, resumed.run_id)
    assert np.array_equal(np.stack(a["probs"]), np.stack(b["probs"]))
    assert whole.trainable_params == resumed.trainable_params > 56326  # tower + head


def test_early_stopping_keeps_the_best_epoch(cohort_store, monkeypatch):
    import embedkit.finetune.train as train

    losses = iter([1.0, 0.5, 0.7, 0.6, 0.4])  # best after epoch 2, then two epochs without a lower loss
    monkeypatch.setattr(train, "_val_loss", lambda session: next(losses))
    config = FinetuneConfig(model="tiny-gloria", method="lora", cohort="c", random_init=True, epochs=5,
                            early_stopping=2, batch_size=12, workers=0, augment=False)
    result = finetune(cohort_store, config, progress=False)
    assert result.finished and result.stopped_early
    assert (result.epochs_done, result.best_epoch, result.best_val_loss) == (4, 1, 0.5)
    assert (result.metrics["best_epoch"], result.metrics["epochs_run"]) == (1, 4)


def test_bad_settings_are_refused_before_any_work(cohort_store):
    with pytest.raises(FinetuneError, match="--method"):
        finetune(cohort_store, FinetuneConfig(model="tiny-clip", method="qlora", cohort="c", random_init=True))
    with pytest.raises(FinetuneError, match="LoRA settings"):
        finetune(cohort_store, FinetuneConfig(model="tiny-clip", method="ft", cohort="c", random_init=True, rank=4))
    with pytest.raises(FinetuneError, match="no checkpoint"):
        resume(cohort_store, "lora-nope")


# ---- the command line ----------------------------------------------------------------------------------------


def test_cli_finetune_then_resume(cohort_store):
    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.store.runs import list_runs

    runner = CliRunner()
    base = ["--store", str(cohort_store.path), "finetune"]
    common = ["--cohort", "c", "--random-init", "--workers", "0", "--batch-size", "12", "--quiet"]
    done = runner.invoke(app, [*base, "--model", "tiny-clip", "--method", "lora", "--lora-preset", "embedkit",
                               "--epochs", "2", *common, "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["finished"] and summary["epochs_done"] == 2
    runs = {r["run_id"]: r for r in list_runs(cohort_store, model="tiny-clip", method="lora")}
    assert runs[summary["run_id"]]["config"]["epochs"] == 2
    assert runs[summary["run_id"]]["config"]["lora_targets"] == ["attn", "mlp.c_fc", "mlp.c_proj"]

    cut = runner.invoke(app, [*base, "--model", "tiny-gloria", "--method", "ft", "--epochs", "2", *common,
                              "--stop-after", "1", "--json"])
    assert cut.exit_code == 0, cut.output
    run_id = json.loads(cut.stdout)["run_id"]
    refused = runner.invoke(app, [*base, "--resume", run_id, "--epochs", "5"])
    assert isinstance(refused.exception, FinetuneError) and "--epochs" in str(refused.exception)
    resumed = runner.invoke(app, [*base, "--resume", run_id, "--workers", "0", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert run_id in resumed.stdout and "2 epochs" in resumed.stdout
    assert {r["run_id"] for r in list_runs(cohort_store, method="ft")} >= {run_id}


def test_a_run_records_its_preprocessing_and_refuses_one_the_family_lacks(cohort_store):
    from embedkit.models.base import PreprocessingError
    from embedkit.store.store import sql_eq

    base = dict(method="lora", cohort="c", random_init=True, epochs=1, batch_size=12, workers=0, augment=False)
    for model, preprocess, recorded in (("tiny-medclip-rn50", None, "study"),
                                        ("tiny-medclip-rn50", "upstream", "upstream"),
                                        ("tiny-clip", None, "upstream")):
        result = finetune(cohort_store, FinetuneConfig(model=model, preprocess=preprocess, **base), progress=False)
        run = cohort_store.read("runs", sql_eq("run_id", result.run_id)).to_pylist()[0]
        assert json.loads(run["config"])["preprocess"] == recorded
    with pytest.raises(PreprocessingError, match="study"):
        finetune(cohort_store, FinetuneConfig(model="tiny-clip", preprocess="study", **base), progress=False)

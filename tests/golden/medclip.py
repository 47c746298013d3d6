"""MedCLIP as its authors run it, written out independently of embedkit for the golden tests (imports no embedkit).

Transcribed from RyanWangZf/MedCLIP @9c3396f, which pins transformers 4.23.1-4.24.0 and torchvision >= 0.13:

- ``medclip/modeling_medclip.py``: ``MedCLIPVisionModel`` (torchvision resnet50, ``fc`` replaced by the projection
  Linear(2048, 512, bias=False)), ``MedCLIPVisionModelViT`` (HF ``SwinModel`` ``pooler_output``, then
  ``projection_head``), ``MedCLIPTextModel`` (BERT with ``output_hidden_states``; hidden states [1], [2] and [-1]
  stacked, ``permute(1, 0, 2, 3).mean(2).mean(1)``: every position, padding included; ``last_n_layer = 4`` is set but
  unused at this commit), ``MedCLIPModel`` (``x / x.norm(dim=-1, keepdim=True)``; ``compute_logits`` clamps
  ``logit_scale`` to [0, 4.6052] in place, then multiplies ``text @ image.T`` by its exp) and ``PromptClassifier``
  (per class, the model's logits over the class's prompts, then mean with ``ensemble=True`` (the README's) or max,
  the class's default ``ensemble=False``, which the pretraining script's evaluator uses).
- ``medclip/prompts.py``: ``generate_chexpert_class_prompts`` (a class's three attribute lists combined by POSITION
  of the dict's keys, ``f"{k0} {k1} {k2}"``, then ``random.sample(prompts, n)`` on the module-level generator)
  and ``process_class_prompts`` (Bio_ClinicalBERT's ``AutoTokenizer``, ``model_max_length = 77``,
  ``truncation=True, padding=True``, one call per class). ``medclip/constants.py``: the prompt table, mean and std.
- ``medclip/dataset.py``: ``MedCLIPFeatureExtractor`` (the README's ``MedCLIPProcessor``): ``pad_img`` onto a black
  'L' square of side max(224, w, h) at ``(int((size - x) / 2), int((size - y) / 2))``, CLIPFeatureExtractor's
  resize (shorter side to 224, bicubic; skipped when already 224) and centre crop, ``normalize`` (PIL -> float32
  ``* (1 / 255)``, then ``(x - mean) / std`` in float32), one channel. ``ZeroShotImageDataset``'s default transform:
  the same padding, then torchvision ``Resize((224, 224))`` (bilinear), ``ToTensor``, ``Normalize``.

The encoders are functional forwards over the authors' state dict, under the key names their checkpoint has
(transformers 4: Swin's ``attention.self.query`` etc. and persistent ``relative_position_index`` /
``embeddings.position_ids`` buffers), so the checkpoint's layout is checked too, not only the arithmetic. Sizes are
parameters (:class:`BertSize`, :class:`SwinSize`, :class:`ResNetSize`) so tests can run tiny towers.

The study's own preprocessing (not the authors'): torchvision ``Resize(224)`` bilinear, ``CenterCrop(224)``,
``ToTensor``, ``Normalize`` with the authors' mean and std, on the grayscale image.
"""

from __future__ import annotations

import math
import random
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from golden.chexpert_prompts import CHEXPERT_CLASS_PROMPTS  # medclip/constants.py

IMG_SIZE = 224
IMG_MEAN = 0.5862785803043838
IMG_STD = 0.27950088968644304
MAX_LENGTH = 77
LOGIT_SCALE_CLAMP = 4.6052  # compute_logits: torch.clamp(self.logit_scale.data, 0, 4.6052)
LOGIT_SCALE_INIT = math.log(1 / 0.07)


# ---------------------------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class BertSize:
    """A BERT config's fields that shape the forward pass (Bio_ClinicalBERT by default)."""

    vocab_size: int = 28996
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12


@dataclass(frozen=True)
class SwinSize:
    """SwinConfig's fields (the default SwinConfig is swin-tiny-patch4-window7-224, the authors' VIT_TYPE)."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    window: int = 7
    patch: int = 4
    mlp_ratio: float = 4.0
    eps: float = 1e-5


@dataclass(frozen=True)
class ResNetSize:
    """torchvision ResNet with Bottleneck blocks (resnet50: blocks 3-4-6-3, width 64 per group)."""

    blocks: tuple[int, ...] = (3, 4, 6, 3)
    width_per_group: int = 64


@dataclass(frozen=True)
class MedCLIPSize:
    """One MedCLIP: ``variant`` "resnet" (MedCLIPVisionModel) or "swin" (MedCLIPVisionModelViT)."""

    variant: str
    bert: BertSize = field(default_factory=BertSize)
    swin: SwinSize = field(default_factory=SwinSize)
    resnet: ResNetSize = field(default_factory=ResNetSize)
    proj_dim: int = 512


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint in the authors' layout (transformers 4 / torchvision names), random values


class _Filler:
    """Random tensors for a state dict: every parameter non-trivial, so any key read wrongly shows."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.state: dict[str, torch.Tensor] = {}

    def weight(self, key: str, *shape: int, fan_in: int | None = None) -> None:
        fan_in = fan_in or int(np.prod(shape[1:])) or 1
        self.state[key] = torch.randn(*shape, generator=self.gen) / math.sqrt(fan_in)

    def bias(self, key: str, n: int, scale: float = 0.1) -> None:
        self.state[key] = torch.randn(n, generator=self.gen) * scale

    def norm(self, prefix: str, n: int) -> None:  # LayerNorm: weight near 1, bias near 0
        self.state[prefix + ".weight"] = 1 + 0.1 * torch.randn(n, generator=self.gen)
        self.bias(prefix + ".bias", n)

    def linear(self, prefix: str, n_out: int, n_in: int, bias: bool = True) -> None:
        self.weight(prefix + ".weight", n_out, n_in)
        if bias:
            self.bias(prefix + ".bias", n_out)

    def batch_norm(self, prefix: str, n: int, gain: float = 1.0) -> None:
        self.state[prefix + ".weight"] = gain * (1 + 0.1 * torch.randn(n, generator=self.gen))
        self.bias(prefix + ".bias", n)
        self.state[prefix + ".running_mean"] = 0.1 * torch.randn(n, generator=self.gen)
        self.state[prefix + ".running_var"] = 0.5 + torch.rand(n, generator=self.gen)
        self.state[prefix + ".num_batches_tracked"] = torch.tensor(1000, dtype=torch.long)


def _bert_state(fill: _Filler, prefix: str, size: BertSize) -> None:
    h = size.hidden
    fill.weight(prefix + "embeddings.word_embeddings.weight", size.vocab_size, h, fan_in=h)
    fill.weight(prefix + "embeddings.position_embeddings.weight", size.max_positions, h, fan_in=h)
    fill.weight(prefix + "embeddings.token_type_embeddings.weight", size.type_vocab, h, fan_in=h)
    fill.norm(prefix + "embeddings.LayerNorm", h)
    # transformers 4 saves position_ids (a persistent buffer then); token_type_ids was not persistent.
    fill.state[prefix + "embeddings.position_ids"] = torch.arange(size.max_positions).unsqueeze(0)
    for i in range(size.layers):
        layer = f"{prefix}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            fill.linear(layer + "attention.self." + name, h, h)
        fill.linear(layer + "attention.output.dense", h, h)
        fill.norm(layer + "attention.output.LayerNorm", h)
        fill.linear(layer + "intermediate.dense", size.intermediate, h)
        fill.linear(layer + "output.dense", h, size.intermediate)
        fill.norm(layer + "output.LayerNorm", h)
    fill.linear(prefix + "pooler.dense", h, h)  # in the checkpoint, unused by MedCLIP


def relative_position_index(window: int) -> torch.Tensor:
    """Swin's [window², window²] index into the relative position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[:, :, 0] * (2 * window - 1) + relative[:, :, 1]


def _swin_state(fill: _Filler, prefix: str, size: SwinSize) -> None:
    fill.weight(prefix + "embeddings.patch_embeddings.projection.weight", size.embed_dim, 3, size.patch, size.patch)
    fill.bias(prefix + "embeddings.patch_embeddings.projection.bias", size.embed_dim)
    fill.norm(prefix + "embeddings.norm", size.embed_dim)
    n_stages = len(size.depths)
    for s, (depth, heads) in enumerate(zip(size.depths, size.heads)):
        dim = size.embed_dim * 2 ** s
        hidden = int(size.mlp_ratio * dim)
        for b in range(depth):
            block = f"{prefix}encoder.layers.{s}.blocks.{b}."
            fill.norm(block + "layernorm_before", dim)
            table = block + "attention.self.relative_position_bias_table"
            fill.state[table] = 0.5 * torch.randn((2 * size.window - 1) ** 2, heads, generator=fill.gen)
            fill.state[block + "attention.self.relative_position_index"] = relative_position_index(size.window).view(-1)
            for name in ("query", "key", "value"):
                fill.linear(block + "attention.self." + name, dim, dim)
            fill.linear(block + "attention.output.dense", dim, dim)
            fill.norm(block + "layernorm_after", dim)
            fill.linear(block + "intermediate.dense", hidden, dim)
            fill.linear(block + "output.dense", dim, hidden)
        if s < n_stages - 1:
            fill.norm(f"{prefix}encoder.layers.{s}.downsample.norm", 4 * dim)
            fill.linear(f"{prefix}encoder.layers.{s}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
    fill.norm(prefix + "layernorm", size.embed_dim * 2 ** (n_stages - 1))


def _resnet_state(fill: _Filler, prefix: str, size: ResNetSize, proj_dim: int) -> None:
    fill.weight(prefix + "conv1.weight", 64, 3, 7, 7)
    fill.batch_norm(prefix + "bn1", 64)
    inplanes = 64
    for i, (n_blocks, planes) in enumerate(zip(size.blocks, (64, 128, 256, 512))):
        width = int(planes * size.width_per_group / 64)
        for b in range(n_blocks):
            block = f"{prefix}layer{i + 1}.{b}."
            fill.weight(block + "conv1.weight", width, inplanes, 1, 1)
            fill.batch_norm(block + "bn1", width)
            fill.weight(block + "conv2.weight", width, width, 3, 3)
            fill.batch_norm(block + "bn2", width)
            fill.weight(block + "conv3.weight", planes * 4, width, 1, 1)
            fill.batch_norm(block + "bn3", planes * 4, gain=0.3)  # keeps the residual sum in range
            if b == 0:  # every first block changes width (layer1: 64 -> 256) or stride
                fill.weight(block + "downsample.0.weight", planes * 4, inplanes, 1, 1)
                fill.batch_norm(block + "downsample.1", planes * 4)
            inplanes = planes * 4
    fill.weight(prefix + "fc.weight", proj_dim, inplanes)  # the projection: Linear(2048, 512, bias=False)


def authors_state_dict(size: MedCLIPSize, seed: int = 0, logit_scale: float = LOGIT_SCALE_INIT
                       ) -> dict[str, torch.Tensor]:
    """A random MedCLIPModel state dict under the key names of the authors' ``pytorch_model.bin``."""
    fill = _Filler(seed)
    if size.variant == "resnet":
        _resnet_state(fill, "vision_model.model.", size.resnet, size.proj_dim)
    elif size.variant == "swin":
        _swin_state(fill, "vision_model.model.", size.swin)
        n_features = size.swin.embed_dim * 2 ** (len(size.swin.depths) - 1)
        fill.linear("vision_model.projection_head", size.proj_dim, n_features, bias=False)
    else:
        raise ValueError(f"unknown variant {size.variant}")
    _bert_state(fill, "text_model.model.", size.bert)
    fill.linear("text_model.projection_head", size.proj_dim, size.bert.hidden, bias=False)
    fill.state["logit_scale"] = torch.tensor(float(logit_scale))
    return fill.state


# ---------------------------------------------------------------------------------------------------------------
# Encoders: functional forwards over the authors' state dict


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _linear(s: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, s[name + ".weight"], s.get(name + ".bias"))


def _layer_norm(s: dict[str, torch.Tensor], name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    weight = s[name + ".weight"]
    return F.layer_norm(x, weight.shape, weight, s[name + ".bias"], eps)


def bert_hidden_states(state: dict[str, torch.Tensor], size: BertSize, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """BertModel(output_hidden_states=True).hidden_states at transformers 4.24: the embeddings, then every layer.

    No token_type_ids: MedCLIPModel.forward takes them into ``**kwargs`` and never passes them on (zeros).
    """
    s = state
    length = input_ids.shape[1]
    x = (F.embedding(input_ids, s["embeddings.word_embeddings.weight"])
         + s["embeddings.token_type_embeddings.weight"][0]
         + s["embeddings.position_embeddings.weight"][:length])
    x = _layer_norm(s, "embeddings.LayerNorm", x, size.eps)
    # get_extended_attention_mask: (1 - mask) * finfo.min, broadcast over heads and query positions
    additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    head = size.hidden // size.heads
    hidden = [x]
    for i in range(size.layers):
        p = f"encoder.layer.{i}."

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], length, size.heads, head).permute(0, 2, 1, 3)

        q = heads(_linear(s, p + "attention.self.query", x))
        k = heads(_linear(s, p + "attention.self.key", x))
        v = heads(_linear(s, p + "attention.self.value", x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head) + additive
        context = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(x.shape)
        attended = _layer_norm(s, p + "attention.output.LayerNorm",
                               _linear(s, p + "attention.output.dense", context) + x, size.eps)
        inner = F.gelu(_linear(s, p + "intermediate.dense", attended))
        x = _layer_norm(s, p + "output.LayerNorm", _linear(s, p + "output.dense", inner) + attended, size.eps)
        hidden.append(x)
    return hidden


def text_model_forward(state: dict[str, torch.Tensor], size: BertSize, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
    """MedCLIPTextModel.forward: hidden states [1], [2], [-1], mean over positions then layers, projection."""
    hidden = bert_hidden_states(_sub(state, "text_model.model."), size, input_ids, attention_mask)
    stacked = torch.stack([hidden[1], hidden[2], hidden[-1]])  # n_layer, batch, seqlen, emb_dim
    embed = stacked.permute(1, 0, 2, 3).mean(2).mean(1)
    return F.linear(embed, state["text_model.projection_head.weight"])


def _batch_norm(s: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, s[name + ".running_mean"], s[name + ".running_var"], s[name + ".weight"],
                        s[name + ".bias"], training=False, eps=1e-5)


def resnet_forward(s: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet (Bottleneck, v1.5: the stride on the 3x3 conv) with ``fc`` as the projection."""
    x = F.relu(_batch_norm(s, "bn1", F.conv2d(pixels, s["conv1.weight"], stride=2, padding=3)))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for i in range(1, 5):
        b = 0
        while f"layer{i}.{b}.conv1.weight" in s:
            p = f"layer{i}.{b}."
            stride = 2 if (i > 1 and b == 0) else 1
            out = F.relu(_batch_norm(s, p + "bn1", F.conv2d(x, s[p + "conv1.weight"])))
            out = F.relu(_batch_norm(s, p + "bn2", F.conv2d(out, s[p + "conv2.weight"], stride=stride, padding=1)))
            out = _batch_norm(s, p + "bn3", F.conv2d(out, s[p + "conv3.weight"]))
            if p + "downsample.0.weight" in s:
                x = _batch_norm(s, p + "downsample.1", F.conv2d(x, s[p + "downsample.0.weight"], stride=stride))
            x = F.relu(out + x)
            b += 1
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return F.linear(x, s["fc.weight"])


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, w * w, C], windows row by row."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def _unwindows(windows: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, wd, c)


def _shift_mask(h: int, wd: int, w: int, shift: int) -> torch.Tensor:
    """The shifted-window attention mask [nW, w², w²]: 0 within a region, -100 across regions."""
    regions = torch.zeros(1, h, wd, 1)
    label = 0
    for rows in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
        for cols in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            regions[:, rows, cols, :] = label
            label += 1
    ids = _windows(regions, w).squeeze(-1)  # [nW, w²]
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _swin_block(s: dict[str, torch.Tensor], p: str, x: torch.Tensor, h: int, wd: int, heads: int, window: int,
                shift: int, eps: float) -> torch.Tensor:
    b, n, c = x.shape
    if min(h, wd) <= window:  # SwinLayer.set_shift_and_window_size: one window covers the map, no shift
        shift, window = 0, min(h, wd)
    shortcut = x
    y = _layer_norm(s, p + "layernorm_before", x, eps).view(b, h, wd, c)
    pad_r, pad_b = (window - wd % window) % window, (window - h % window) % window
    y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = h + pad_b, wd + pad_r
    if shift > 0:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
    win = _windows(y, window)  # [B * nW, N, C]
    head = c // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], heads, head).permute(0, 2, 1, 3)

    q = split(_linear(s, p + "attention.self.query", win))
    k = split(_linear(s, p + "attention.self.key", win))
    v = split(_linear(s, p + "attention.self.value", win))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head)
    index = relative_position_index(window).view(-1)
    bias = s[p + "attention.self.relative_position_bias_table"][index].view(window ** 2, window ** 2, -1)
    scores = scores + bias.permute(2, 0, 1).unsqueeze(0)
    if shift > 0:
        mask = _shift_mask(hp, wp, window, shift)
        n_win = mask.shape[0]
        scores = scores.view(-1, n_win, heads, window ** 2, window ** 2) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, heads, window ** 2, window ** 2)
    context = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(win.shape)
    out = _linear(s, p + "attention.output.dense", context)
    y = _unwindows(out, window, hp, wp)
    if shift > 0:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    y = y[:, :h, :wd, :].reshape(b, h * wd, c)
    x = shortcut + y
    inner = F.gelu(_linear(s, p + "intermediate.dense", _layer_norm(s, p + "layernorm_after", x, eps)))
    return x + _linear(s, p + "output.dense", inner)


def _patch_merge(s: dict[str, torch.Tensor], p: str, x: torch.Tensor, h: int, wd: int, eps: float) -> torch.Tensor:
    b, _, c = x.shape
    y = x.view(b, h, wd, c)
    y = F.pad(y, (0, 0, 0, wd % 2, 0, h % 2))
    y = torch.cat([y[:, 0::2, 0::2], y[:, 1::2, 0::2], y[:, 0::2, 1::2], y[:, 1::2, 1::2]], dim=-1)
    y = y.view(b, -1, 4 * c)
    return F.linear(_layer_norm(s, p + "norm", y, eps), s[p + "reduction.weight"])


def swin_pooled(s: dict[str, torch.Tensor], size: SwinSize, pixels: torch.Tensor) -> torch.Tensor:
    """SwinModel(pixels).pooler_output at transformers 4.24 (no absolute position embeddings, as the default)."""
    x = F.conv2d(pixels, s["embeddings.patch_embeddings.projection.weight"],
                 s["embeddings.patch_embeddings.projection.bias"], stride=size.patch)
    b, c, h, wd = x.shape
    x = _layer_norm(s, "embeddings.norm", x.flatten(2).transpose(1, 2), size.eps)
    for stage, (depth, heads) in enumerate(zip(size.depths, size.heads)):
        for blk in range(depth):
            shift = 0 if blk % 2 == 0 else size.window // 2
            x = _swin_block(s, f"encoder.layers.{stage}.blocks.{blk}.", x, h, wd, heads, size.window, shift,
                            size.eps)
        if stage < len(size.depths) - 1:
            x = _patch_merge(s, f"encoder.layers.{stage}.downsample.", x, h, wd, size.eps)
            h, wd = (h + 1) // 2, (wd + 1) // 2
    x = _layer_norm(s, "layernorm", x, size.eps)
    return x.mean(dim=1)  # AdaptiveAvgPool1d(1) over the tokens


def vision_model_forward(state: dict[str, torch.Tensor], size: MedCLIPSize, pixels: torch.Tensor) -> torch.Tensor:
    """MedCLIPVisionModel / MedCLIPVisionModelViT .forward: one channel repeated to three, then the tower."""
    if pixels.shape[1] == 1:
        pixels = pixels.repeat((1, 3, 1, 1))
    s = _sub(state, "vision_model.model.")
    if size.variant == "resnet":
        return resnet_forward(s, pixels)
    return F.linear(swin_pooled(s, size.swin, pixels), state["vision_model.projection_head.weight"])


def encode_image(state: dict[str, torch.Tensor], size: MedCLIPSize, pixels: torch.Tensor) -> torch.Tensor:
    """MedCLIPModel.encode_image: x / ||x||."""
    out = vision_model_forward(state, size, pixels)
    return out / out.norm(dim=-1, keepdim=True)


def encode_text(state: dict[str, torch.Tensor], size: MedCLIPSize, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """MedCLIPModel.encode_text: x / ||x||."""
    out = text_model_forward(state, size.bert, tokens["input_ids"], tokens["attention_mask"])
    return out / out.norm(dim=-1, keepdim=True)


def clamped_logit_scale(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """compute_logits' multiplier: the float32 parameter clamped to [0, 4.6052], then exp (float32)."""
    return torch.clamp(state["logit_scale"].to(torch.float32), 0, LOGIT_SCALE_CLAMP).exp()


def compute_logits(state: dict[str, torch.Tensor], img_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """MedCLIPModel.compute_logits: logits per image [B, P]."""
    return (torch.matmul(text_emb, img_emb.t()) * clamped_logit_scale(state)).t()


@torch.no_grad()
def prompt_classifier(state: dict[str, torch.Tensor], size: MedCLIPSize, pixels: torch.Tensor,
                      prompt_inputs: dict[str, dict[str, torch.Tensor]], ensemble: bool = False
                      ) -> tuple[torch.Tensor, list[str]]:
    """PromptClassifier.forward: per class, the model's logits over its prompts, mean (ensemble) or max.

    Upstream runs the whole model once per class; the image embeddings, the same each time, are computed once here.
    """
    class_similarities, class_names = [], []
    img_embeds = encode_image(state, size, pixels)
    for cls_name, cls_text in prompt_inputs.items():
        logits = compute_logits(state, img_embeds, encode_text(state, size, cls_text))
        cls_sim = torch.mean(logits, 1) if ensemble else torch.max(logits, 1)[0]
        class_similarities.append(cls_sim)
        class_names.append(cls_name)
    return torch.stack(class_similarities, 1), class_names


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def chexpert_class_combinations() -> dict[str, list[str]]:
    """Every prompt generate_chexpert_class_prompts can produce, per class, in its order (n=None)."""
    prompts = {}
    for k, v in CHEXPERT_CLASS_PROMPTS.items():
        keys = list(v.keys())
        prompts[k] = [f"{k0} {k1} {k2}" for k0 in v[keys[0]] for k1 in v[keys[1]] for k2 in v[keys[2]]]
    return prompts


def generate_chexpert_class_prompts(n: int | None = None) -> dict[str, list[str]]:
    """generate_chexpert_class_prompts(n): ``random.sample`` on the module-level generator, class after class."""
    prompts = {}
    for k, cls_prompts in chexpert_class_combinations().items():
        prompts[k] = random.sample(cls_prompts, n) if n is not None and n < len(cls_prompts) else cls_prompts
    return prompts


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: BERT's basic tokenizer + WordPiece, what AutoTokenizer gives for Bio_ClinicalBERT (lower-cased)


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


class WordPieceTokenizer:
    """``tokenizer(texts, truncation=True, padding=True)`` with model_max_length 77, from a ``vocab.txt``."""

    def __init__(self, vocab_file: str | Path, max_length: int = MAX_LENGTH) -> None:
        tokens = Path(vocab_file).read_text().split("\n")
        if tokens and tokens[-1] == "":
            tokens = tokens[:-1]
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.max_length = max_length

    def _words(self, text: str) -> list[str]:
        # _clean_text: drop NUL, U+FFFD and control characters; any whitespace becomes a space. (CJK characters,
        # which the basic tokenizer splits apart, never occur in these prompts.)
        text = "".join(" " if _is_whitespace(ch) else ch for ch in text
                       if not (ord(ch) in (0, 0xFFFD) or _is_control(ch)))
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words: list[str] = []
        for chunk in text.split():
            current = ""
            for ch in chunk:
                if _is_punctuation(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def _pieces(self, word: str) -> list[str]:
        if len(word) > 100:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def ids(self, text: str) -> list[int]:
        pieces = [p for w in self._words(text) for p in self._pieces(w)][: self.max_length - 2]
        return [self.vocab["[CLS]"], *(self.vocab[p] for p in pieces), self.vocab["[SEP]"]]

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        rows = [self.ids(t) for t in texts]
        longest = max(len(r) for r in rows)
        pad = self.vocab["[PAD]"]
        input_ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
        return {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids), "attention_mask": mask}


def process_class_prompts(cls_prompts: dict[str, list[str]], tokenizer: WordPieceTokenizer
                          ) -> dict[str, dict[str, torch.Tensor]]:
    """process_class_prompts: each class's prompts tokenised together (padded to that class's longest)."""
    return {k: tokenizer(v) for k, v in cls_prompts.items()}


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


def pad_img(img: Image.Image, min_size: int = IMG_SIZE, fill_color: int = 0) -> Image.Image:
    """MedCLIPFeatureExtractor.pad_img / the datasets' _pad_img: pasting converts the image to 'L'."""
    x, y = img.size
    size = max(min_size, x, y)
    new_im = Image.new("L", (size, size), fill_color)
    new_im.paste(img, (int((size - x) / 2), int((size - y) / 2)))
    return new_im


def feature_extractor(image: Image.Image) -> torch.Tensor:
    """MedCLIPProcessor()(images=image)["pixel_values"][0]: [1, 224, 224] float32."""
    image = pad_img(image, min_size=IMG_SIZE)
    width, height = image.size  # CLIPFeatureExtractor.resize: shorter side to 224, skipped if already 224
    short, long = (width, height) if width <= height else (height, width)
    if short != IMG_SIZE:
        new_short, new_long = IMG_SIZE, int(IMG_SIZE * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        image = image.resize((new_w, new_h), Image.BICUBIC)
    width, height = image.size  # centre crop 224 (a no-op on the 224 square)
    top, left = int((height - IMG_SIZE + 1) * 0.5), int((width - IMG_SIZE + 1) * 0.5)
    image = image.crop((left, top, left + IMG_SIZE, top + IMG_SIZE))
    array = np.array(image).astype(np.float32) * (1 / 255.0)  # to_numpy_array(rescale=True)
    array = (array - np.array(IMG_MEAN).astype(np.float32)) / np.array(IMG_STD).astype(np.float32)
    return torch.from_numpy(array[None])


def zeroshot_dataset_transform(image: Image.Image) -> torch.Tensor:
    """ZeroShotImageDataset.__getitem__ with its default transform: pad to square, Resize((224, 224)) bilinear."""
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize((IMG_SIZE, IMG_SIZE)), transforms.ToTensor(),
                                    transforms.Normalize(mean=[IMG_MEAN], std=[IMG_STD])])
    return transform(pad_img(image))


def study_transform(image: Image.Image) -> torch.Tensor:
    """The study's preprocessing: grayscale, torchvision Resize(224) bilinear, CenterCrop(224), mean and std."""
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(IMG_SIZE, interpolation=transforms.InterpolationMode.BILINEAR),
                                    transforms.CenterCrop(IMG_SIZE), transforms.ToTensor(),
                                    transforms.Normalize(mean=[IMG_MEAN], std=[IMG_STD])])
    return transform(image.convert("L"))

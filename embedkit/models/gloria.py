"""GLoRIA (Huang et al., ICCV 2021): a ResNet-50 image tower and Bio_ClinicalBERT with global and local features.

Written from the facts in docs/models.md ("GLoRIA"); module names follow the authors' checkpoint so the released
``chexpert_resnet50.ckpt`` loads 1:1 after stripping its ``gloria.`` prefix:

- ``img_encoder.model.*``: torchvision resnet50 with ``fc = Identity`` (no fc keys);
  ``img_encoder.global_embedder`` Linear(2048, 768) on avgpool(layer4);
  ``img_encoder.local_embedder`` Conv2d(1024, 768, 1, bias=False) on layer3 (19 x 19 regions at 299 px input).
- ``text_encoder.model.*``: Bio_ClinicalBERT (pooler included: its weights are in the checkpoint), no text
  projection (the text already lives in the 768-d space): 134,178,368 parameters in all.

Zero-shot needs word x region similarity, which depends on each image's 19 x 19 x 768 local features. Those are
too large to store, so the embedding pass computes :func:`local_similarity` per (image, prompt) and stores it
(``store.schemas.LOCAL_SIMILARITY``); :func:`zeroshot_scores` later combines it with the global cosine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from embedkit.models import bert
from embedkit.models.base import (RESNET_LAYOUT, UPSTREAM, CheckpointError, ModelFamily, Preprocessing,
                                  RefusedGlobal, TowerLayout, VisionLanguageModel, load_strict,
                                  read_checkpoint_state_dict, read_lightning_checkpoint)

# --- constants of the released model (docs/models.md; the authors' chexpert pretraining config) ---
WORD_NUM = 97  # text max length, in word pieces, [CLS] and [SEP] included
LAST_N_LAYERS = 4  # BERT hidden layers summed into word and sentence embeddings
MODEL_INPUT_SIZE = 299  # the 224 crop is upsampled to this before the ResNet (gives 19 x 19 layer3 regions)
RESIZE_SIZE = 256  # longest side after resizing; then zero-padded to a square of this side
CROP_SIZE = 224
NORM_MEAN, NORM_STD = 0.5, 0.5
ATTENTION_TEMPERATURE = 4.0  # temp1: sharpens each word's attention over regions
WORD_TEMPERATURE = 5.0  # temp2: exp(5 * cos) per word
COSINE_EPS = 1e-8
CHECKPOINT_PREFIX = "gloria."

WordSet = Literal["authors", "prompt"]


# ----------------------------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GloriaArch:
    """The sizes one configuration name stands for."""

    backbone: str  # "resnet50" | "tiny"
    bert_fields: dict
    embed_dim: int
    feature_dim: int  # width of avgpool(layer4)
    local_dim: int  # width of layer3
    vision_model_name: str  # a checkpoint's hyper_parameters model.vision.model_name for this trunk
    bert_type: str  # ... and model.text.bert_type


ARCHS: dict[str, GloriaArch] = {
    "resnet50": GloriaArch("resnet50", bert.CLINICAL_BERT, 768, 2048, 1024, "resnet_50",
                           "emilyalsentzer/Bio_ClinicalBERT"),
    # Small widths, same module names and strides (layer3 still gives 19 x 19 regions at 299 px). GLoRIA has no
    # text projection, so the tiny BERT's hidden size must be the embedding width (48, not TINY_BERT's 32).
    # Its hyper_parameters names are embedkit's own (no authors' checkpoint has this trunk).
    "tiny-resnet50": GloriaArch("tiny", {**bert.TINY_BERT, "hidden_size": 48}, 48, 64, 32, "embedkit_tiny_resnet",
                                "embedkit/tiny-bert"),
}


class TinyResNet(nn.Module):
    """A four-stage ResNet with torchvision's attribute names (conv1 ... layer4, avgpool, fc) at small widths."""

    def __init__(self, widths: Sequence[int] = (8, 16, 32, 64)) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, in_ch = [], widths[0]
        for i, out_ch in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or in_ch != out_ch:
                down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
            stages.append(nn.Sequential(BasicBlock(in_ch, out_ch, stride=stride, downsample=down)))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()


def _backbone(arch: GloriaArch) -> nn.Module:
    if arch.backbone == "resnet50":
        from torchvision.models import resnet50

        model = resnet50(weights=None)
    else:
        model = TinyResNet()
    model.fc = nn.Identity()  # GLoRIA drops the classifier: no fc keys in the checkpoint
    return model


class GloriaImageEncoder(nn.Module):
    """ResNet trunk plus GLoRIA's global (avgpool(layer4)) and local (layer3, 1x1 conv) embedders."""

    def __init__(self, arch: GloriaArch) -> None:
        super().__init__()
        self.model = _backbone(arch)
        self.global_embedder = nn.Linear(arch.feature_dim, arch.embed_dim)
        self.local_embedder = nn.Conv2d(arch.local_dim, arch.embed_dim, kernel_size=1, bias=False)

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk features: (avgpool(layer4) [B, 2048], layer3 [B, 1024, 19, 19]) for 224 px input."""
        # The authors trained at 299 px: the 224 crop is upsampled (bilinear, align_corners) before the trunk.
        x = F.interpolate(pixels, size=(MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), mode="bilinear", align_corners=True)
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer3(m.layer2(m.layer1(x)))
        local = x
        x = m.avgpool(m.layer4(x))
        return torch.flatten(x, 1), local

    def forward(self, pixels: torch.Tensor, get_local: bool = False):
        """Raw (unnormalised) global embedding [B, D]; with ``get_local`` also local embeddings [B, D, 19, 19]."""
        global_ft, local_ft = self.features(pixels)
        global_emb = self.global_embedder(global_ft)
        if not get_local:
            return global_emb
        return global_emb, self.local_embedder(local_ft)


class GloriaTextEncoder(nn.Module):
    """Bio_ClinicalBERT with GLoRIA's word aggregation (``##`` pieces summed into their word)."""

    def __init__(self, arch: GloriaArch) -> None:
        super().__init__()
        from transformers import BertModel

        self.model = BertModel(bert.bert_config(arch.bert_fields, output_hidden_states=True))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        word_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw sentence embeddings [P, D] and word embeddings [P, T, D] (word slots, zero beyond [SEP]).

        ``word_index`` [P, T] gives each token's word slot (-1 after [SEP]). Word = sum over its pieces of the
        sum of the last 4 hidden layers; sentence = mean over all T word slots (zero slots included, as the
        authors computed it after aggregation), i.e. (sum of token states up to [SEP]) / T.
        """
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            output_hidden_states=True,
        )
        tokens = torch.stack(out.hidden_states[-LAST_N_LAYERS:]).sum(0)  # [P, T, D]
        n_pos = tokens.shape[1]
        # Tokens after [SEP] go to a spare slot n_pos, cut off below: padding states never enter any embedding.
        slot = torch.where(word_index < 0, torch.full_like(word_index, n_pos), word_index)
        words = tokens.new_zeros(tokens.shape[0], n_pos + 1, tokens.shape[2])
        words.scatter_add_(1, slot.unsqueeze(-1).expand_as(tokens), tokens)
        words = words[:, :n_pos]
        return words.mean(1), words


class TextWords(NamedTuple):
    """Text features for local similarity: raw sentence [P, D], raw word slots [P, W, D], word mask [P, W]."""

    sentence: torch.Tensor
    words: torch.Tensor
    word_mask: torch.Tensor


class Gloria(VisionLanguageModel):
    """GLoRIA: global embeddings for retrieval-style scoring, local (word x region) features for zero-shot."""

    def __init__(self, arch: GloriaArch, tokenizer: Any) -> None:
        super().__init__()
        self.arch = arch
        self.embed_dim = arch.embed_dim
        self.tokenizer = tokenizer
        self.text_encoder = GloriaTextEncoder(arch)
        self.img_encoder = GloriaImageEncoder(arch)

    # -- VisionLanguageModel interface --------------------------------------------------------------------------

    def image_transforms(self) -> dict[str, Callable[[Image.Image], torch.Tensor]]:
        """One, the authors' test-time preprocessing (see :class:`GloriaImageTransform`)."""
        return {UPSTREAM: GloriaImageTransform()}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize prompts as the authors did (see :func:`tokenize_prompts`)."""
        return tokenize_prompts(self.tokenizer, texts)

    def convolutional(self) -> bool:
        return True

    def encode_image_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        """Global image embeddings [B, D] (the global embedder's output), before L2 normalisation."""
        return self.img_encoder(pixels)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised sentence embeddings [P, D]."""
        sentence, _ = self._text(tokens)
        return F.normalize(sentence, dim=-1)

    def zeroshot_logit_scale(self) -> float:
        """1.0: GLoRIA learns no logit scale (its zero-shot z-normalises scores instead)."""
        return 1.0

    def image_tower(self) -> nn.Module:
        """``img_encoder`` (trunk and both embedders): what LoRA and full fine-tuning adapt."""
        return self.img_encoder

    def lora_layout(self) -> TowerLayout:
        """The ResNet-50 trunk's bottleneck convolutions (the embedders stay frozen under LoRA)."""
        return RESNET_LAYOUT

    def prompt_context(self, prompts: dict[str, list[str]]) -> dict[str, TextWords]:
        """Each set's word features, encoded once for the whole pass (the local similarity needs them)."""
        return {name: self.encode_text_words(self.tokenize(texts)) for name, texts in prompts.items()}

    def encode_image_extras(self, pixels: torch.Tensor, context: dict[str, TextWords]
                            ) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Global image vectors and the local similarity to every prompt of every set, from one image pass."""
        global_raw, local = self.encode_image_local(pixels)
        sims = {name: local_similarity(local, words.words, words.word_mask).float().cpu().numpy()
                for name, words in context.items()}
        return F.normalize(global_raw.float(), dim=-1), sims

    # -- zero-shot pieces ---------------------------------------------------------------------------------------

    def encode_image_local(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw global [B, D] and local [B, D, 19, 19] image embeddings (the local similarity uses them raw)."""
        return self.img_encoder(pixels, get_local=True)

    def encode_text_words(self, tokens: dict[str, torch.Tensor], word_set: WordSet = "authors") -> TextWords:
        """Raw sentence [P, D], word slots [P, W, D] and the mask of words that enter :func:`local_similarity`.

        Word slots follow the authors' layout: slot 0 is [CLS], then the prompt's words, then [SEP], then zero
        vectors up to W = 97. ``word_set`` picks the words (see :func:`word_mask`).
        """
        sentence, words = self._text(tokens)
        mask = word_mask(tokens, words.shape[1], word_set).to(words.device)
        return TextWords(sentence, words, mask)

    def _text(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.text_encoder.parameters()).device
        t = {k: tokens[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids", "word_index")}
        return self.text_encoder(t["input_ids"], t["attention_mask"], t["token_type_ids"], t["word_index"])


# ----------------------------------------------------------------------------------------------------------------
# Text: the authors' prompt cleaning, tokenization and word grouping
# ----------------------------------------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """The authors' text cleaning: split sentences, keep lower-cased ``\\w+`` ASCII tokens, drop 1-token sentences.

    A sentence's tokens are counted before non-ASCII characters are stripped, as in the authors' process_text
    (gloria_model.py @416466a: ``if len(tokens) <= 1: continue`` comes before the ASCII filter), so "é clear" is a
    2-token sentence that keeps "clear". Deviation: where dropping 1-token sentences would leave nothing (a
    one-word prompt such as "pneumothorax"), those sentences are kept; the authors' code would embed an empty
    prompt ([CLS] [SEP]) instead.
    """
    text = text.replace("\n", " ")
    pieces = [s for part in re.split(r"[0-9]+\.", text) for s in part.split(".")]
    sentences = []  # (tokens before the ASCII filter, the ASCII words kept)
    for piece in pieces:
        tokens = re.findall(r"\w+", piece.lower())
        words = [w for w in (t.encode("ascii", "ignore").decode("ascii") for t in tokens) if w]
        sentences.append((len(tokens), words))
    kept = [w for n, w in sentences if n > 1] or [w for _, w in sentences if w]
    return " ".join(" ".join(w) for w in kept if w)


def tokenize_prompts(tokenizer: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenize prompts the way GLoRIA's zero-shot did, with the word grouping its local similarity needs.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` [P, 97] (padded to 97, truncated), and:
    ``word_index`` [P, 97]: each token's word slot ([CLS] = 0; a ``##`` piece joins the previous word; [SEP] is
    its own slot; -1 after [SEP]); ``n_words`` [P]: the prompt's own words (no [CLS]/[SEP]); ``n_chars`` [P]:
    the characters of the raw prompt other than "[", which the authors' zero-shot used as its word count.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize expects a list of prompts, not one string")
    cleaned = [clean_prompt(t) for t in texts]
    enc = tokenizer(cleaned, padding="max_length", truncation=True, max_length=WORD_NUM, return_tensors="pt")
    word_index = torch.full_like(enc["input_ids"], -1)
    n_words = torch.zeros(len(texts), dtype=torch.long)
    for row, ids in enumerate(enc["input_ids"].tolist()):
        slot = -1
        for pos, piece in enumerate(tokenizer.convert_ids_to_tokens(ids)):
            if not (piece.startswith("##") and slot >= 0):
                slot += 1
            word_index[row, pos] = slot
            if piece == tokenizer.sep_token:
                break
        n_words[row] = max(slot - 1, 0)  # slots 1 .. slot-1 are the prompt's words
    n_chars = torch.tensor([sum(c != "[" for c in t) for t in texts], dtype=torch.long)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "token_type_ids": enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])),
        "word_index": word_index,
        "n_words": n_words,
        "n_chars": n_chars,
    }


def word_mask(tokens: dict[str, torch.Tensor], n_slots: int = WORD_NUM, word_set: WordSet = "authors") -> torch.Tensor:
    """Which word slots [P, n_slots] enter the local similarity.

    ``"authors"`` (default, reproduces the released zero-shot): slots 1 .. n_chars, i.e. the authors' code took as
    many slots after [CLS] as the prompt has characters, so the prompt's words, [SEP] and zero-vector padding
    slots all count (clipped to the 96 slots after [CLS]; the authors' reshape breaks beyond that).
    ``"prompt"``: the prompt's own words only (slots 1 .. n_words).
    """
    if word_set == "authors":
        count = tokens["n_chars"].clamp(max=n_slots - 1)
    elif word_set == "prompt":
        count = tokens["n_words"]
    else:
        raise ValueError(f"word_set must be 'authors' or 'prompt', not {word_set!r}")
    slots = torch.arange(n_slots, device=count.device)
    return (slots >= 1) & (slots <= count.unsqueeze(1))


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot scoring
# ----------------------------------------------------------------------------------------------------------------


def _cosine(x1: torch.Tensor, x2: torch.Tensor, dim: int = -1) -> torch.Tensor:
    # The authors' cosine: a zero vector (a padding word slot) gets cosine 0, not NaN.
    return (x1 * x2).sum(dim) / (x1.norm(dim=dim) * x2.norm(dim=dim)).clamp(min=COSINE_EPS)


def local_similarity(local_feats: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """GLoRIA's local (word x region) similarity of every image with every prompt: [B, P].

    For prompt p with selected words w (raw vectors e_w) and image regions r (raw local features v_r, 19 x 19):
        a_rw   = softmax over words w  of (v_r . e_w)           (AttnGAN's word normalisation, as the authors)
        b_wr   = softmax over regions r of (4 * a_rw)           (attention temperature 4)
        c_w    = sum_r b_wr v_r                                  (the word's attended visual context)
        s(p)   = log( max_w exp(5 * cos(e_w, c_w)) )             (= 5 * max_w cos: the authors' "max over words, log")
    ``local_feats`` [B, D, H, W]; ``words`` [P, W, D]; ``word_mask`` [P, W] (bool). Computed in float32 even
    under autocast: the features are unnormalised, and bf16 dot products would shift the word softmax.
    """
    ctx = local_feats.float().flatten(2)  # [B, D, R]
    words = words.float().to(ctx.device)
    word_mask = word_mask.to(ctx.device)
    out = ctx.new_empty(ctx.shape[0], words.shape[0])
    with torch.autocast(ctx.device.type, enabled=False):
        for p in range(words.shape[0]):
            e = words[p][word_mask[p]]  # [n, D]
            if e.shape[0] == 0:
                raise ValueError(f"prompt {p} has no words selected by word_mask")
            dots = torch.einsum("bdr,nd->brn", ctx, e)  # [B, R, n]
            attn = torch.softmax(dots, dim=2)  # over words
            attn = torch.softmax(ATTENTION_TEMPERATURE * attn.transpose(1, 2), dim=2)  # [B, n, R], over regions
            context = torch.einsum("bnr,bdr->bnd", attn, ctx)  # [B, n, D]
            cos = _cosine(e.unsqueeze(0), context)  # [B, n]
            out[:, p] = torch.log(torch.exp(WORD_TEMPERATURE * cos).max(dim=1).values)
    return out


def local_similarity_for(
    model: Gloria, pixels: torch.Tensor, tokens: dict[str, torch.Tensor] | TextWords, word_set: WordSet = "authors"
) -> torch.Tensor:
    """Local similarity [B, P] of a batch of preprocessed images with prompts (no gradients).

    ``tokens`` is ``model.tokenize(...)`` (the prompts are then encoded on every call) or, cheaper over many
    batches, ``model.encode_text_words(tokens)`` computed once (``word_set`` is then already fixed in it).
    """
    with torch.no_grad():
        _, local = model.encode_image_local(pixels)
        text = tokens if isinstance(tokens, TextWords) else model.encode_text_words(tokens, word_set)
        return local_similarity(local, text.words, text.word_mask)


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def zeroshot_scores(global_sim, local_sim, prompt_class, n_classes: int):
    """GLoRIA's zero-shot class scores [B, C] from per-prompt similarities; numpy in -> numpy out, else torch.

    ``global_sim`` [B, P]: cosine of global image and sentence embeddings; ``local_sim`` [B, P]:
    :func:`local_similarity`; ``prompt_class`` [P]: each prompt's class index in 0 .. n_classes-1.
    similarity = (local + global) / 2; class score = max over the class's prompts; then each class column is
    z-normalised over the B images (population std). The scores therefore depend on which images are scored
    together: compute them over one fixed, documented set (e.g. a whole test split), never per mini-batch.
    As the authors: a single image is left unnormalised; a constant column (std 0) becomes 0.
    """
    as_numpy = not any(isinstance(x, torch.Tensor) for x in (global_sim, local_sim))
    g = _as_tensor(global_sim).double()
    loc = _as_tensor(local_sim).double().to(g.device)
    cls = _as_tensor(prompt_class).long().to(g.device)
    if g.shape != loc.shape or g.ndim != 2 or cls.shape != (g.shape[1],):
        raise ValueError(
            f"zeroshot_scores: global {tuple(g.shape)} and local {tuple(loc.shape)} must both be [B, P] and "
            f"prompt_class [P]; got prompt_class {tuple(cls.shape)}"
        )
    sim = (loc + g) / 2
    cols = []
    for c in range(n_classes):
        sel = cls == c
        if not bool(sel.any()):
            raise ValueError(f"zeroshot_scores: class {c} has no prompts")
        cols.append(sim[:, sel].max(dim=1).values)
    scores = torch.stack(cols, dim=1)
    if scores.shape[0] > 1:
        std = scores.std(dim=0, unbiased=False)
        scores = (scores - scores.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
    return scores.cpu().numpy() if as_numpy else scores


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------

_EIGHT_BIT_MODES = ("L", "RGB", "1", "LA", "La", "P", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")


class GloriaImageTransform(Preprocessing):
    """PIL image -> float tensor [3, 224, 224], GLoRIA's test-time preprocessing (picklable).

    Pixels: 8-bit grayscale; resize so the longest side is 256 with OpenCV's INTER_AREA, as the authors'
    ``_resize_img`` (PIL's BOX filter differs: by a grey level at integer factors, more at others); zero-pad centred
    to 256 x 256 (odd padding: the extra pixel right/bottom, as the authors); center crop 224. Tensor: scale to
    [0, 1]; normalise with mean 0.5, std 0.5; gray -> 3 channels. 16-bit images must be decoded with
    ``embedkit.data.images.decode_image`` first (it rescales them).
    """

    def pixels(self, image: Image.Image) -> np.ndarray:
        import cv2

        if image.mode not in _EIGHT_BIT_MODES:
            raise ValueError(
                f"GLoRIA preprocessing needs an 8-bit image, got mode {image.mode!r}; "
                "decode files with embedkit.data.images.decode_image (it rescales 16-bit scans to 8-bit)"
            )
        gray = np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)
        h, w = gray.shape
        # The authors' arithmetic: the long side becomes exactly 256, the short side scale * ratio truncated.
        if h >= w:
            new_w, new_h = max(1, int(float(w) * (RESIZE_SIZE / float(h)))), RESIZE_SIZE
        else:
            new_w, new_h = RESIZE_SIZE, max(1, int(float(h) * (RESIZE_SIZE / float(w))))
        resized = cv2.resize(gray, (new_w, new_h), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((RESIZE_SIZE, RESIZE_SIZE), dtype=np.uint8)
        top, left = (RESIZE_SIZE - new_h) // 2, (RESIZE_SIZE - new_w) // 2
        canvas[top : top + new_h, left : left + new_w] = resized
        crop = int(round((RESIZE_SIZE - CROP_SIZE) / 2.0))  # torchvision CenterCrop's offset
        return canvas[crop : crop + CROP_SIZE, crop : crop + CROP_SIZE, None].copy()

    def tensor(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(pixels[:, :, 0], dtype=np.float32) / 255.0)
        x = (x - NORM_MEAN) / NORM_STD
        return x.unsqueeze(0).repeat(3, 1, 1)  # gray -> RGB replicates the channel

    def recipe(self) -> str:
        return (f"gloria: grayscale, longest side {RESIZE_SIZE} cv2 INTER_AREA, zero-padded centred to "
                f"{RESIZE_SIZE} square, center crop {CROP_SIZE}")

    def __repr__(self) -> str:
        return "GloriaImageTransform(resize_long=256 cv2.INTER_AREA, pad=256, crop=224, norm=0.5/0.5)"


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the Lightning ``gloria.`` prefix and drop ``*position_ids`` (modern transformers has no such key)."""
    out = {}
    for key, value in state.items():
        key = key[len(CHECKPOINT_PREFIX):] if key.startswith(CHECKPOINT_PREFIX) else key
        if key.endswith("position_ids"):
            continue
        out[key] = value
    return out


def inference_hyper_parameters(arch: GloriaArch) -> dict[str, Any]:
    """The training-config values (dotted keys of a checkpoint's hyper_parameters) that change what GLoRIA
    computes at inference, each as embedkit builds it; where the authors' code (416466a) reads each:

    ``phase`` picks the image model (builder.build_img_model: "pretrain" is the ImageEncoder); ``model.vision.
    model_name`` the trunk (cnn_backbones); ``model.text.bert_type`` BERT and its tokenizer; ``embedding_dim`` the
    embedders' width; ``last_n_layers``, ``aggregate_method``, ``norm``, ``agg_tokens`` the word and sentence
    embeddings (text_model.BertEncoder); ``data.text.word_num`` the token length (the sentence embedding is a mean
    over all of it); ``data.image.imsize``, ``transforms.random_crop.crop_size`` and ``transforms.norm`` the
    test-time preprocessing (process_img, builder.build_transformation).

    Not compared, since no inference reads them: ``model.gloria.temp1/temp2/temp3`` and the loss weights (the
    zero-shot, gloria_model.get_local_similarities, hard-codes 4.0 and 5.0; temp3 and the weights scale only the
    training loss), ``model.vision.pretrained`` (initialisation), ``freeze_cnn``, ``freeze_bert``, ``model.norm``
    (read nowhere), ``data.dataset``, ``data.text.captions_per_image``, ``full_report``, ``lightning.*``,
    ``train.*`` and run.py's names and paths (``experiment_name``, ``output_dir``, ``extension``, ...).
    """
    return {
        "phase": "pretrain",
        "model.vision.model_name": arch.vision_model_name,
        "model.text.bert_type": arch.bert_type,
        "model.text.embedding_dim": arch.embed_dim,
        "model.text.last_n_layers": LAST_N_LAYERS,
        "model.text.aggregate_method": "sum",
        "model.text.norm": False,
        "model.text.agg_tokens": True,
        "data.text.word_num": WORD_NUM,
        "data.image.imsize": RESIZE_SIZE,
        "transforms.random_crop.crop_size": CROP_SIZE,
        "transforms.norm": "half",
    }


_MISSING = object()


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)  # only plain values and inert records reach here: repr runs nothing of the file's
    return text if len(text) <= limit else text[:limit] + "..."


def _config_value(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def check_hyper_parameters(hparams: Any, arch: GloriaArch, path: Path, model_name: str) -> None:
    """Raise CheckpointError unless every inference setting in ``hparams`` (see :func:`inference_hyper_parameters`)
    is the value embedkit builds. None (a checkpoint saved without hyper_parameters) passes: nothing to compare.

    Values must match in type too (``True``, not 1): the supported configuration is the authors' one exactly.
    """
    if hparams is None:
        return
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{path}: hyper_parameters is {_shown(hparams)}, not a training config embedkit can read "
                              f"(a dict or an OmegaConf DictConfig); is this the authors' chexpert_resnet50.ckpt?")
    problems = []
    for key, expected in inference_hyper_parameters(arch).items():
        found = _config_value(hparams, key)
        if found is _MISSING:
            problems.append(f"{key} is missing (supported: {expected!r})")
        elif isinstance(found, RefusedGlobal) or type(found) is not type(expected) or found != expected:
            problems.append(f"{key} = {_shown(found)} (supported: {expected!r})")
    if problems:
        raise CheckpointError(f"{path}: hyper_parameters that embedkit's '{model_name}' does not support: "
                              + "; ".join(problems) + ". embedkit builds GLoRIA only as the authors' chexpert "
                              "pretraining config (configs/chexpert_pretrain_config.yaml) does, and cannot score a "
                              "model trained otherwise as its authors would.")


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    load_strict(model, state, f"{where} (GLoRIA)",
                hint=" Is this the authors' chexpert_resnet50.ckpt (ResNet-50 image tower)?")


# ----------------------------------------------------------------------------------------------------------------
# Registry entry points
# ----------------------------------------------------------------------------------------------------------------


def _arch(spec: Any) -> GloriaArch:
    try:
        arch = ARCHS[spec.config]
    except KeyError:
        raise ValueError(f"GLoRIA has no configuration '{spec.config}'; known: {', '.join(ARCHS)}") from None
    if arch.embed_dim != spec.embed_dim:
        raise ValueError(f"spec {spec.name}: embed_dim {spec.embed_dim} != GLoRIA '{spec.config}' {arch.embed_dim}")
    return arch


def build(spec: Any, seed: int = 0) -> Gloria:
    """The real architecture with random weights, deterministic for ``seed``, offline; in eval mode.

    The tokenizer is synthetic (no real vocabulary offline): prompts are spelled from characters.
    """
    arch = _arch(spec)
    tokenizer = bert.synthetic_tokenizer(arch.bert_fields["vocab_size"])
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state as it was
        torch.manual_seed(seed)
        model = Gloria(arch, tokenizer)
    return model.eval()


def _checkpoint_file(spec: Any, path: Path) -> Path:
    if path.is_file():
        return path
    name = spec.weight_files[0]
    if (path / name).is_file():
        return path / name
    found = sorted(path.glob("*.ckpt"))
    if len(found) == 1:
        return found[0]
    raise CheckpointError(
        f"{path}: no {name} here" + (f" (several .ckpt files: {[f.name for f in found]})" if found else "")
        + f"; get it from {spec.weight_source}"
    )


def load(spec: Any, path: str | Path) -> Gloria:
    """The authors' weights from ``chexpert_resnet50.ckpt`` (the file, or its folder) and ``vocab.txt`` beside it.

    Reads the checkpoint's ``state_dict`` and ``hyper_parameters`` (restricted unpickler: nothing runs), refuses
    hyper_parameters embedkit does not build (:func:`check_hyper_parameters`; a file without them loads), strips
    ``gloria.``, drops ``*position_ids``, and loads strictly otherwise. Returns the model in eval mode.
    """
    ckpt = _checkpoint_file(spec, Path(path))
    arch = _arch(spec)
    state, hparams = read_lightning_checkpoint(ckpt)
    check_hyper_parameters(hparams, arch, ckpt, spec.name)
    tokenizer = bert.clinical_bert_tokenizer(ckpt, spec.name, arch.bert_fields["vocab_size"])
    state = clean_state_dict(state)
    model = Gloria(arch, tokenizer)
    _load_strict(model, state, ckpt)
    return model.eval()


class GloriaFamily(ModelFamily):
    """GLoRIA's zero-shot: (global cosine + stored local similarity) / 2, max over a class's prompts, then each
    class column z-normalised over a FIXED set: every row of the cohort stored under the weights (all splits)."""

    module = "gloria"
    zeroshot_rule = "gloria"
    # chexpert-nih covers NIH's six classes (the default); chexpert-gloria is the authors' own draw, to reproduce them.
    prompt_sets = ("chexpert-nih", "chexpert-gloria")
    default_logit_scale = 1.0  # not used: the rule z-normalises instead
    uses_local_similarity = True
    legacy_preprocessing = "pil-box"  # embedkit resized with PIL's BOX filter before it used OpenCV's INTER_AREA
    ensembles = ("max",)

    def build(self, spec: Any, seed: int) -> Gloria:
        return build(spec, seed)

    def load(self, spec: Any, path: Path) -> Gloria:
        return load(spec, path)

    def class_scores(self, image: np.ndarray, prompts: np.ndarray, prompt_class: np.ndarray, n_classes: int,
                     logit_scale: float, ensemble: str, local_sim: np.ndarray | None = None) -> np.ndarray:
        if local_sim is None:
            raise ValueError("the gloria rule needs the stored local similarities")
        return np.asarray(zeroshot_scores(image @ prompts.T, local_sim, prompt_class, n_classes), dtype=np.float64)

    def zeroshot_settings(self, ensemble: str, logit_scale: float, scale_source: str, scored_rows: str) -> dict:
        return {"ensemble": "max",
                "class_score": "max over the class's prompts of (global cosine + local similarity) / 2, z-normalised",
                "logit_scale": None, "logit_scale_source": "not used: GLoRIA z-normalises instead",
                "znorm_set": f"{scored_rows}, population std per class column"}


FAMILY = GloriaFamily()

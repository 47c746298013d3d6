"""OpenAI CLIP with a ViT image tower, transcribed from openai/CLIP for the golden tests (no embedkit imports).

What is carried over from the authors' code (``clip/model.py``, ``clip/clip.py``, notebook
``Prompt_Engineering_for_ImageNet.ipynb``):

- ``build_model(state_dict)``: a ViT when ``visual.proj`` is present. Vision width = ``visual.conv1.weight``
  rows, layers = the number of ``visual.*.attn.in_proj_weight`` keys, patch = the kernel size, resolution =
  patch x round(sqrt(positions - 1)); embed_dim = ``text_projection`` columns, context = ``positional_embedding``
  rows, vocabulary = ``token_embedding.weight`` rows, text width = ``ln_final.weight`` size, text layers = the
  distinct ``transformer.resblocks.N``; both towers have width // 64 heads. The JIT-era integers
  ``input_resolution``, ``context_length``, ``vocab_size`` are deleted, then the load is strict.
- A block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); mlp = c_fc (4x width), QuickGELU x * sigmoid(1.702 x),
  c_proj; LayerNorm computed in float32, eps 1e-5; attention is ``nn.MultiheadAttention``'s (packed
  ``in_proj_weight``, per-head scaled dot product, ``out_proj``), written out here.
- Image: conv1 (no bias, stride = patch), a class token prepended, + positional embedding, ln_pre, blocks,
  ln_post of the class token, @ proj.
- Text: token embedding + positional embedding, blocks under the causal mask (-inf above the diagonal),
  ln_final, the row of the end-of-text token (the highest id in each row: ``text.argmax(-1)``) @ text_projection.
- Preprocessing ``_transform(n_px)``: Resize(n_px, bicubic) of the shorter side (the longer one
  int(n_px * long / short), torchvision's rule), CenterCrop(n_px) (offsets int(round((side - n_px) / 2))),
  convert("RGB"), ToTensor (/255), Normalize with OpenAI's mean and std.
- ``tokenize``: [<|startoftext|>] + BPE(text) + [<|endoftext|>], zero-padded to 77; too long is an error. The BPE
  itself (OpenAI's vocabulary, ftfy + html unescape + whitespace clean + lower case) is open_clip's copy.
- Zero-shot (the notebook's ``zeroshot_classifier``): per class, the prompts' text embeddings each L2-normalised,
  averaged, the mean renormalised; logits = 100. * unit image features @ those class vectors.

The state dict carries no head count; ``build_model`` takes one for tiny test configs whose widths are not
multiples of 64 (the authors' rule would give them no heads).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
JIT_INTEGERS = ("input_resolution", "context_length", "vocab_size")


class LayerNorm(nn.LayerNorm):
    """OpenAI's LayerNorm: computed in float32 whatever the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """``nn.MultiheadAttention(width, heads)``'s parameters under its names, its arithmetic written out."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, length, width = x.shape  # batch first here; OpenAI's is sequence first, the same arithmetic
        head = width // self.heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, self.heads, head).transpose(1, 2) for t in (q, k, v))
        scores = (q * head ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask.to(scores.dtype)  # OpenAI casts the mask to the input's dtype
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, width)
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = LayerNorm(width)
        self.attn_mask = attn_mask  # a plain attribute, as OpenAI's: not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), self.attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.width = width
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, grid * grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0, :]) @ self.proj


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int, vision_width: int,
                 vision_patch_size: int, context_length: int, vocab_size: int, transformer_width: int,
                 transformer_heads: int, transformer_layers: int, vision_heads: int):
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        vision_heads, embed_dim)
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)  # causal
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, mask)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image.to(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding.to(self.dtype)
        x = self.ln_final(self.transformer(x)).to(self.dtype)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def architecture(state_dict: dict[str, torch.Tensor], vision_heads: int | None = None,
                 text_heads: int | None = None) -> dict:
    """CLIP's constructor arguments read off a ViT state dict, as ``build_model`` infers them."""
    if "visual.proj" not in state_dict:
        raise ValueError("not a ViT CLIP state dict (no visual.proj); the ResNet towers are not transcribed")
    vision_width = state_dict["visual.conv1.weight"].shape[0]
    patch = state_dict["visual.conv1.weight"].shape[-1]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state_dict["ln_final.weight"].shape[0]
    return dict(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=patch * grid,
        vision_layers=len([k for k in state_dict if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")]),
        vision_width=vision_width,
        vision_patch_size=patch,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=text_width,
        transformer_heads=text_heads or text_width // 64,
        transformer_layers=len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks")}),
        vision_heads=vision_heads or vision_width // 64,
    )


def build_model(state_dict: dict[str, torch.Tensor], vision_heads: int | None = None,
                text_heads: int | None = None) -> CLIP:
    """OpenAI's ``build_model``: the architecture from the state dict, the JIT integers dropped, a strict load;
    float32 (``clip.load`` on the CPU calls ``model.float()``), eval mode."""
    state_dict = dict(state_dict)
    model = CLIP(**architecture(state_dict, vision_heads, text_heads))
    for key in JIT_INTEGERS:
        state_dict.pop(key, None)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()


def random_state_dict(seed: int, embed_dim: int, image_resolution: int, vision_layers: int, vision_width: int,
                      vision_patch_size: int, context_length: int, vocab_size: int, transformer_width: int,
                      transformer_layers: int) -> dict[str, torch.Tensor]:
    """A state dict in OpenAI's layout with every tensor random (LayerNorm gains and all biases too, so that each
    one matters to the outputs) and logit_scale ln(100), the released value; OpenAI's JIT integers included."""
    model = CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length,
                 vocab_size, transformer_width, 1, transformer_layers, 1)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        if name == "logit_scale":
            value = torch.tensor(math.log(100.0))
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            value = 1 + 0.1 * noise
        elif tensor.ndim == 1:  # biases and the class embedding
            value = 0.1 * noise
        elif name.endswith(("embedding.weight", "positional_embedding")):
            value = 0.02 * noise
        elif name.endswith(("visual.proj", "text_projection")):  # [in, out]
            value = noise * tensor.shape[0] ** -0.5
        else:  # [out, in, ...]
            value = noise * math.prod(tensor.shape[1:]) ** -0.5
        state[name] = value.contiguous()
    state.update(input_resolution=torch.tensor(image_resolution), context_length=torch.tensor(context_length),
                 vocab_size=torch.tensor(vocab_size))
    return state


@dataclass(frozen=True)
class Preprocess:
    """``clip._transform(n_px)``: Resize(n_px, BICUBIC), CenterCrop(n_px), RGB, ToTensor, Normalize."""

    n_px: int = 224

    def __call__(self, image: Image.Image) -> torch.Tensor:
        n = self.n_px
        w, h = image.size
        size = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
        if size != (w, h):
            image = image.resize(size, Image.Resampling.BICUBIC)
        w, h = image.size
        left, top = int(round((w - n) / 2.0)), int(round((h - n) / 2.0))
        image = image.crop((left, top, left + n, top + n)).convert("RGB")
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer  # OpenAI's BPE and vocabulary, as open_clip ships them

    return SimpleTokenizer()


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """``clip.tokenize``: start token, BPE, end token, zero padding; a text too long is an error, not truncated."""
    bpe = _bpe()
    # OpenAI appends <|startoftext|> and <|endoftext|> to the 49406 BPE entries; open_clip names them
    # <start_of_text> and <end_of_text>, the same ids
    sot, eot = bpe.encoder["<start_of_text>"], bpe.encoder["<end_of_text>"]
    assert (sot, eot) == (49406, 49407)
    rows = [[sot] + bpe.encode(text) + [eot] for text in texts]
    result = torch.zeros(len(rows), context_length, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row) > context_length:
            raise RuntimeError(f"Input {texts[i]} is too long for context length {context_length}")
        result[i, :len(row)] = torch.tensor(row)
    return result


@torch.no_grad()
def zeroshot_classifier(model: CLIP, prompts_per_class: list[list[str]]) -> torch.Tensor:
    """The notebook's ``zeroshot_classifier`` after its ``template.format(classname)``: [embed_dim, classes]."""
    weights = []
    for prompts in prompts_per_class:
        embeddings = model.encode_text(tokenize(prompts, model.context_length))
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights, dim=1)


@torch.no_grad()
def zeroshot_logits(model: CLIP, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The notebook's scoring: ``100. * image_features @ zeroshot_weights`` with unit image features."""
    features = model.encode_image(images)
    features = features / features.norm(dim=-1, keepdim=True)
    return 100.0 * features @ weights

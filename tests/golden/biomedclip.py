"""BiomedCLIP as its authors run it, for the golden tests: open_clip itself, and the model card's zero-shot.

The hub repository microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 is an open_clip ``local-dir`` /
``hf-hub`` folder (``open_clip_config.json``, ``open_clip_pytorch_model.bin``, the BERT tokenizer files); its card
loads it with ``open_clip.create_model_from_pretrained`` and ``open_clip.get_tokenizer`` and scores zero-shot as

    template = 'this is a photo of '
    texts = tokenizer([template + l for l in labels], context_length=256)
    image_features, text_features, logit_scale = model(images, texts)
    logits = (logit_scale * image_features @ text_features.t()).detach().softmax(dim=-1)

(``model(...)`` returns unit features and exp(logit_scale)). No embedkit imports.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEMPLATE = "this is a photo of "
CONTEXT_LENGTH = 256


def load(folder: Path):
    """(model, preprocess, tokenizer) the way the card loads them, from a local copy of the hub folder."""
    import open_clip

    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


@torch.no_grad()
def zero_shot(model, tokenizer, images: torch.Tensor, labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, probabilities) [N, labels] by the card's example."""
    texts = tokenizer([TEMPLATE + label for label in labels], context_length=CONTEXT_LENGTH)
    image_features, text_features, logit_scale = model(images, texts)
    logits = logit_scale * image_features @ text_features.t()
    return logits, logits.softmax(dim=-1)

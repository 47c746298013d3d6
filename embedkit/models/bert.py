"""BERT text towers built offline: configs of the released checkpoints, tiny configs, and vocab-file tokenizers.

BiomedCLIP (PubMedBERT), MedCLIP and GLoRIA (Bio_ClinicalBERT) all use a plain BERT. Nothing here touches the hub:
configs are written out from the released ones (docs/models.md), and tokenizers are built from a ``vocab.txt`` the user supplies (real
weights) or from a synthetic vocabulary (random init, labelled as such through ``weights_id``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] is id 0, as in the real vocabularies

# Bio_ClinicalBERT (emilyalsentzer/Bio_ClinicalBERT): MedCLIP and GLoRIA text towers.
CLINICAL_BERT = dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                     layer_norm_eps=1e-12, pad_token_id=0)
# BiomedBERT-base-uncased-abstract: BiomedCLIP's text tower (no pooler is used).
PUBMED_BERT = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                   layer_norm_eps=1e-12, pad_token_id=0)
# Tiny tower for tests and the demo: same code path, small widths.
TINY_BERT = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=512, type_vocab_size=2,
                 layer_norm_eps=1e-12, pad_token_id=0)


def bert_config(fields: dict, **overrides):
    """A transformers BertConfig from one of the dicts above."""
    from transformers import BertConfig

    return BertConfig(**{**fields, **overrides})


def synthetic_vocab(size: int, words: tuple[str, ...] = ()) -> list[str]:
    """A WordPiece vocabulary of ``size`` tokens that can spell any lower-case ASCII text without [UNK].

    Used only with random weights, where no real vocabulary exists offline: special tokens first ([PAD] = 0),
    then characters and their ``##`` continuations, then whole ``words``, padded with ``[unusedN]``.
    """
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = list(SPECIAL_TOKENS) + list(chars) + ["##" + c for c in chars]
    seen = set(tokens)
    for w in words:
        w = w.lower()
        if w not in seen:
            tokens.append(w)
            seen.add(w)
    if len(tokens) > size:
        raise ValueError(f"synthetic vocab needs {len(tokens)} tokens but the model has only {size}")
    tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
    return tokens


def write_tokenizer_folder(folder: str | Path, vocab: list[str], do_lower_case: bool = True) -> Path:
    """Write ``vocab.txt`` and ``tokenizer_config.json`` (a BertTokenizer) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": do_lower_case})
    )
    return folder


def load_tokenizer(vocab_file: str | Path, do_lower_case: bool = True):
    """A BertTokenizer from a ``vocab.txt``.

    transformers 5 ignores ``vocab_file=`` (every token becomes [UNK]); ``vocab=`` reads the file.
    """
    from transformers import BertTokenizer

    vocab_file = Path(vocab_file)
    if not vocab_file.is_file():
        raise FileNotFoundError(f"tokenizer vocabulary not found: {vocab_file}")
    tok = BertTokenizer(vocab=str(vocab_file), do_lower_case=do_lower_case)
    if tok.pad_token_id != 0:
        raise ValueError(f"{vocab_file}: [PAD] must be token 0, found id {tok.pad_token_id}")
    return tok


def synthetic_tokenizer(vocab_size: int, do_lower_case: bool = True):
    """A BertTokenizer over :func:`synthetic_vocab` (random-init models only)."""
    from transformers import BertTokenizer

    vocab = {t: i for i, t in enumerate(synthetic_vocab(vocab_size))}
    return BertTokenizer(vocab=vocab, do_lower_case=do_lower_case)


CLINICAL_BERT_SOURCE = "https://huggingface.co/emilyalsentzer/Bio_ClinicalBERT (file vocab.txt)"


def clinical_bert_tokenizer(weights_file: Path, model_name: str, vocab_size: int):
    """Bio_ClinicalBERT's tokenizer from the ``vocab.txt`` beside a MedCLIP or GLoRIA weights file.

    Neither release ships the vocabulary; a missing file, or one with more tokens than the text tower has,
    says which file is needed and where users get it.
    """
    from embedkit.models.base import CheckpointError
    from embedkit.models.registry import MissingWeightsError

    vocab = Path(weights_file).parent / "vocab.txt"
    if not vocab.is_file():
        raise MissingWeightsError(
            f"vocab.txt not found at {vocab}: '{model_name}' needs Bio_ClinicalBERT's vocabulary beside "
            f"{Path(weights_file).name} (the release does not ship it). Download it from {CLINICAL_BERT_SOURCE}."
        )
    tokenizer = load_tokenizer(vocab, do_lower_case=True)  # cased vocabulary, tokenised lower-cased
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"{vocab} has {len(tokenizer)} tokens but the text tower of '{model_name}' has {vocab_size}: use "
            f"Bio_ClinicalBERT's vocab.txt ({CLINICAL_BERT_SOURCE})."
        )
    return tokenizer

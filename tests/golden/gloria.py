"""GLoRIA as its authors wrote it (github.com/marshuang80/gloria @416466a, Apache-2.0): the reference for golden tests.

An independent transcription, importing nothing from embedkit: the authors' ImageEncoder
(gloria/models/vision_model.py), BertEncoder (gloria/models/text_model.py), the zero-shot path of GLoRIA
(gloria/models/gloria_model.py: process_text, process_img, _resize_img, get_global/local_similarities),
attention_fn and cosine_similarity (gloria/loss/gloria_loss.py), get_similarities, zero_shot_classification and
generate_chexpert_class_prompts (gloria/gloria.py, seeded by its random.seed(6)), utils.normalize,
builder.build_transformation(split="test") and the CheXpert prompt table (gloria/constants.py). Each function
keeps the authors' names and order of operations; where a line differs it says why (an API that changed since
transformers 4.2 / torch 1.7, or a library the venv lacks: nltk's RegexpTokenizer(r"\\w+") is re.findall).

Sizes come from the config (``authors_config``), so the same code runs the released ResNet-50 / Bio_ClinicalBERT
shapes or embedkit's tiny test configuration (``tiny_trunk``: embedkit's own small ResNet, which has no authors'
counterpart; everything around the trunk is the authors').

Also here: ``write_authors_checkpoint``, a checkpoint in the layout pytorch-lightning 1.1.4 (the authors' pin)
writes for GLoRIA's PretrainModel: ``state_dict`` under ``gloria.``, and ``hyper_parameters`` as the pickled
omegaconf 2.0.5 DictConfig (omegaconf is not installed here: stand-in classes pickle under omegaconf's module and
class names with its attribute layout: ``_metadata``, ``_parent``, ``_content`` / ``_val``).
"""

from __future__ import annotations

import collections
import copy
import random
import re
import sys
import types
import typing
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

from golden.chexpert_prompts import CHEXPERT_CLASS_PROMPTS  # gloria/constants.py

# ----------------------------------------------------------------------------------------------------------------
# The training config: configs/chexpert_pretrain_config.yaml, with what run.py sets before training
# ----------------------------------------------------------------------------------------------------------------

CHEXPERT_PRETRAIN_CONFIG = {
    "experiment_name": "gloria_pretrain",
    "phase": "pretrain",
    "lightning": {
        "trainer": {"gpus": "1", "max_epochs": 50, "distributed_backend": "dp", "gradient_clip_val": 0.25,
                    "lr": 0.00005, "precision": 16},
        "checkpoint_callback": {"monitor": "val_loss", "dirpath": "./data/ckpt", "save_last": True, "mode": "min",
                                "save_top_k": 10},
        "early_stopping_callback": {"monitor": "val_loss", "min_delta": 0.0, "patience": 10, "verbose": False,
                                    "mode": "min"},
        "logger": {"logger_type": "WandbLogger", "save_dir": "./data/", "project": "gloria_v2"},
    },
    "model": {
        "norm": False,
        "gloria": {"local_loss_weight": 1.0, "global_loss_weight": 1.0, "temp1": 4.0, "temp2": 5.0, "temp3": 10.0},
        "vision": {"model_name": "resnet_50", "freeze_cnn": False, "pretrained": True},
        "text": {"bert_type": "emilyalsentzer/Bio_ClinicalBERT", "last_n_layers": 4, "aggregate_method": "sum",
                 "norm": False, "embedding_dim": 768, "freeze_bert": False, "agg_tokens": True},
    },
    "data": {
        "dataset": "chexpert",
        "text": {"word_num": 97, "captions_per_image": 5, "full_report": False},
        "image": {"imsize": 256},
    },
    "transforms": {"norm": "half", "random_crop": {"crop_size": 224}},
    "train": {
        "update_interval": 1000, "batch_size": 48, "num_workers": 18, "nvis": 8, "rand_vis": False,
        "optimizer": {"name": "Adam", "weight_decay": 1e-6},
        "scheduler": {"name": "plateau", "monitor": "val_loss", "inerval": "epoch", "frequency": 1},
    },
}

# embedkit's tiny-gloria: its own trunk and BERT (names are embedkit's), 48-d embeddings.
TINY_OVERRIDES = {
    "model.vision.model_name": "embedkit_tiny_resnet",
    "model.text.bert_type": "embedkit/tiny-bert",
    "model.text.embedding_dim": 48,
}


# BERT sizes: Bio_ClinicalBERT's config.json (emilyalsentzer/Bio_ClinicalBERT), and embedkit's tiny text tower.
BIO_CLINICAL_BERT = dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                         layer_norm_eps=1e-12, pad_token_id=0)
TINY_BERT = dict(vocab_size=512, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)


def authors_config(overrides: dict[str, object] | None = None) -> dict:
    """The pretraining config as the checkpoint holds it (run.py adds data.frac, the names, the paths and two
    trainer flags), with ``overrides`` by dotted key."""
    cfg = copy.deepcopy(CHEXPERT_PRETRAIN_CONFIG)
    cfg["data"]["frac"] = 1.0
    cfg["experiment_name"] = "gloria_pretrain_1.0"
    cfg["extension"] = "2021_01_21_14_31_50"
    cfg["output_dir"] = "./data/output/gloria_pretrain_1.0/2021_01_21_14_31_50"
    cfg["lightning"]["checkpoint_callback"]["dirpath"] = "./data/ckpt/gloria_pretrain_1.0/2021_01_21_14_31_50"
    cfg["lightning"]["logger"]["name"] = "gloria_pretrain_1.0_2021_01_21_14_31_50"
    cfg["lightning"]["trainer"]["val_check_interval"] = 0.25
    cfg["lightning"]["trainer"]["auto_lr_find"] = False
    for key, value in (overrides or {}).items():
        *parents, last = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


def cfg_get(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint: pytorch-lightning 1.1.4's dump_checkpoint of PretrainModel, hyper_parameters an omegaconf DictConfig
# ----------------------------------------------------------------------------------------------------------------


class _Metadata:
    """omegaconf.base.Metadata (a dataclass: pickled as its __dict__)."""

    def __init__(self, key) -> None:
        self.ref_type = typing.Any
        self.object_type = None
        self.optional = True
        self.key = key
        self.flags = {}
        self.resolver_cache = collections.defaultdict(dict)


class _ContainerMetadata(_Metadata):
    """omegaconf.base.ContainerMetadata."""

    def __init__(self, key) -> None:
        super().__init__(key)
        self.key_type = typing.Any
        self.element_type = typing.Any


class _Container:
    """omegaconf 2.0.5's BaseContainer pickles ``self.__dict__`` (basecontainer.py __getstate__)."""

    def __getstate__(self) -> dict:
        return self.__dict__


class _DictConfig(_Container):
    pass


class _ListConfig(_Container):
    pass


class _AnyNode:
    """omegaconf.nodes.AnyNode: ``_metadata``, ``_parent``, ``_val``."""


_STAND_INS = {
    "omegaconf.base": {"Metadata": _Metadata, "ContainerMetadata": _ContainerMetadata},
    "omegaconf.dictconfig": {"DictConfig": _DictConfig},
    "omegaconf.listconfig": {"ListConfig": _ListConfig},
    "omegaconf.nodes": {"AnyNode": _AnyNode},
}


def _omegaconf(value, key=None, parent=None):
    if isinstance(value, dict):
        node = _DictConfig()
        node.__dict__.update(_metadata=_ContainerMetadata(key), _parent=parent, _content={})
        for k, v in value.items():
            node._content[k] = _omegaconf(v, k, node)
        return node
    if isinstance(value, list):
        node = _ListConfig()
        node.__dict__.update(_metadata=_ContainerMetadata(key), _parent=parent, _content=[])
        node._content.extend(_omegaconf(v, i, node) for i, v in enumerate(value))
        return node
    node = _AnyNode()
    node.__dict__.update(_metadata=_Metadata(key), _parent=parent, _val=value)
    return node


def _omegaconf_modules() -> dict[str, types.ModuleType]:
    modules = {"omegaconf": types.ModuleType("omegaconf")}
    for name, classes in _STAND_INS.items():
        module = types.ModuleType(name)
        for cls_name, cls in classes.items():
            cls.__module__, cls.__qualname__, cls.__name__ = name, cls_name, cls_name
            setattr(module, cls_name, cls)
        modules[name] = module
    return modules


def write_authors_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], cfg: dict | None,
                             hyper_parameters: object = None) -> Path:
    """``path`` as pytorch-lightning 1.1.4 saves GLoRIA's PretrainModel: its ``state_dict`` (``gloria.`` + the
    GLoRIA module's keys, ``embeddings.position_ids`` included as transformers 4.2 saved it), optimizer and
    scheduler states, and ``cfg`` as the DictConfig save_hyperparameters kept (with ``hparams_name`` and
    ``hparams_type``). ``cfg=None`` leaves the hyper_parameters out; ``hyper_parameters`` stores that object
    instead of a DictConfig."""
    state = {"gloria." + k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
    n_pos = next(v.shape[0] for k, v in state_dict.items() if k.endswith("position_embeddings.weight"))
    state["gloria.text_encoder.model.embeddings.position_ids"] = torch.arange(n_pos).unsqueeze(0)
    first = next(iter(state.values()))
    ckpt = {
        "epoch": 12, "global_step": 41808, "pytorch-lightning_version": "1.1.4",
        "callbacks": {},
        "optimizer_states": [{"state": {0: {"step": 41808, "exp_avg": torch.zeros_like(first),
                                            "exp_avg_sq": torch.zeros_like(first)}},
                              "param_groups": [{"lr": 5e-5, "betas": (0.5, 0.999), "eps": 1e-8,
                                                "weight_decay": 1e-6, "amsgrad": False, "params": [0]}]}],
        "lr_schedulers": [{"factor": 0.5, "patience": 5, "mode": "min", "best": 1.25, "num_bad_epochs": 0,
                           "last_epoch": 12}],
        "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                     "growth_interval": 2000, "_growth_tracker": 10},
        "state_dict": state,
    }
    with mock.patch.dict(sys.modules, _omegaconf_modules()):
        if hyper_parameters is not None:
            ckpt["hyper_parameters"] = hyper_parameters
        elif cfg is not None:
            ckpt.update(hparams_name="cfg", hyper_parameters=_omegaconf(cfg), hparams_type=_DictConfig)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path)
    return path


def write_tokenizer_folder(folder: Path, vocab: list[str]) -> Path:
    """vocab.txt and the tokenizer_config.json AutoTokenizer reads (Bio_ClinicalBERT is lower-cased)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Image encoder: gloria/models/vision_model.py ImageEncoder, cnn_backbones.resnet_50
# ----------------------------------------------------------------------------------------------------------------


class Identity(nn.Module):
    """Identity layer to replace last fully connected layer"""

    def forward(self, x):
        return x


def resnet_50():
    from torchvision import models as models_2d

    model = models_2d.resnet50(weights=None)  # pretrained=True in training; the checkpoint overwrites it
    feature_dims = model.fc.in_features
    model.fc = Identity()
    return model, feature_dims, 1024


def tiny_trunk(widths=(8, 16, 32, 64)):
    """embedkit's tiny trunk (not the authors'): conv1/bn1/relu/maxpool, then one torchvision BasicBlock per stage
    (stride 1, then 2, 2, 2; a 1x1 conv + BN downsample where the shape changes)."""
    from torchvision.models.resnet import BasicBlock

    model = nn.Module()
    model.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(widths[0])
    model.relu = nn.ReLU(inplace=True)
    model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    in_ch = widths[0]
    for i, out_ch in enumerate(widths):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or in_ch != out_ch:
            down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
        setattr(model, f"layer{i + 1}", nn.Sequential(BasicBlock(in_ch, out_ch, stride=stride, downsample=down)))
        in_ch = out_ch
    model.fc = Identity()
    return model, widths[3], widths[2]


TRUNKS = {"resnet_50": resnet_50, "embedkit_tiny_resnet": tiny_trunk}


class ImageEncoder(nn.Module):
    def __init__(self, cfg):
        super(ImageEncoder, self).__init__()

        self.output_dim = cfg["model"]["text"]["embedding_dim"]

        model_function = TRUNKS[cfg["model"]["vision"]["model_name"]]
        self.model, self.feature_dim, self.interm_feature_dim = model_function()

        self.global_embedder = nn.Linear(self.feature_dim, self.output_dim)
        self.local_embedder = nn.Conv2d(
            self.interm_feature_dim, self.output_dim, kernel_size=1, stride=1, padding=0, bias=False,
        )

        self.pool = nn.AdaptiveAvgPool2d(output_size=(1, 1))

    def forward(self, x, get_local=False):
        # the authors' `if "resnet" or ...` is always true: always resnet_forward
        global_ft, local_ft = self.resnet_forward(x, extract_features=True)

        if get_local:
            return global_ft, local_ft
        else:
            return global_ft

    def generate_embeddings(self, global_features, local_features):

        global_emb = self.global_embedder(global_features)
        local_emb = self.local_embedder(local_features)

        return global_emb, local_emb

    def resnet_forward(self, x, extract_features=False):

        # --> fixed-size input: batch x 3 x 299 x 299
        x = nn.Upsample(size=(299, 299), mode="bilinear", align_corners=True)(x)

        x = self.model.conv1(x)  # (batch_size, 64, 150, 150)
        x = self.model.bn1(x)
        x = self.model.relu(x)
        x = self.model.maxpool(x)

        x = self.model.layer1(x)  # (batch_size, 64, 75, 75)
        x = self.model.layer2(x)  # (batch_size, 128, 38, 38)
        x = self.model.layer3(x)  # (batch_size, 256, 19, 19)
        local_features = x
        x = self.model.layer4(x)  # (batch_size, 512, 10, 10)

        x = self.pool(x)
        x = x.view(x.size(0), -1)

        return x, local_features


# ----------------------------------------------------------------------------------------------------------------
# Text encoder: gloria/models/text_model.py BertEncoder
# ----------------------------------------------------------------------------------------------------------------


class BertEncoder(nn.Module):
    def __init__(self, cfg, bert_config, tokenizer):
        super(BertEncoder, self).__init__()
        from transformers import BertModel

        self.bert_type = cfg["model"]["text"]["bert_type"]
        self.last_n_layers = cfg["model"]["text"]["last_n_layers"]
        self.aggregate_method = cfg["model"]["text"]["aggregate_method"]
        self.norm = cfg["model"]["text"]["norm"]
        self.embedding_dim = cfg["model"]["text"]["embedding_dim"]
        self.agg_tokens = cfg["model"]["text"]["agg_tokens"]

        # AutoModel.from_pretrained(bert_type, output_hidden_states=True): built from its config here (offline)
        self.model = BertModel(bert_config)
        self.model.config.output_hidden_states = True

        self.tokenizer = tokenizer
        self.idxtoword = {v: k for k, v in self.tokenizer.get_vocab().items()}

        self.emb_global, self.emb_local = None, None

    def aggregate_tokens(self, embeddings, caption_ids):

        batch_size, num_layers, num_words, dim = embeddings.shape
        embeddings = embeddings.permute(0, 2, 1, 3)
        agg_embs_batch = []
        sentences = []

        # loop over batch
        for embs, caption_id in zip(embeddings, caption_ids):

            agg_embs = []
            token_bank = []
            words = []
            word_bank = []

            # loop over sentence
            for word_emb, word_id in zip(embs, caption_id):

                word = self.idxtoword[word_id.item()]

                if word == "[SEP]":
                    new_emb = torch.stack(token_bank)
                    new_emb = new_emb.sum(axis=0)
                    agg_embs.append(new_emb)
                    words.append("".join(word_bank))

                    agg_embs.append(word_emb)
                    words.append(word)
                    break

                if not word.startswith("##"):
                    if len(word_bank) == 0:
                        token_bank.append(word_emb)
                        word_bank.append(word)
                    else:
                        new_emb = torch.stack(token_bank)
                        new_emb = new_emb.sum(axis=0)
                        agg_embs.append(new_emb)
                        words.append("".join(word_bank))

                        token_bank = [word_emb]
                        word_bank = [word]
                else:
                    if word.startswith("##"):
                        token_bank.append(word_emb)
                        word_bank.append(word[2:])

            agg_embs = torch.stack(agg_embs)
            padding_size = num_words - len(agg_embs)
            paddings = torch.zeros(padding_size, num_layers, dim)
            paddings = paddings.to(agg_embs.device)
            words = words + ["[PAD]"] * padding_size

            agg_embs_batch.append(torch.cat([agg_embs, paddings]))
            sentences.append(words)

        agg_embs_batch = torch.stack(agg_embs_batch)
        agg_embs_batch = agg_embs_batch.permute(0, 2, 1, 3)
        return agg_embs_batch, sentences

    def forward(self, ids, attn_mask, token_type):

        outputs = self.model(ids, attn_mask, token_type)

        # aggregate intermetidate layers
        if self.last_n_layers > 1:
            all_embeddings = outputs.hidden_states  # outputs[2] under transformers 4.2
            embeddings = torch.stack(
                all_embeddings[-self.last_n_layers:]
            )  # layers, batch, sent_len, embedding size

            embeddings = embeddings.permute(1, 0, 2, 3)

            if self.agg_tokens:
                embeddings, sents = self.aggregate_tokens(embeddings, ids)
            else:
                sents = [[self.idxtoword[w.item()] for w in sent] for sent in ids]

            sent_embeddings = embeddings.mean(axis=2)

            if self.aggregate_method == "sum":
                word_embeddings = embeddings.sum(axis=1)
                sent_embeddings = sent_embeddings.sum(axis=1)
            elif self.aggregate_method == "mean":
                word_embeddings = embeddings.mean(axis=1)
                sent_embeddings = sent_embeddings.mean(axis=1)
            else:
                raise Exception("Aggregation method not implemented")

        # use last layer
        else:
            word_embeddings, sent_embeddings = outputs[0], outputs[1]

        batch_dim, num_words, feat_dim = word_embeddings.shape
        word_embeddings = word_embeddings.view(batch_dim * num_words, feat_dim)
        if self.emb_local is not None:
            word_embeddings = self.emb_local(word_embeddings)
        word_embeddings = word_embeddings.view(batch_dim, num_words, self.embedding_dim)
        word_embeddings = word_embeddings.permute(0, 2, 1)

        if self.emb_global is not None:
            sent_embeddings = self.emb_global(sent_embeddings)

        if self.norm is True:
            word_embeddings = word_embeddings / torch.norm(
                word_embeddings, 2, dim=1, keepdim=True
            ).expand_as(word_embeddings)
            sent_embeddings = sent_embeddings / torch.norm(
                sent_embeddings, 2, dim=1, keepdim=True
            ).expand_as(sent_embeddings)

        return word_embeddings, sent_embeddings, sents


# ----------------------------------------------------------------------------------------------------------------
# gloria/loss/gloria_loss.py
# ----------------------------------------------------------------------------------------------------------------


def cosine_similarity(x1, x2, dim=1, eps=1e-8):
    """Returns cosine similarity between x1 and x2, computed along dim."""
    w12 = torch.sum(x1 * x2, dim)
    w1 = torch.norm(x1, 2, dim)
    w2 = torch.norm(x2, 2, dim)
    return (w12 / (w1 * w2).clamp(min=eps)).squeeze()


def attention_fn(query, context, temp1):
    """
    query: batch x ndf x queryL
    context: batch x ndf x ih x iw (sourceL=ihxiw)
    mask: batch_size x sourceL
    """
    batch_size, queryL = query.size(0), query.size(2)
    ih, iw = context.size(2), context.size(3)
    sourceL = ih * iw

    # --> batch x sourceL x ndf
    context = context.view(batch_size, -1, sourceL)
    contextT = torch.transpose(context, 1, 2).contiguous()

    # Get attention
    # (batch x sourceL x ndf)(batch x ndf x queryL)
    # -->batch x sourceL x queryL
    attn = torch.bmm(contextT, query)
    # --> batch*sourceL x queryL
    attn = attn.view(batch_size * sourceL, queryL)
    attn = nn.Softmax(dim=-1)(attn)

    # --> batch x sourceL x queryL
    attn = attn.view(batch_size, sourceL, queryL)
    # --> batch*queryL x sourceL
    attn = torch.transpose(attn, 1, 2).contiguous()
    attn = attn.view(batch_size * queryL, sourceL)

    attn = attn * temp1
    attn = nn.Softmax(dim=-1)(attn)
    attn = attn.view(batch_size, queryL, sourceL)
    # --> batch x sourceL x queryL
    attnT = torch.transpose(attn, 1, 2).contiguous()

    # (batch x ndf x sourceL)(batch x sourceL x queryL)
    # --> batch x ndf x queryL
    weightedContext = torch.bmm(context, attnT)

    return weightedContext, attn.view(batch_size, -1, ih, iw)


# ----------------------------------------------------------------------------------------------------------------
# gloria/models/gloria_model.py GLoRIA (the inference half)
# ----------------------------------------------------------------------------------------------------------------


class GLoRIA(nn.Module):
    def __init__(self, cfg, bert_config, tokenizer):
        super(GLoRIA, self).__init__()

        self.cfg = cfg
        self.text_encoder = BertEncoder(cfg, bert_config, tokenizer)
        self.img_encoder = ImageEncoder(cfg)

        self.temp1 = cfg["model"]["gloria"]["temp1"]
        self.temp2 = cfg["model"]["gloria"]["temp2"]
        self.temp3 = cfg["model"]["gloria"]["temp3"]

        self.tokenizer = tokenizer
        self.ixtoword = {v: k for k, v in self.tokenizer.get_vocab().items()}

    def text_encoder_forward(self, caption_ids, attention_mask, token_type_ids):
        text_emb_l, text_emb_g, sents = self.text_encoder(caption_ids, attention_mask, token_type_ids)
        return text_emb_l, text_emb_g, sents

    def image_encoder_forward(self, imgs):
        img_feat_g, img_emb_l = self.img_encoder(imgs, get_local=True)
        img_emb_g, img_emb_l = self.img_encoder.generate_embeddings(img_feat_g, img_emb_l)

        return img_emb_l, img_emb_g

    def get_global_similarities(self, img_emb_g, text_emb_g):
        from sklearn import metrics

        img_emb_g = img_emb_g.detach().cpu().numpy()
        text_emb_g = text_emb_g.detach().cpu().numpy()
        global_similarities = metrics.pairwise.cosine_similarity(img_emb_g, text_emb_g)
        global_similarities = torch.Tensor(global_similarities)
        return global_similarities

    def get_local_similarities(self, img_emb_l, text_emb_l, cap_lens):

        batch_size = img_emb_l.shape[0]
        similarities = []

        for i in range(len(text_emb_l)):
            words_num = cap_lens[i]
            word = text_emb_l[i, :, 1: words_num + 1].unsqueeze(0).contiguous()  # [1, 768, 25]

            word = word.repeat(batch_size, 1, 1)  # [48, 768, 25]
            context = img_emb_l  # [48, 768, 19, 19]

            weiContext, attn = attention_fn(word, context, 4.0)  # [48, 768, 25], [48, 25, 19, 19]

            word = word.transpose(1, 2).contiguous()  # [48, 25, 768]
            weiContext = weiContext.transpose(1, 2).contiguous()  # [48, 25, 768]

            word = word.view(batch_size * words_num, -1)  # [1200, 768]
            weiContext = weiContext.view(batch_size * words_num, -1)  # [1200, 768]
            #
            row_sim = cosine_similarity(word, weiContext)
            row_sim = row_sim.view(batch_size, words_num)  # [48, 25]

            row_sim.mul_(5.0).exp_()
            row_sim, max_row_idx = torch.max(row_sim, dim=1, keepdim=True)  # [48, 1]

            row_sim = torch.log(row_sim)

            similarities.append(row_sim)

        local_similarities = torch.cat(similarities, 1).detach().cpu()

        return local_similarities

    def process_text(self, text, device):

        if type(text) == str:
            text = [text]

        processed_text_tensors = []
        for t in text:
            # use space instead of newline
            t = t.replace("\n", " ")

            # split sentences
            splitter = re.compile("[0-9]+\\.")
            captions = splitter.split(t)
            captions = [point.split(".") for point in captions]
            captions = [sent for point in captions for sent in point]

            all_sents = []

            for t in captions:
                t = t.replace("\ufffd\ufffd", " ")
                tokens = re.findall(r"\w+", t.lower())  # nltk RegexpTokenizer(r"\w+").tokenize

                if len(tokens) <= 1:
                    continue

                included_tokens = []
                for t in tokens:
                    t = t.encode("ascii", "ignore").decode("ascii")
                    if len(t) > 0:
                        included_tokens.append(t)
                all_sents.append(" ".join(included_tokens))

            t = " ".join(all_sents)

            text_tensors = self.tokenizer(
                t,
                return_tensors="pt",
                truncation=True,
                padding="max_length",
                max_length=self.cfg["data"]["text"]["word_num"],
            )
            text_tensors["sent"] = [self.ixtoword[ix] for ix in text_tensors["input_ids"][0].tolist()]
            processed_text_tensors.append(text_tensors)

        caption_ids = torch.stack([x["input_ids"] for x in processed_text_tensors])
        attention_mask = torch.stack([x["attention_mask"] for x in processed_text_tensors])
        token_type_ids = torch.stack([x["token_type_ids"] for x in processed_text_tensors])

        if len(text) == 1:
            caption_ids = caption_ids.squeeze(0).to(device)
            attention_mask = attention_mask.squeeze(0).to(device)
            token_type_ids = token_type_ids.squeeze(0).to(device)
        else:
            caption_ids = caption_ids.squeeze().to(device)
            attention_mask = attention_mask.squeeze().to(device)
            token_type_ids = token_type_ids.squeeze().to(device)

        cap_lens = []
        for txt in text:
            cap_lens.append(len([w for w in txt if not w.startswith("[")]))

        return {
            "caption_ids": caption_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "cap_lens": cap_lens,
        }

    def process_class_prompts(self, class_prompts, device):

        cls_2_processed_txt = {}
        for k, v in class_prompts.items():
            cls_2_processed_txt[k] = self.process_text(v, device)

        return cls_2_processed_txt

    def process_img(self, paths, device):

        transform = build_transformation(self.cfg, split="test")

        if type(paths) == str:
            paths = [paths]

        all_imgs = []
        for p in paths:

            x = cv2.imread(str(p), 0)

            # tranform images
            x = self._resize_img(x, self.cfg["data"]["image"]["imsize"])
            img = Image.fromarray(x).convert("RGB")
            img = transform(img)
            all_imgs.append(torch.tensor(img))

        all_imgs = torch.stack(all_imgs).to(device)

        return all_imgs

    def _resize_img(self, img, scale):
        """
        Args:
            img - image as numpy array (cv2)
            scale - desired output image-size as scale x scale
        Return:
            image resized to scale x scale with shortest dimension 0-padded
        """
        size = img.shape
        max_dim = max(size)
        max_ind = size.index(max_dim)

        # Resizing
        if max_ind == 0:
            # image is heigher
            wpercent = scale / float(size[0])
            hsize = int((float(size[1]) * float(wpercent)))
            desireable_size = (scale, hsize)
        else:
            # image is wider
            hpercent = scale / float(size[1])
            wsize = int((float(size[0]) * float(hpercent)))
            desireable_size = (wsize, scale)
        resized_img = cv2.resize(img, desireable_size[::-1], interpolation=cv2.INTER_AREA)  # flips the size

        # Padding
        if max_ind == 0:
            # height fixed at scale, pad the width
            pad_size = scale - resized_img.shape[1]
            left = int(np.floor(pad_size / 2))
            right = int(np.ceil(pad_size / 2))
            top = int(0)
            bottom = int(0)
        else:
            # width fixed at scale, pad the height
            pad_size = scale - resized_img.shape[0]
            top = int(np.floor(pad_size / 2))
            bottom = int(np.ceil(pad_size / 2))
            left = int(0)
            right = int(0)
        resized_img = np.pad(resized_img, [(top, bottom), (left, right)], "constant", constant_values=0)

        return resized_img


def build_transformation(cfg, split):
    """gloria/builder.py build_transformation, the test split."""
    assert split == "test"
    t = []
    if cfg["transforms"]["random_crop"] is not None:
        t.append(transforms.CenterCrop(cfg["transforms"]["random_crop"]["crop_size"]))

    t.append(transforms.ToTensor())
    if cfg["transforms"]["norm"] is not None:
        if cfg["transforms"]["norm"] == "imagenet":
            t.append(transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
        elif cfg["transforms"]["norm"] == "half":
            t.append(transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
        else:
            raise NotImplementedError("Normaliation method not implemented")

    return transforms.Compose(t)


# ----------------------------------------------------------------------------------------------------------------
# gloria/gloria.py and gloria/utils/utils.py
# ----------------------------------------------------------------------------------------------------------------


def load_gloria(ckpt_dict: dict[str, torch.Tensor], cfg: dict, bert_config, tokenizer) -> GLoRIA:
    """gloria.load_gloria after torch.load: keys ``k.split("gloria.")[-1]``, strict load_state_dict.

    ``embeddings.position_ids`` is dropped: transformers 5 no longer keeps it in the state dict.
    """
    fixed_ckpt_dict = {}
    for k, v in ckpt_dict.items():
        new_key = k.split("gloria.")[-1]
        fixed_ckpt_dict[new_key] = v
    ckpt_dict = {k: v for k, v in fixed_ckpt_dict.items() if not k.endswith("position_ids")}

    gloria_model = GLoRIA(cfg, bert_config, tokenizer)
    gloria_model.load_state_dict(ckpt_dict)
    return gloria_model.eval()  # the authors' Lightning model is in eval mode when it scores


def get_similarities(gloria_model, imgs, txts, similarity_type="both"):
    # get global and local image features
    with torch.no_grad():
        img_emb_l, img_emb_g = gloria_model.image_encoder_forward(imgs)
        text_emb_l, text_emb_g, _ = gloria_model.text_encoder_forward(
            txts["caption_ids"], txts["attention_mask"], txts["token_type_ids"]
        )

    # get similarities
    global_similarities = gloria_model.get_global_similarities(img_emb_g, text_emb_g)
    local_similarities = gloria_model.get_local_similarities(img_emb_l, text_emb_l, txts["cap_lens"])
    similarities = (local_similarities + global_similarities) / 2

    if similarity_type == "global":
        return global_similarities.detach().cpu().numpy()
    elif similarity_type == "local":
        return local_similarities.detach().cpu().numpy()
    else:
        return similarities.detach().cpu().numpy()


def normalize(similarities, method="norm"):

    if method == "norm":
        return (similarities - similarities.mean(axis=0)) / (similarities.std(axis=0))
    elif method == "standardize":
        return (similarities - similarities.min(axis=0)) / (similarities.max(axis=0) - similarities.min(axis=0))
    else:
        raise Exception("normalizing method not implemented")


def zero_shot_classification(gloria_model, imgs, cls_txt_mapping):
    """The class scores [images, classes] in cls_txt_mapping's order (the authors wrap them in a DataFrame)."""

    # get similarities for each class
    class_similarities = []
    for cls_name, cls_txt in cls_txt_mapping.items():
        similarities = get_similarities(gloria_model, imgs, cls_txt, similarity_type="both")
        cls_similarity = similarities.max(axis=1)  # average between class prompts
        class_similarities.append(cls_similarity)
    class_similarities = np.stack(class_similarities, axis=1)

    # normalize across class
    if class_similarities.shape[0] > 1:
        class_similarities = normalize(class_similarities)

    return class_similarities



def generate_chexpert_class_prompts(n: int = 5):
    """gloria.generate_chexpert_class_prompts, right after ``import gloria`` (whose gloria.py runs random.seed(6)).

    The module-level generator is seeded and drawn from exactly as the authors' code does; the caller's state of
    ``random`` is restored afterwards.
    """
    saved = random.getstate()
    try:
        random.seed(6)
        prompts = {}
        for k, v in CHEXPERT_CLASS_PROMPTS.items():
            cls_prompts = []
            keys = list(v.keys())

            # severity
            for k0 in v[keys[0]]:
                # subtype
                for k1 in v[keys[1]]:
                    # location
                    for k2 in v[keys[2]]:
                        cls_prompts.append(f"{k0} {k1} {k2}")

            prompts[k] = random.sample(cls_prompts, n)
        return prompts
    finally:
        random.setstate(saved)

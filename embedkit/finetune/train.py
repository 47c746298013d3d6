"""LoRA and full fine-tuning of an image tower with the paper's LP head, images streamed from disk.

The network is the LP head of :mod:`embedkit.heads.probe` (Linear(d, 1024) -> Linear(1024, C), no activation,
initialised from the same seeded generator as a stored-vector probe) on the family's own image path (its
preprocessing, its tower, its projection): ``head(model.encode_image_raw(pixels))`` under the ``study`` LoRA preset
(the study's head read the raw embedding), ``head(model.encode_image(pixels))``, the L2-normalised vector the
embedding pass stores, otherwise. The text tower is never run.

- ``lora``: the tower is frozen and LoRA is added where :mod:`embedkit.finetune.lora` says for the run's preset
  (``study``, the default: the study's targets, lora_alpha = rank so delta W = B A; ``embedkit``: the wider layout,
  alpha 1), rank = the model's ``lora_rank`` unless given; ``--rank``, ``--alpha`` and ``--targets`` override the
  preset. The tower stays in eval mode: BatchNorm statistics and every other frozen tensor stay exactly as loaded,
  which is what makes "adapter + head" a complete checkpoint.
- ``ft``: every image-tower parameter trains; the tower is in train mode (BatchNorm statistics update, Swin's
  stochastic depth is active); the head reads the unit vectors.

Training: AdamW (lr 1e-4, weight decay 1e-5), cross-entropy, batches of 64 drawn in a fresh seeded shuffle each
epoch (last partial batch kept), the augmentations of :mod:`embedkit.finetune.augment` on training images only,
a learning-rate schedule stepped once per epoch (``cosine``: CosineAnnealingLR over all epochs, the default;
``step``: x0.1 every third of the epochs; ``constant``), validation loss after every epoch; the weights of the epoch
with the lowest validation loss (strictly lower: ties keep the earlier one) make the predictions; optional early
stopping after N epochs without improvement. Everything is float32 unless ``amp`` asks for bf16 or fp16 autocast
on CUDA (fp16 with a gradient scaler), as every upstream training path ran in fp32.

Checkpoints live in ``<store>/checkpoints/<run_id>/``: ``config.json`` (settings, class order, cohort fingerprint),
``last.pt`` after every epoch (trainable weights - LoRA adapters and head, or tower and head - with the optimizer,
scheduler, scaler and RNG states, the epoch and the early-stopping state) and ``best.pt`` (the best epoch's
trainable weights). Every random draw of an epoch comes from (seed, epoch), so ``resume`` continues from the last
completed epoch and ends exactly where an uninterrupted run ends. A finished run writes its ``runs`` row and one
prediction per cohort row (softmax probabilities, class order in the config) like the heads do, keeps
``best.pt`` and drops ``last.pt``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from embedkit.constants import AMP_MODES, FINETUNE_METHODS, LORA_PRESETS, LR_SCHEDULES
from embedkit.data.cohort import cohort_fingerprint
from embedkit.device import autocast_context
from embedkit.errors import EmbedkitError
from embedkit.finetune.augment import (AUGMENT_WHERE, AUGMENT_WHERE_BEFORE, Augment, AugmentedImageFiles, KeySampler,
                                       epoch_order, torch_seed)
from embedkit.models.base import CheckpointError
from embedkit.store.store import Store, new_run_id, sql_eq

FINGERPRINT_COLUMNS = ("row_id", "path", "label", "split")  # what fine-tuning reads of a cohort

if TYPE_CHECKING:
    from embedkit.finetune.lora import LoraTower
    from embedkit.models.registry import ModelSpec

HEAD_HIDDEN = 1024  # the paper's LP head width


class FinetuneError(EmbedkitError):
    """Fine-tuning settings, cohort or checkpoint problems the user can fix."""


@dataclass
class FinetuneConfig:
    """Every setting of one fine-tuning run (the paper's values as defaults); stored in the run's config."""

    model: str
    method: str = "lora"
    cohort: str = "nih6x200"
    weights: str | None = None  # file or folder of released weights (else weights_dir / $EMBEDKIT_WEIGHTS)
    weights_dir: str | None = None
    random_init: bool = False
    seed_init: int = 0  # seed of the random-init weights
    lora_preset: str = "study"  # the study's LoRA (targets, unscaled update, raw head features) or "embedkit"
    rank: int | None = None  # LoRA rank; None = the model's lora_rank (16 for ViTs, 4 for ResNets)
    alpha: float | None = None  # peft's lora_alpha; None = the preset's (study: the rank; embedkit: 1)
    targets: list[str] | None = None  # LoRA targets relative to a block; None = the preset's for the tower
    epochs: int = 100
    lr: float = 1e-4
    wd: float = 1e-5
    batch_size: int = 64
    seed: int = 77
    schedule: str = "cosine"
    early_stopping: int = 0  # epochs without a lower val loss before stopping; 0 = never
    augment: bool = True
    amp: str = "none"  # fp32 unless asked (bf16, fp16: autocast on CUDA only), as every upstream path runs
    preprocess: str | None = None  # the family's preprocessing (None: its default; MedCLIP: study | upstream)
    device: str = "auto"
    workers: int = 2
    study_id: str | None = None  # the `embedkit study` this run belongs to (runs.study_id)

    def validate(self) -> None:
        """Raise :class:`FinetuneError` naming the first bad setting."""
        if self.method not in FINETUNE_METHODS:
            raise FinetuneError(f"--method must be one of {', '.join(FINETUNE_METHODS)}, not '{self.method}'")
        if self.schedule not in LR_SCHEDULES:
            raise FinetuneError(f"--schedule must be one of {', '.join(LR_SCHEDULES)}, not '{self.schedule}'")
        if self.amp not in AMP_MODES:
            raise FinetuneError(f"--amp must be one of {', '.join(AMP_MODES)}, not '{self.amp}'")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        for name in ("early_stopping", "workers"):
            if getattr(self, name) < 0:
                raise FinetuneError(f"--{name.replace('_', '-')} must be 0 or more, not {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise FinetuneError(f"--lr must be a positive number, not {self.lr}")
        if not (math.isfinite(self.wd) and self.wd >= 0):
            raise FinetuneError(f"--wd must be a non-negative number, not {self.wd}")
        if self.weights and self.random_init:
            raise FinetuneError("--weights and --random-init exclude each other")
        if self.lora_preset not in LORA_PRESETS:
            raise FinetuneError(f"--lora-preset must be one of {', '.join(LORA_PRESETS)}, not '{self.lora_preset}'")
        if self.method == "ft" and (self.targets or self.rank is not None or self.alpha is not None):
            raise FinetuneError("--rank, --alpha and --targets are LoRA settings; --method ft trains every tower "
                                "weight")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise FinetuneError(f"--alpha must be a positive number, not {self.alpha}")
        if self.rank is not None and self.rank < 1:
            raise FinetuneError(f"--rank must be at least 1, not {self.rank}")

    def settings(self) -> dict:
        """The settings as stored (the preset, rank/alpha/targets only for LoRA)."""
        out = asdict(self)
        if self.method == "ft":
            for key in ("lora_preset", "rank", "alpha", "targets"):
                out.pop(key)
        if self.study_id is None:
            out.pop("study_id")  # runs outside a study keep the config they always had
        return out


@dataclass
class EpochStats:
    """One finished epoch (``epoch`` counts from 0, as the heads' ``best_epoch`` does)."""

    epoch: int
    steps: int
    train_loss: float
    val_loss: float
    lr: float
    images_per_second: float
    seconds: float


@dataclass
class FinetuneResult:
    """The outcome of :func:`finetune` / :func:`resume`; ``finished`` is False when ``stop_after`` cut it short."""

    run_id: str
    finished: bool
    epochs_done: int
    best_epoch: int
    best_val_loss: float
    trainable_params: int
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    checkpoint_dir: Path | None = None

    def line(self) -> str:
        if not self.finished:
            return (f"run {self.run_id} stopped after epoch {self.epochs_done}; continue it with "
                    f"`embedkit finetune --resume {self.run_id}`")
        test = self.metrics.get("test", {})
        scores = (f", test accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}" if test else "")
        early = " (early stop)" if self.stopped_early else ""
        # Printed 1-based like the progress lines; the run's metrics keep the heads' 0-based best_epoch.
        return (f"run {self.run_id}: {self.epochs_done} epochs{early}, best epoch {self.best_epoch + 1} "
                f"(val loss {self.best_val_loss:.4f}), {self.trainable_params:,} trainable parameters{scores}")


# ---- the network ---------------------------------------------------------------------------------------------


class ImageClassifier(nn.Module):
    """The LP head on the family's image path: ``head(model.encode_image_raw(pixels))`` with ``raw_features``,
    else ``head(model.encode_image(pixels))`` (unit vectors)."""

    def __init__(self, model: nn.Module, head: nn.Module, raw_features: bool = False):
        super().__init__()
        self.model = model
        self.head = head
        self.raw_features = raw_features

    @property
    def tower(self) -> nn.Module:
        return self.model.image_tower()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        encode = self.model.encode_image_raw if self.raw_features else self.model.encode_image
        return self.head(encode(pixels))


def lp_head(dim: int, n_classes: int, seed: int) -> nn.Module:
    """The paper's LP head, with the initial weights a stored-vector LP head of the same seed gets."""
    from embedkit.heads.probe import head_module, init_head_params

    head = head_module("lp", dim, HEAD_HIDDEN, n_classes)
    params = init_head_params("lp", dim, HEAD_HIDDEN, n_classes, torch.Generator().manual_seed(int(seed)))
    with torch.no_grad():
        head[0].weight.copy_(params["W1"]), head[0].bias.copy_(params["b1"])
        head[-1].weight.copy_(params["W2"]), head[-1].bias.copy_(params["b2"])
    return head


def build_network(model: nn.Module, method: str, n_classes: int, seed: int, rank: int = 16,
                  alpha: float | None = None, targets: list[str] | None = None, preset: str = "study"
                  ) -> tuple[ImageClassifier, LoraTower | None, dict]:
    """Freeze ``model``, make its image tower trainable the ``method`` way, put the LP head on top.

    LoRA goes where ``preset`` says (or at ``targets``), with peft's lora_alpha ``alpha`` (None: the preset's),
    and the head reads the features the preset says (ft: unit vectors). Returns the network, the LoRA wrapping
    (None for ft) and what the run's config records about it: under LoRA every value peft was given and the
    scaling it applies. The text tower stays frozen and unused. Seeds torch's global RNG with ``seed`` (LoRA's A
    matrices draw from it).
    """
    from embedkit.finetune.lora import PRESETS, apply_lora, count_parameters

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tower = model.image_tower()
    info: dict = {"tower_params": count_parameters(tower, trainable_only=False), "embed_dim": model.embed_dim,
                  "head": f"lp: Linear({model.embed_dim},{HEAD_HIDDEN})->Linear({HEAD_HIDDEN},{n_classes})"}
    torch.manual_seed(seed)
    lora, features = None, "unit"
    if method == "lora":
        lora = apply_lora(model, rank, alpha, targets, preset)
        features = PRESETS[preset].head_features
        info.update(lora_preset=preset, rank=rank, alpha=lora.alpha, lora_scaling=lora.scaling,
                    lora_layout=lora.layout.kind, lora_targets=lora.targets, lora_modules=len(lora.modules))
    else:
        for p in tower.parameters():
            p.requires_grad_(True)
    info["head_features"] = features
    net = ImageClassifier(model, lp_head(model.embed_dim, n_classes, seed), raw_features=features == "raw")
    info["trainable_params"] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return net, lora, info


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, pixels: torch.Tensor, labels: torch.Tensor,
               autocast=None, scaler=None) -> float:
    """One optimisation step on one batch (mean cross-entropy); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        logits = net(pixels)
    loss = F.cross_entropy(logits.float(), labels)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def _make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


# ---- a session: everything one run holds ---------------------------------------------------------------------


@dataclass
class _Session:
    store: Store
    config: FinetuneConfig
    run_id: str
    folder: Path
    spec: ModelSpec
    weights_id: str
    rows: pd.DataFrame
    classes: tuple[str, ...]
    y: np.ndarray  # per row: class index, -1 without a single label
    path_index: np.ndarray  # per row: index into paths
    paths: list[str]
    train_rows: np.ndarray
    val_rows: np.ndarray
    model: nn.Module
    net: ImageClassifier
    tower: nn.Module
    lora: LoraTower | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object | None
    device: torch.device
    loader: torch.utils.data.DataLoader
    sampler: KeySampler
    trainable_params: int
    extra_config: dict
    pixels_from: str  # where the training images' pixels come from: the pixel cache or the image files
    # training state (what last.pt holds besides the tensors)
    epochs_done: int = 0
    best_epoch: int = -1
    best_val_loss: float = math.inf
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


def checkpoint_dir(store: Store, run_id: str) -> Path:
    """Where the checkpoints of ``run_id`` live: ``<store>/checkpoints/<run_id>/``."""
    store.require_local("fine-tuning (its checkpoints are files beside the tables)")
    return Path(store.path) / "checkpoints" / run_id


def _prepare(store: Store, config: FinetuneConfig, run_id: str, pixel_cache: bool = True,
             progress: bool = True) -> _Session:
    from embedkit.data.cohort import cohort_classes, load_cohort
    from embedkit.device import resolve_device
    from embedkit.models.registry import get_spec, instantiate

    config.validate()
    spec = get_spec(config.model)
    rows = load_cohort(store, config.cohort)
    classes = cohort_classes(rows)
    if len(classes) < 2:
        raise FinetuneError(f"cohort '{config.cohort}' has {len(classes)} class(es) with single labels: need 2 or more")
    index = {c: i for i, c in enumerate(classes)}
    y = rows["label"].map(index).fillna(-1).astype(np.int64).to_numpy()
    split = rows["split"].to_numpy(dtype=object)
    train_rows = np.flatnonzero((split == "train") & (y >= 0))
    val_rows = np.flatnonzero((split == "val") & (y >= 0))
    for name, chosen in (("train", train_rows), ("val", val_rows)):
        if not len(chosen):
            raise FinetuneError(f"cohort '{config.cohort}' has no labelled {name} rows: fine-tuning trains on train "
                                f"and keeps the epoch with the lowest val loss")
    paths = list(dict.fromkeys(rows["path"]))  # repeated images are decoded once per pass
    position = {p: i for i, p in enumerate(paths)}
    path_index = rows["path"].map(position).to_numpy()

    device = resolve_device(config.device)
    model, weights_id, _source = instantiate(spec, config.weights, config.random_init, config.seed_init,
                                             config.weights_dir)
    net, lora, extra = build_network(model, config.method, len(classes), config.seed,
                                     config.rank if config.rank is not None else spec.lora_rank, config.alpha,
                                     config.targets, config.lora_preset)
    if lora is not None:  # what was set on top of the preset
        extra["lora_overrides"] = {k: getattr(config, k) for k in ("rank", "alpha", "targets")
                                   if getattr(config, k) is not None}
    net = net.to(device)
    tower = net.tower
    trainable = [p for p in net.parameters() if p.requires_grad]
    n_trainable = extra["trainable_params"]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.wd)
    scheduler = _make_scheduler(optimizer, config.schedule, config.epochs)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and config.amp == "fp16" else None
    extra.update(augmentations=asdict(Augment()) if config.augment else None,
                 augment_where=AUGMENT_WHERE,
                 optimizer="AdamW", loss="cross_entropy", selection="lowest val loss (ties keep the earlier epoch)",
                 amp_effective=config.amp if device.type == "cuda" else "none (cpu)",
                 preprocess=config.preprocess or model.default_preprocessing())

    sampler = KeySampler()
    transform = model.image_transform(extra["preprocess"])
    source, pixels_from = _pixel_source(store, config, paths, transform, pixel_cache, progress)
    dataset = AugmentedImageFiles(paths, transform, Augment() if config.augment else None, config.seed, source)
    workers = config.workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        # lancedb holds an async runtime that fork() can leave mid-operation: start workers fresh instead.
        multiprocessing_context="forkserver" if workers else None,
    )
    return _Session(store, config, run_id, checkpoint_dir(store, run_id), spec, weights_id, rows, classes, y,
                    path_index, paths, train_rows, val_rows, model, net, tower, lora, optimizer, scheduler, scaler,
                    device, loader, sampler, n_trainable, extra, pixels_from)


def _pixel_source(store: Store, config: FinetuneConfig, paths: list[str], transform, pixel_cache: bool,
                  progress: bool):
    """The pixel cache's entry for the run's preprocessing (built now when missing or out of date), and a phrase
    for the run's first line. Without ``pixel_cache``, or while another process builds the entry, the run decodes
    the image files: the tensors are the same either way."""
    from rich.console import Console

    from embedkit.data import pixels
    from embedkit.store.store import StoreBusy

    if not pixel_cache:
        return None, "pixels decoded from the image files (--no-pixel-cache)"
    recipe = transform.recipe()
    source = pixels.usable_source(store.path, config.cohort, recipe, paths)
    if source is not None:
        return source, f"pixels from the cache ({source.entry.folder})"
    console = Console(stderr=True, quiet=not progress)
    console.print(f"pixel cache: decoding the {len(paths)} images of cohort '{config.cohort}' once for every epoch "
                  f"({recipe})")
    try:
        pixels.build(store, config.cohort, paths, [transform], workers=config.workers)
    except StoreBusy as exc:
        return None, f"pixels decoded from the image files ({exc})"
    source = pixels.usable_source(store.path, config.cohort, recipe, paths)
    return source, f"pixels from the cache ({source.entry.folder}, built now)"


# ---- checkpoints ---------------------------------------------------------------------------------------------


def _atomic_save(obj, path: Path) -> None:
    # A kill mid-write leaves the previous checkpoint intact.
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def trainable_state(session: _Session) -> dict:
    """What a checkpoint keeps of the network: LoRA adapters (or the whole tower for ft) and the head, on CPU."""
    if session.lora is not None:
        tower = {n: p.detach().cpu().clone() for n, p in session.tower.named_parameters() if p.requires_grad}
    else:
        tower = {k: v.detach().cpu().clone() for k, v in session.tower.state_dict().items()}
    head = {k: v.detach().cpu().clone() for k, v in session.net.head.state_dict().items()}
    return {"tower": tower, "head": head}


def _load_trainable(session: _Session, state: dict) -> None:
    if session.lora is not None:
        expected = {n for n, p in session.tower.named_parameters() if p.requires_grad}
        if set(state["tower"]) != expected:
            raise FinetuneError(f"checkpoint of run {session.run_id} holds other LoRA tensors than this model has: "
                                f"{sorted(set(state['tower']) ^ expected)[:4]} ...")
        session.tower.load_state_dict(state["tower"], strict=False)
    else:
        session.tower.load_state_dict(state["tower"], strict=True)
    session.net.head.load_state_dict(state["head"], strict=True)


def _save_last(session: _Session) -> None:
    rng = {"torch": torch.get_rng_state()}
    if session.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(session.device)
    _atomic_save({
        "epochs_done": session.epochs_done, "best_epoch": session.best_epoch,
        "best_val_loss": session.best_val_loss, "bad_epochs": session.bad_epochs, "history": session.history,
        "state": trainable_state(session), "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "scaler": session.scaler.state_dict() if session.scaler is not None else None, "rng": rng,
    }, session.folder / "last.pt")


@contextlib.contextmanager
def _reading_checkpoint(path: Path, run_id: str):
    """Turn whatever a truncated, damaged or edited checkpoint makes torch or the restore raise into one
    CheckpointError naming the file (torch's advice to retry with weights_only=False is never passed on)."""
    try:
        yield
    except EmbedkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch's restricted unpickler and load_state_dict fail in many ways
        import pickle

        from embedkit.models.registry import file_problem

        not_one = file_problem(path)  # garbage makes the unpickler fail too: say what the file is first
        reason = ("it holds objects other than tensors and training state, which embedkit never unpickles"
                  if isinstance(exc, pickle.UnpicklingError) else f"no entry {exc}" if isinstance(exc, KeyError)
                  else "truncated, damaged or not this run's checkpoint")
        what = f"{path} {not_one}" if not_one else f"{path} cannot be read ({type(exc).__name__}: {reason})"
        raise CheckpointError(f"{what}; nothing was changed. It was altered after run {run_id} wrote it: start a "
                              f"new run (deleting {path.parent} drops this one)") from None


def _read_last(folder: Path, run_id: str) -> dict | None:
    """The training state in ``folder/last.pt`` (None when the run was killed before its first epoch ended)."""
    path = folder / "last.pt"
    if not path.exists():
        return None
    with _reading_checkpoint(path, run_id):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict):
            raise TypeError(f"a {type(saved).__name__}, not a dict")
        return saved


def _restore_last(session: _Session, saved: dict | None) -> None:
    """Continue from ``saved`` (:func:`_read_last`); None starts from the beginning."""
    if saved is None:
        return
    with _reading_checkpoint(session.folder / "last.pt", session.run_id):
        _load_trainable(session, saved["state"])
        session.optimizer.load_state_dict(saved["optimizer"])
        session.scheduler.load_state_dict(saved["scheduler"])
        if session.scaler is not None and saved["scaler"] is not None:
            session.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"]["torch"])
        if "cuda" in saved["rng"] and session.device.type == "cuda":
            torch.cuda.set_rng_state(saved["rng"]["cuda"], session.device)
        for key in ("epochs_done", "best_epoch", "best_val_loss", "bad_epochs", "history"):
            setattr(session, key, saved[key])


# ---- passes --------------------------------------------------------------------------------------------------


def _set_mode(session: _Session, training: bool) -> None:
    session.net.eval()
    # LoRA keeps the frozen tower in eval mode (BatchNorm statistics as loaded); ft trains it as a whole.
    if training and session.lora is None:
        session.tower.train()
    session.net.head.train(training)


@torch.no_grad()
def _logits(session: _Session, path_ids: list[int]) -> np.ndarray:
    """Logits [len(path_ids), C] (float32), no augmentation, eval mode."""
    _set_mode(session, training=False)
    session.sampler.keys = [(p, -1, k) for k, p in enumerate(path_ids)]
    out = np.zeros((len(path_ids), len(session.classes)), dtype=np.float32)
    with autocast_context(session.device, session.config.amp):
        for sample, pixels in session.loader:
            logits = session.net(pixels.to(session.device, non_blocking=True))
            out[sample.numpy()] = logits.float().cpu().numpy()
    return out


def _val_loss(session: _Session) -> float:
    unique = list(dict.fromkeys(session.path_index[session.val_rows].tolist()))
    logits = _logits(session, unique)
    where = {p: k for k, p in enumerate(unique)}
    rows_logits = logits[[where[p] for p in session.path_index[session.val_rows]]]
    return float(F.cross_entropy(torch.from_numpy(rows_logits), torch.from_numpy(session.y[session.val_rows])))


def _train_epoch(session: _Session, epoch: int, report: Callable[[str], None]) -> tuple[int, float, float, float]:
    """One epoch over the shuffled train rows; returns (steps, mean loss, images/s after the first batch, seconds)."""
    cfg = session.config
    torch.manual_seed(torch_seed(cfg.seed, epoch))  # dropout / stochastic depth: a function of (seed, epoch)
    _set_mode(session, training=True)
    order = epoch_order(cfg.seed, epoch, len(session.train_rows))
    rows = session.train_rows[order]
    session.sampler.keys = [(int(session.path_index[r]), epoch, k) for k, r in enumerate(rows)]
    labels_all = torch.from_numpy(session.y[rows])
    autocast = autocast_context(session.device, cfg.amp)
    n_steps = math.ceil(len(rows) / cfg.batch_size)
    start = time.perf_counter()
    losses, seen, rate = [], 0, 0.0
    first_batch_at, first_batch = start, 0
    for step, (sample, pixels) in enumerate(session.loader, start=1):
        if step == 1:
            # Images/s count from the first batch: worker start-up (seconds under forkserver) is not throughput.
            first_batch_at, first_batch = time.perf_counter(), len(sample)
        labels = labels_all[sample].to(session.device, non_blocking=True)
        loss = train_step(session.net, session.optimizer, pixels.to(session.device, non_blocking=True), labels,
                          autocast, session.scaler)
        losses.append(loss * len(sample))
        seen += len(sample)
        now = time.perf_counter()
        rate = (seen - first_batch) / (now - first_batch_at) if step > 1 else seen / (now - start)
        report(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{n_steps} loss {loss:.4f} "
               f"val loss {session.history[-1]['val_loss'] if session.history else float('nan'):.4f} "
               f"{rate:.1f} img/s")
    return n_steps, sum(losses) / max(seen, 1), rate, time.perf_counter() - start


def _run(session: _Session, progress: bool, stop_after: int | None) -> FinetuneResult:
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    cfg = session.config
    console = Console(stderr=True, quiet=not progress)
    # One live status line (epoch, step, loss, last val loss, images/s) while training; one kept line per epoch.
    live = Live(Text(""), console=console, transient=True, refresh_per_second=4) if progress else None
    report = (lambda line: live.update(Text(line))) if live is not None else (lambda line: None)
    stopped_early = False
    console.print(f"run {session.run_id}: {session.pixels_from}")
    with live or contextlib.nullcontext():
        while session.epochs_done < cfg.epochs:
            if cfg.early_stopping and session.bad_epochs >= cfg.early_stopping:
                stopped_early = True
                break
            epoch = session.epochs_done
            lr = session.optimizer.param_groups[0]["lr"]
            steps, train_loss, rate, seconds = _train_epoch(session, epoch, report)
            val_loss = _val_loss(session)
            session.scheduler.step()
            if val_loss < session.best_val_loss:  # strictly lower: ties keep the earlier epoch
                session.best_val_loss, session.best_epoch, session.bad_epochs = val_loss, epoch, 0
                _atomic_save({"epoch": epoch, "state": trainable_state(session)}, session.folder / "best.pt")
            else:
                session.bad_epochs += 1
            session.epochs_done = epoch + 1
            session.history.append(asdict(EpochStats(epoch, steps, train_loss, val_loss, lr, rate, seconds)))
            _save_last(session)
            console.print(f"epoch {epoch + 1}/{cfg.epochs} step {steps} loss {train_loss:.4f} "
                          f"val loss {val_loss:.4f} {rate:.1f} img/s"
                          + (" (best)" if session.best_epoch == epoch else ""))
            if stop_after is not None and session.epochs_done >= stop_after and session.epochs_done < cfg.epochs:
                return FinetuneResult(session.run_id, False, session.epochs_done, session.best_epoch,
                                      session.best_val_loss, session.trainable_params, history=session.history,
                                      checkpoint_dir=session.folder)
    return _finish(session, stopped_early)


def _finish(session: _Session, stopped_early: bool) -> FinetuneResult:
    """Predict every cohort row with the best epoch's weights and write the run; drop last.pt."""
    from embedkit.store.runs import code_version, predictions_table, softmax, with_summaries

    if not (session.folder / "best.pt").exists():
        raise FinetuneError(f"run {session.run_id}: the validation loss was never finite (training diverged?); "
                            f"nothing was written. Try a lower --lr, or --amp none")
    with _reading_checkpoint(session.folder / "best.pt", session.run_id):
        best = torch.load(session.folder / "best.pt", map_location="cpu", weights_only=True)
        _load_trainable(session, best["state"])
    logits = _logits(session, list(range(len(session.paths))))[session.path_index]
    probs = softmax(logits)
    metrics = dict(val_loss=session.best_val_loss, best_epoch=session.best_epoch, epochs_run=session.epochs_done,
                   stopped_early=stopped_early)
    cfg = session.config
    config = {**cfg.settings(), **session.extra_config, "classes": list(session.classes),
              "cohort_fingerprint": cohort_fingerprint(session.rows, FINGERPRINT_COLUMNS)}
    predictions = predictions_table([session.run_id], session.rows, session.y, probs)
    run = {"run_id": session.run_id, "model": session.spec.name, "weights_id": session.weights_id,
           "method": cfg.method, "cohort": cfg.cohort, "config": config, "seed": cfg.seed,
           "code_version": code_version(), "metrics": metrics, "study_id": cfg.study_id}
    stored = session.store.write_run(run, predictions)  # another id: this very run was recorded before
    (session.folder / "last.pt").unlink(missing_ok=True)  # a finished run is not resumed; best.pt stays
    metrics = with_summaries(session.store, [{"run_id": stored, "metrics": metrics}])[0]["metrics"]
    return FinetuneResult(stored, True, session.epochs_done, session.best_epoch, session.best_val_loss,
                          session.trainable_params, metrics, session.history, stopped_early, session.folder)


# ---- entry points --------------------------------------------------------------------------------------------


def finetune(store: Store, config: FinetuneConfig, progress: bool = True, stop_after: int | None = None,
             run_id: str | None = None, pixel_cache: bool = True) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.cohort`` and record the run; see the module docstring.

    ``stop_after`` stops (checkpointed, resumable) once that many epochs are done: for tests and for splitting
    long runs across sessions. ``pixel_cache``: read the images' pixels from the store's pixel cache, built on
    first use (embedkit/data/pixels.py); False decodes the files every epoch. Both feed the same tensors.
    """
    run_id = run_id or new_run_id(config.method)
    folder = checkpoint_dir(store, run_id)
    if folder.exists():
        raise FinetuneError(f"checkpoints for run '{run_id}' already exist in {folder}: use --resume {run_id}")
    session = _prepare(store, config, run_id, pixel_cache, progress)
    folder.mkdir(parents=True)
    meta = {"run_id": run_id, "config": asdict(config), "weights_id": session.weights_id,
            "augment_where": AUGMENT_WHERE,
            "classes": list(session.classes),
            "cohort_fingerprint": cohort_fingerprint(session.rows, FINGERPRINT_COLUMNS)}
    (folder / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return _run(session, progress, stop_after)


def _checkpoint_meta(store: Store, run_id: str) -> dict:
    folder = checkpoint_dir(store, run_id)
    meta_path = folder / "config.json"
    if not meta_path.is_file():
        parent = folder.parent
        known = sorted(p.name for p in parent.glob("*") if (p / "last.pt").exists()) if parent.is_dir() else []
        raise FinetuneError(f"no checkpoint of run '{run_id}' in {parent}; "
                            f"resumable runs: {', '.join(known) or 'none'}")
    if store.has("runs") and store.count("runs", sql_eq("run_id", run_id)):
        raise FinetuneError(f"run '{run_id}' has finished; its predictions are in the store")
    return json.loads(meta_path.read_text())


def resumable_config(store: Store, run_id: str) -> FinetuneConfig:
    """The settings run ``run_id`` started with; raises if it has no checkpoint or has already finished."""
    saved = _checkpoint_meta(store, run_id)["config"]
    known_fields = {f.name for f in fields(FinetuneConfig)}
    if "lora_preset" not in saved:  # started before presets: embedkit's layout, with its alpha saved
        saved = {**saved, "lora_preset": "embedkit"}
    return FinetuneConfig(**{k: v for k, v in saved.items() if k in known_fields})


def resume(store: Store, run_id: str, device: str | None = None, workers: int | None = None,
           progress: bool = True, stop_after: int | None = None, pixel_cache: bool = True) -> FinetuneResult:
    """Continue run ``run_id`` from its last completed epoch, with the settings it started with.

    Only where it runs may change (``device``, ``workers``); the weights, cohort and class order must be the
    ones it started with, else :class:`FinetuneError`.
    """
    meta = _checkpoint_meta(store, run_id)
    config = resumable_config(store, run_id)
    if device is not None:
        config.device = device
    if workers is not None:
        config.workers = workers
    last = _read_last(checkpoint_dir(store, run_id), run_id)  # a damaged file fails before the model is built
    started = meta.get("augment_where", AUGMENT_WHERE_BEFORE)
    if config.augment and started != AUGMENT_WHERE:
        raise FinetuneError(f"run '{run_id}' was started by an embedkit that augmented the {started}; this one "
                            f"augments {AUGMENT_WHERE}, so the run cannot be resumed exactly: start a new run")
    session = _prepare(store, config, run_id, pixel_cache, progress)
    for what, saved, now in (("weights", meta["weights_id"], session.weights_id),
                             ("class order", meta["classes"], list(session.classes)),
                             ("cohort rows", meta["cohort_fingerprint"],
                              cohort_fingerprint(session.rows, FINGERPRINT_COLUMNS))):
        if saved != now:
            raise FinetuneError(f"run '{run_id}' started with other {what} than are here now ({saved} vs {now}); "
                                f"it cannot be resumed exactly: start a new run")
    _restore_last(session, last)
    return _run(session, progress, stop_after)

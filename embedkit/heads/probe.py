"""Trained heads off the stored vectors: linear probe (lp), MLP head (mlp), logistic regression (logreg).

The paper's heads (docs/heads.md):
- lp:  Linear(d, hidden) -> Linear(hidden, C), no activation;
- mlp: Linear(d, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, C);
trained with AdamW on cross-entropy over the train split, mini-batches drawn from a fresh shuffle each epoch,
keeping the weights of the epoch with the lowest validation loss. ``logreg`` is multinomial logistic regression
with an L2 penalty, solved to convergence by the batched L-BFGS of :mod:`embedkit.heads.logreg`.

This module holds the single-model reference trainer (plain ``torch.nn`` + ``torch.optim.AdamW``) and what it
shares with the batched sweep trainer (:mod:`embedkit.heads.batched`): the seeded initialisation, the shuffle
order and the mini-batch boundaries. A model's generator is ``torch.Generator().manual_seed(seed)``; it draws the
initial weights first, then one ``randperm`` per epoch, so a configuration trained alone and the same
configuration trained inside a sweep see identical weights and batches.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from embedkit.constants import HEADS, MULTILABEL
from embedkit.heads import multilabel
from embedkit.heads.mitigate import GroupWeighting, Mitigation, bind, method_name
from embedkit.heads.vectors import CohortVectors, HeadsError, load_vectors
from embedkit.store.runs import record_run, softmax
from embedkit.store.store import Store

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class HeadConfig:
    """Every setting of one trained head (the paper's values as defaults)."""

    head: str = "lp"
    lr: float = 1e-4
    wd: float = 1e-5  # AdamW's decoupled weight decay (lp, mlp); the L2 penalty strength (logreg)
    epochs: int = 100
    batch_size: int = 64
    hidden: int = 1024
    max_iter: int = 100  # logreg: L-BFGS iterations (scikit-learn's default)
    tol: float = 1e-4  # logreg: stop when max |gradient| <= tol (scikit-learn's default)
    mitigate: Mitigation | None = None  # --mitigate: a group-weighted loss (embedkit.heads.mitigate)

    def __post_init__(self):
        if self.head not in HEADS:
            raise HeadsError(f"unknown head '{self.head}': use one of {', '.join(HEADS)}")
        for name in ("epochs", "batch_size", "hidden", "max_iter"):
            if getattr(self, name) < 1:
                raise HeadsError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        for name in ("lr", "wd", "tol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or (name == "lr" and value == 0):
                raise HeadsError(f"--{name} must be a {'positive' if name == 'lr' else 'non-negative'} number, "
                                 f"not {value}")
        if self.mitigate is not None and self.head == "logreg" and self.mitigate.name != "reweight":
            raise HeadsError(f"--mitigate {self.mitigate.name} needs mini-batch training (lp or mlp); logreg's "
                             "full-batch L-BFGS takes --mitigate reweight")

    @property
    def method(self) -> str:
        """The run's method: the head, ``+`` the mitigation when there is one (``lp+groupdro``)."""
        return method_name(self.head, self.mitigate)

    def settings(self) -> dict:
        """The settings that matter for this head, with the fixed choices spelled out (stored in run configs)."""
        out = self._head_settings()
        if self.mitigate is not None:
            out["mitigation"] = self.mitigate.settings()
        return out

    def _head_settings(self) -> dict:
        if self.head == "logreg":
            return {"head": "logreg", "wd": self.wd, "max_iter": self.max_iter, "tol": self.tol,
                    "objective": "mean cross-entropy + wd/2 * ||W||^2 (bias unpenalised); "
                                 "scikit-learn LogisticRegression(C=1/(wd*n_train)) solves the same problem",
                    "solver": "batched L-BFGS (history 10, Armijo backtracking), zero init",
                    "seed_effect": "none: the problem is convex and starts from zeros"}
        keys = ("head", "lr", "wd", "epochs", "batch_size", "hidden")
        out = {k: v for k, v in asdict(self).items() if k in keys}
        out.update({
            "architecture": ("Linear(d,hidden)->Linear(hidden,C)" if self.head == "lp" else
                             "Linear(d,hidden)->BatchNorm1d->ReLU->Linear(hidden,C)"),
            "optimizer": {"name": "AdamW", "betas": list(ADAM_BETAS), "eps": ADAM_EPS, "weight_decay_on": "all"},
            "loss": "cross_entropy (mean over the batch)",
            "init": "U(+-1/sqrt(fan_in)) for weights and biases (nn.Linear's), from torch.Generator(seed)",
            "shuffle": "torch.randperm(n_train) per epoch from the same generator, last partial batch kept",
            "selection": "weights of the epoch with the lowest val loss",
        })
        if self.head == "mlp":
            out["batchnorm"] = {"eps": BN_EPS, "momentum": BN_MOMENTUM}
        return out

    def with_(self, **changes) -> "HeadConfig":
        return replace(self, **changes)


# ---- what the reference and the batched trainer share ---------------------------------------------------------
@contextlib.contextmanager
def flush_denormals():
    """Treat subnormal floats as zero while training (CPU FTZ/DAZ), then restore torch's default (off).

    Once a head fits its training rows, softmax probabilities of the wrong classes fall below 1e-38; products
    with such subnormal numbers take a slow path on x86 and made late epochs ~10x slower here. Flushing them
    changes only values below 1.2e-38. Both trainers use it, so they stay comparable.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def init_head_params(head: str, dim: int, hidden: int, n_classes: int, generator: torch.Generator) -> dict:
    """Initial weights of one head, drawn from ``generator`` in a fixed order (W1, b1, W2, b2).

    Same distribution as ``nn.Linear``'s default init: uniform on +-1/sqrt(fan_in) for weights and biases.
    """

    def uniform(shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound

    params = {"W1": uniform((hidden, dim), dim), "b1": uniform((hidden,), dim),
              "W2": uniform((n_classes, hidden), hidden), "b2": uniform((n_classes,), hidden)}
    if head == "mlp":
        params.update(gamma=torch.ones(hidden), beta=torch.zeros(hidden))
    return params


def epoch_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """This epoch's shuffle of the training rows (what a shuffling DataLoader draws)."""
    return torch.randperm(n, generator=generator)


def batch_bounds(n: int, batch_size: int, head: str) -> list[tuple[int, int]]:
    """Mini-batch [start, stop) bounds over one epoch; the last partial batch is kept, except a single row for
    the MLP head (BatchNorm cannot normalise one row; torch raises on it)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if head == "mlp" and bounds and bounds[-1][1] - bounds[-1][0] == 1 and len(bounds) > 1:
        bounds.pop()
    return bounds


@dataclass
class TrainedHead:
    """The outcome of training one head: logits for every cohort row, plus what the run records."""

    logits: np.ndarray  # [N, C] float32
    extra: dict  # val loss, best epoch, iterations...


def head_module(head: str, dim: int, hidden: int, n_classes: int) -> nn.Sequential:
    """The paper's heads as one torch module: lp = Linear->Linear, mlp = Linear->BatchNorm1d->ReLU->Linear."""
    first, last = nn.Linear(dim, hidden), nn.Linear(hidden, n_classes)
    if head == "lp":
        return nn.Sequential(first, last)
    return nn.Sequential(first, nn.BatchNorm1d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM), nn.ReLU(), last)


def train_reference(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                    X_all: np.ndarray, n_classes: int, cfg: HeadConfig, seed: int,
                    weighting: GroupWeighting | None = None) -> TrainedHead:
    """Train one lp/mlp head the plain way (nn.Sequential + torch.optim.AdamW); the reference for the sweep.

    ``weighting``: the mitigation bound to the training rows (:func:`embedkit.heads.mitigate.bind`): its row order
    per epoch and its row weights on the cross-entropy."""
    generator = torch.Generator().manual_seed(int(seed))
    Xt, yt = torch.from_numpy(X_train), torch.from_numpy(y_train)
    Xv, yv = torch.from_numpy(X_val), torch.from_numpy(y_val)
    is_multilabel = y_train.ndim == 2  # [n, L] 0/1 label lists: one sigmoid per label (embedkit/heads/multilabel.py)
    model = head_module(cfg.head, Xt.shape[1], cfg.hidden, n_classes)
    params = init_head_params(cfg.head, Xt.shape[1], cfg.hidden, n_classes, generator)
    with torch.no_grad():
        first, last = model[0], model[-1]
        first.weight.copy_(params["W1"]), first.bias.copy_(params["b1"])
        last.weight.copy_(params["W2"]), last.bias.copy_(params["b2"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=cfg.wd)
    loss_fn = nn.BCEWithLogitsLoss() if is_multilabel else nn.CrossEntropyLoss()
    best_loss, best_epoch, best_state = math.inf, -1, None
    q = weighting.new_state(1) if weighting is not None else None
    with flush_denormals():
        for epoch in range(cfg.epochs):
            model.train()
            order = epoch_order(len(Xt), generator) if weighting is None else weighting.order(len(Xt), generator)
            for start, stop in batch_bounds(len(Xt), cfg.batch_size, cfg.head):
                idx = order[start:stop]
                opt.zero_grad(set_to_none=True)
                if weighting is None:
                    loss_fn(model(Xt[idx]), yt[idx]).backward()
                else:
                    ce = nn.functional.cross_entropy(model(Xt[idx]), yt[idx], reduction="none")
                    (weighting.weights(ce.detach()[None], idx[None], q)[0] * ce).sum().backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                val_loss = float(loss_fn(model(Xv), yv))
            if val_loss < best_loss:  # strictly lower: ties keep the earlier epoch
                best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(X_all)).numpy()
    extra = {"val_loss": best_loss, "best_epoch": best_epoch}
    if q is not None and weighting.name == "groupdro":
        extra["groupdro_q"] = dict(zip(weighting.group_names, [round(float(v), 6) for v in q[0]]))
    return TrainedHead(logits.astype(np.float32), extra)


def training_arrays(vectors: CohortVectors) -> tuple[np.ndarray, ...]:
    """(X_train, y_train, X_val, y_val): labelled train and val rows, in row_id order (multi-label: y is [n, L])."""
    vectors.require_splits("train", "val")
    tr, va = vectors.index("train"), vectors.index("val")
    y = vectors.Y if vectors.task == MULTILABEL else vectors.y
    return vectors.X[tr], y[tr], vectors.X[va], y[va]


def fit_head(vectors: CohortVectors, cfg: HeadConfig, seed: int) -> TrainedHead:
    """Train one head of ``cfg`` on the train split (val for selection) and score every row of the cohort."""
    X_train, y_train, X_val, y_val = training_arrays(vectors)
    n_classes = len(vectors.classes)
    if cfg.mitigate is not None and vectors.task == MULTILABEL:
        raise HeadsError(f"--mitigate {cfg.mitigate.name} is for multi-class heads; this cohort is multi-label "
                         "(run with --task multiclass, or without --mitigate)")
    weighting = bind(cfg.mitigate, vectors, vectors.index("train"), y_train)
    if cfg.head == "logreg":
        from embedkit.heads.logreg import fit_logreg

        sample_weight = None if weighting is None else weighting.row_weight.numpy()
        fit = fit_logreg(X_train, y_train, n_classes, [cfg.wd], max_iter=cfg.max_iter, tol=cfg.tol,
                         sample_weight=sample_weight)
        logits = fit.logits(vectors.X)[0]
        return TrainedHead(logits, {"iterations": int(fit.n_iter[0]), "converged": bool(fit.converged[0])})
    return train_reference(X_train, y_train, X_val, y_val, vectors.X, n_classes, cfg, seed, weighting)


def run_probe(store: Store, model: str, cfg: HeadConfig, seed: int = 77, cohort: str | None = None,
              weights_id: str | None = None, study_id: str | None = None, allow_partial: bool = False,
              task: str | None = None, threshold_rule: str = multilabel.MAX_F1, target: str | None = None) -> dict:
    """Train one head on the stored vectors and record the run and its predictions; returns the ``runs`` row.

    ``task`` (default: the cohort's) multilabel trains one sigmoid per label and records the run by the
    multi-label contract, with per-label thresholds chosen on val by ``threshold_rule`` (embedkit/heads/multilabel.py).
    ``target``: a column of the images table the head predicts instead of the label (an attribute probe,
    :mod:`embedkit.heads.attribute`; method ``<head>@<target>``), a multi-class task whatever the cohort's.
    """
    from embedkit.heads.attribute import target_method, target_vectors

    multilabel.check_task(task)
    multilabel.parse_threshold_rule(threshold_rule)  # a bad rule fails before any training
    attribute = target not in (None, "label")
    vectors = load_vectors(store, model, cohort, weights_id, allow_partial, task)
    if attribute:
        vectors = target_vectors(vectors, target)
    trained = fit_head(vectors, cfg, seed)
    trainer = "batched L-BFGS (one model)" if cfg.head == "logreg" else "reference (torch.nn + torch.optim.AdamW)"
    config = {**cfg.settings(), "trainer": trainer, "train_split": "train", "val_split": "val",
              **({"study_id": study_id} if study_id else {}),  # make_run copies it to the runs row
              **({"target": target} if attribute else {})}
    if vectors.task == MULTILABEL:
        return multilabel.record_multilabel_run(store, vectors, cfg.head, multilabel.head_settings(config), seed,
                                                trained.logits, trained.extra, threshold_rule)
    return record_run(store, vectors, target_method(cfg.method, target), config, seed, softmax(trained.logits),
                      trained.logits.argmax(axis=1), trained.extra)

"""Many lp / mlp heads trained as one batched model: stacked weights, ``bmm``, a hand-written batched AdamW.

Model k of the batch has its own learning rate and weight decay (tensors over the model axis), its own
``torch.Generator(seed_k)`` for the initial weights and for every epoch's shuffle, and its own best epoch by
validation loss. All of that follows :mod:`embedkit.heads.probe` draw for draw, so model k ends where the same
configuration trained alone by ``train_reference`` ends, up to float rounding (tests check it).

Layout: W1 [K, d, H] (stored transposed: the big products read it without a transpose), b1 [K, 1, H],
W2 [K, C, H] (as nn.Linear: its gradient is one product with a long inner dimension), b2 [K, 1, C]. The training
batch of model k is its own shuffle of the shared training rows, so the input is gathered per model ([K, b, d]);
validation and final scoring read the shared rows with one broadcast product. Gradients go to preallocated
buffers; BatchNorm runs on ATen's own kernels over a [b, K*H] view; AdamW is torch's fused CPU kernel, called
per model with that model's scalar lr and wd (or, where that kernel is missing, plain tensor ops with lr and wd
as [K, 1, 1] tensors).

Cache blocking: models never interact, so the batch is cut along the model axis into slices trained one after
the other (``models_per_slice``, by default sized so one slice's weights, gradients and AdamW moments fit
``CACHE_BUDGET_BYTES``). On the 2-core Xeon this was tuned on, slices of 1-4 models (d=512, hidden 1024) ran
~1.4x faster than 24 models at once, which stream their whole state from memory at every step. Slicing
changes no result (each model's arithmetic is the same); ``models_per_slice=None`` trains all in one slice.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from embedkit.heads.mitigate import GroupWeighting
from embedkit.heads.probe import (ADAM_BETAS, ADAM_EPS, BN_EPS, BN_MOMENTUM, batch_bounds, epoch_order,
                                  flush_denormals, init_head_params)

# A slice's working set (weights, gradients, two AdamW moments, best weights) aimed at the CPU's outer cache.
CACHE_BUDGET_BYTES = 48 * 2**20


@functools.lru_cache(maxsize=1)
def fused_adamw_available() -> bool:
    """Whether this torch has the fused CPU AdamW kernel (tried once on a one-element tensor)."""
    try:
        t = [torch.zeros(1)]
        torch._fused_adamw_(t, [torch.ones(1)], [torch.zeros(1)], [torch.zeros(1)], [], [torch.ones(())], lr=0.1,
                            beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
        return bool(torch.isfinite(t[0]).all())
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


@dataclass
class BatchedFit:
    """The outcome of training M heads at once."""

    logits: np.ndarray  # [M, N_all, C] float32, each model's best-epoch weights (eval mode) on every row
    val_loss: np.ndarray  # [M] best validation loss
    best_epoch: np.ndarray  # [M]
    flops: float  # floating-point operations of the training loop (see count_flops)
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time (on a shared machine: the time it actually ran)


def auto_slice(dim: int, hidden: int, n_classes: int, n_models: int) -> int:
    """Models per slice so that one slice's training state fits ``CACHE_BUDGET_BYTES``."""
    per_model = 6 * 4 * (dim * hidden + hidden * n_classes)  # W, grad, m, v, best W, scratch (float32)
    return int(max(1, min(n_models, CACHE_BUDGET_BYTES // per_model)))


def count_flops(head: str, dim: int, hidden: int, n_classes: int, n_train: int, n_val: int, n_all: int,
                epochs: int, batch_size: int, n_models: int) -> float:
    """FLOPs of training ``n_models`` heads: every matrix product of the forward, backward, validation and final
    scoring passes (2 per multiply-add), plus 12 per parameter per AdamW step and ~12 per hidden activation per
    row for BatchNorm + ReLU (forward and backward). Softmax and the loss (O(C) per row) are left out (< 0.1%)."""
    params = dim * hidden + hidden + hidden * n_classes + n_classes + (2 * hidden if head == "mlp" else 0)
    steps = len(batch_bounds(n_train, batch_size, head))
    rows_trained = sum(b - a for a, b in batch_bounds(n_train, batch_size, head))
    fwd_per_row = 2 * (dim * hidden + hidden * n_classes)
    # backward: dW2 and dA (2 * 2*H*C per row) and dW1 (2*d*H per row); no gradient w.r.t. the inputs
    bwd_per_row = 4 * hidden * n_classes + 2 * dim * hidden
    act_per_row = 12 * hidden if head == "mlp" else 0
    per_epoch = rows_trained * (fwd_per_row + bwd_per_row + act_per_row) + steps * 12 * params
    per_epoch += n_val * (fwd_per_row + act_per_row // 2)
    return float(n_models * (epochs * per_epoch + n_all * (fwd_per_row + act_per_row // 2)))


def _per_model(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=np.float32)).view(-1, 1, 1)


class _Slice:
    """The training state of K heads (one slice of the batch)."""

    def __init__(self, head: str, dim: int, hidden: int, n_classes: int, lrs, wds, seeds, fused: bool = True,
                 multilabel: bool = False, weighting: GroupWeighting | None = None):
        self.head, self.k = head, len(seeds)
        self.multilabel = multilabel  # one sigmoid per label and BCE (targets [K, b, L]) instead of softmax CE
        self.weighting = weighting  # --mitigate: row weights on the cross-entropy (embedkit.heads.mitigate)
        self.q = weighting.new_state(len(seeds)) if weighting is not None else None
        self.fused = fused and fused_adamw_available()
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.lr, self.wd = _per_model(lrs), _per_model(wds)
        self.lr_list, self.wd_list = [float(x) for x in lrs], [float(x) for x in wds]
        self.decay = 1 - self.lr * self.wd  # AdamW's decoupled decay factor, per model
        k = self.k
        self.W1 = torch.empty(k, dim, hidden)
        self.b1 = torch.empty(k, 1, hidden)
        self.W2 = torch.empty(k, n_classes, hidden)
        self.b2 = torch.empty(k, 1, n_classes)
        for i, g in enumerate(self.generators):  # draw for draw what probe.train_reference draws
            p = init_head_params(head, dim, hidden, n_classes, g)
            self.W1[i], self.b1[i, 0] = p["W1"].T, p["b1"]
            self.W2[i], self.b2[i, 0] = p["W2"], p["b2"]
        self.params = {"W1": self.W1, "b1": self.b1, "W2": self.W2, "b2": self.b2}
        if head == "mlp":
            self.gamma, self.beta = torch.ones(k, 1, hidden), torch.zeros(k, 1, hidden)
            self.params.update(gamma=self.gamma, beta=self.beta)
            self.run_mean, self.run_var = torch.zeros(k, 1, hidden), torch.ones(k, 1, hidden)
        self.grads = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.scratch = {} if self.fused else {n: torch.empty_like(p) for n, p in self.params.items()}
        self.best = {n: p.clone() for n, p in self.buffers().items()}
        self.best_loss = torch.full((k,), math.inf, dtype=torch.float64)
        self.best_epoch = torch.full((k,), -1, dtype=torch.int64)
        self.step_count = 0
        self.step_t = torch.zeros(())
        self._neg: dict[int, torch.Tensor] = {}
        # per-model views for the fused kernel: model i's parameters and states as lists of tensors
        names = list(self.params)
        self.views = [tuple([t[name][i] for name in names] for t in (self.params, self.grads, self.m, self.v))
                      for i in range(k)]

    def buffers(self) -> dict[str, torch.Tensor]:
        """Everything the best epoch must remember: weights, and BatchNorm's running statistics."""
        out = dict(self.params)
        if self.head == "mlp":
            out.update(run_mean=self.run_mean, run_var=self.run_var)
        return out

    # ---- one optimisation step on this slice's own mini-batches ---------------------------------------------
    def step(self, Xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """Forward, backward and AdamW for K models; ``Xb`` [K, b, d], ``yb`` [K, b]; ``idx`` [K, b] the rows'
        training indices (read by a mitigation's row weights)."""
        k, b, _ = Xb.shape
        g = self.grads
        Z = torch.baddbmm(self.b1, Xb, self.W1)  # [K, b, H]
        if self.head == "mlp":
            # BatchNorm1d in train mode for every (model, feature) column at once, with ATen's own kernels on a
            # [b, K*H] view (free for one model per slice, one copy otherwise); running statistics update in place
            hidden = Z.shape[2]
            Zc = Z.transpose(0, 1).reshape(b, k * hidden)
            A, save_mean, save_invstd = torch.native_batch_norm(
                Zc, self.gamma.view(-1), self.beta.view(-1), self.run_mean.view(-1), self.run_var.view(-1), True,
                BN_MOMENTUM, BN_EPS)
            A = A.relu_().view(b, k, hidden).transpose(0, 1)  # [K, b, H]
        else:
            A = Z
        logits = torch.baddbmm(self.b2, A, self.W2.transpose(1, 2))  # [K, b, C]
        if self.multilabel:  # d(mean BCE over b*L)/d logits = (sigmoid - y) / (b * L); no mitigation (refused)
            dlogits = torch.sigmoid(logits).sub_(yb).div_(b * logits.shape[2])
        else:
            if self.weighting is not None:
                ce = torch.logsumexp(logits, dim=2) - logits.gather(2, yb.unsqueeze(2)).squeeze(2)  # [K, b]
            dlogits = torch.softmax(logits, dim=2)  # d(mean CE)/d logits = (softmax - onehot) / b
            dlogits.scatter_add_(2, yb.unsqueeze(2), self._minus_ones(b))
            if self.weighting is None:
                dlogits.div_(b)
            else:  # d(sum_i w_i CE_i)/d logits = w_i * (softmax - onehot)
                dlogits.mul_(self.weighting.weights(ce, idx, self.q).unsqueeze(2))
        torch.bmm(dlogits.transpose(1, 2), A, out=g["W2"])
        torch.sum(dlogits, dim=1, keepdim=True, out=g["b2"])
        dA = torch.bmm(dlogits, self.W2)  # [K, b, H]
        if self.head == "mlp":
            dY = torch.ops.aten.threshold_backward(dA, A, 0)  # ReLU backward in one pass
            dZc, g_gamma, g_beta = torch.ops.aten.native_batch_norm_backward(
                dY.transpose(0, 1).reshape(b, k * hidden), Zc, self.gamma.view(-1), self.run_mean.view(-1),
                self.run_var.view(-1), save_mean, save_invstd, True, BN_EPS, [True, True, True])
            g["gamma"].view(-1).copy_(g_gamma)
            g["beta"].view(-1).copy_(g_beta)
            dZ = dZc.view(b, k, hidden).transpose(0, 1)
        else:
            dZ = dA
        torch.sum(dZ, dim=1, keepdim=True, out=g["b1"])
        torch.bmm(Xb.transpose(1, 2), dZ, out=g["W1"])
        self._adamw()

    def _minus_ones(self, b: int) -> torch.Tensor:
        if b not in self._neg:
            self._neg[b] = torch.full((self.k, b, 1), -1.0)
        return self._neg[b]

    def _adamw(self) -> None:
        """torch.optim.AdamW's update (decoupled weight decay) for K models at once, lr and wd per model."""
        self.step_count += 1
        if self.fused:
            self._adamw_fused()
        else:
            self._adamw_eager()

    def _adamw_fused(self) -> None:
        """One pass over each model's weights, gradients and moments (torch's fused AdamW kernel, the one behind
        ``torch.optim.AdamW(fused=True)``), called per model with that model's scalar lr and wd."""
        self.step_t.fill_(self.step_count)
        beta1, beta2 = ADAM_BETAS
        for i, (params, grads, ms, vs) in enumerate(self.views):
            torch._fused_adamw_(params, grads, ms, vs, [], [self.step_t] * len(params), lr=self.lr_list[i],
                                beta1=beta1, beta2=beta2, weight_decay=self.wd_list[i], eps=ADAM_EPS,
                                amsgrad=False, maximize=False)

    def _adamw_eager(self) -> None:
        """The same update with plain tensor ops (lr and wd as [K, 1, 1] tensors); several passes over memory."""
        beta1, beta2 = ADAM_BETAS
        bc1 = 1 - beta1**self.step_count
        bc2_sqrt = math.sqrt(1 - beta2**self.step_count)
        step_size = self.lr / bc1
        for name, p in self.params.items():
            grad, m, v, s = self.grads[name], self.m[name], self.v[name], self.scratch[name]
            p.mul_(self.decay)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            torch.sqrt(v, out=s).div_(bc2_sqrt).add_(ADAM_EPS)
            torch.div(m, s, out=s)
            p.addcmul_(s, step_size, value=-1)

    # ---- evaluation -------------------------------------------------------------------------------------------
    def forward_eval(self, X: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [K, n, C] of the shared rows ``X`` [n, d] in eval mode (BatchNorm on running statistics)."""
        w = weights or self.buffers()
        Z = torch.matmul(X, w["W1"]).add_(w["b1"])  # X broadcast over the model axis
        if self.head == "mlp":
            Z = torch.relu((Z - w["run_mean"]) * torch.rsqrt(w["run_var"] + BN_EPS) * w["gamma"] + w["beta"])
        return torch.baddbmm(w["b2"], Z, w["W2"].transpose(1, 2))

    def validate(self, X_val: torch.Tensor, y_val: torch.Tensor, epoch: int) -> None:
        """Validation loss per model; models that strictly improved keep this epoch's weights."""
        logits = self.forward_eval(X_val)
        if self.multilabel:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y_val.expand_as(logits), reduction="none").flatten(1).mean(dim=1).double()
        else:
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[2]), y_val.repeat(self.k), reduction="none"
            ).view(self.k, -1).mean(dim=1).double()
        better = loss < self.best_loss
        if bool(better.any()):
            idx = better.nonzero().squeeze(1)
            for name, t in self.buffers().items():
                self.best[name][idx] = t[idx]
            self.best_loss[idx] = loss[idx]
            self.best_epoch[idx] = epoch


def train_batched(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                  X_all: np.ndarray, n_classes: int, head: str, hidden: int, epochs: int, batch_size: int,
                  lrs: Sequence[float], wds: Sequence[float], seeds: Sequence[int],
                  models_per_slice: int | str | None = "auto", fused: bool = True,
                  progress: Callable[[int], None] | None = None,
                  weighting: GroupWeighting | None = None) -> BatchedFit:
    """Train ``len(seeds)`` heads (model k: lrs[k], wds[k], seeds[k]) as one batched model; see module docstring.

    ``fused``: AdamW through torch's fused kernel (one pass over memory) when available, else plain tensor ops.
    ``y_train``/``y_val`` of shape [n, L] (0/1 label lists) train one sigmoid per label with BCE (multi-label).
    ``progress(n)`` is called with the number of model-epochs just completed. ``weighting``: a mitigation bound to
    the training rows (:func:`embedkit.heads.mitigate.bind`), the same one the reference trainer takes (multi-class
    only).
    """
    if head not in ("lp", "mlp"):
        raise ValueError(f"train_batched trains lp and mlp heads, not '{head}'")
    n_models = len(seeds)
    if not (len(lrs) == len(wds) == n_models):
        raise ValueError("lrs, wds and seeds must have one entry per model")
    start, cpu_start = time.perf_counter(), time.process_time()
    multilabel = np.ndim(y_train) == 2
    target_type = np.float32 if multilabel else np.int64
    Xt = torch.from_numpy(np.ascontiguousarray(X_train, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y_train, dtype=target_type))
    Xv = torch.from_numpy(np.ascontiguousarray(X_val, dtype=np.float32))
    yv = torch.from_numpy(np.ascontiguousarray(y_val, dtype=target_type))
    Xa = torch.from_numpy(np.ascontiguousarray(X_all, dtype=np.float32))
    n, dim = Xt.shape
    if models_per_slice == "auto":
        models_per_slice = auto_slice(dim, hidden, n_classes, n_models)
    per_slice = n_models if not models_per_slice else int(models_per_slice)
    bounds = batch_bounds(n, batch_size, head)
    logits = np.empty((n_models, len(Xa), n_classes), dtype=np.float32)
    val_loss = np.empty(n_models)
    best_epoch = np.empty(n_models, dtype=np.int64)
    for lo in range(0, n_models, per_slice):
        hi = min(lo + per_slice, n_models)
        sl = _Slice(head, dim, hidden, n_classes, lrs[lo:hi], wds[lo:hi], seeds[lo:hi], fused, multilabel, weighting)
        draw = epoch_order if weighting is None else weighting.order
        with torch.no_grad(), flush_denormals():
            for epoch in range(epochs):
                order = torch.stack([draw(n, g) for g in sl.generators])  # [K, n]: one shuffle per model
                for a, b in bounds:
                    idx = order[:, a:b].reshape(-1)
                    sl.step(Xt.index_select(0, idx).view(hi - lo, b - a, dim),
                            yt[idx].view(hi - lo, b - a, *yt.shape[1:]), order[:, a:b])
                sl.validate(Xv, yv, epoch)
                if progress:
                    progress(hi - lo)
            logits[lo:hi] = sl.forward_eval(Xa, sl.best).numpy()
        val_loss[lo:hi] = sl.best_loss.numpy()
        best_epoch[lo:hi] = sl.best_epoch.numpy()
    flops = count_flops(head, dim, hidden, n_classes, n, len(Xv), len(Xa), epochs, batch_size, n_models)
    return BatchedFit(logits, val_loss, best_epoch, flops, time.perf_counter() - start,
                      time.process_time() - cpu_start)

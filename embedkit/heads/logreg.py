"""Multinomial logistic regression for many L2 strengths at once: one batched L-BFGS.

Problem per model m (all share X and y):  min_W  mean_i CE(x_i W + b, y_i) + wd_m / 2 * ||W||^2  (b unpenalised),
the objective scikit-learn's ``LogisticRegression(C=1/(wd_m * n))`` minimises. Because every model reads the
same X, the logits of all models are ONE matrix product X[n, d+1] @ Theta[d+1, M*C], and so is the gradient;
the L-BFGS two-loop recursion and the Armijo backtracking line search run elementwise over the model axis,
each model keeping its own history, step length and convergence flag. Converged models stop moving (and stop
costing line-search evaluations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HISTORY = 10  # L-BFGS memory (scikit-learn / scipy default)
ARMIJO_C1 = 1e-4
MAX_HALVINGS = 20


@dataclass
class LogregFit:
    """Fitted weights of M models: ``theta`` [M, d+1, C] (last row = bias), per-model iteration counts."""

    theta: torch.Tensor
    n_iter: np.ndarray
    converged: np.ndarray
    loss: np.ndarray
    evaluations: int  # model-evaluations of the objective (for FLOP counts)

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Logits [M, N, C] of every model on rows ``X`` [N, d]."""
        m, d1, c = self.theta.shape
        Xa = _augment(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))
        out = (Xa @ self.theta.permute(1, 0, 2).reshape(d1, m * c)).reshape(len(Xa), m, c)
        return out.permute(1, 0, 2).contiguous().numpy()


def _augment(X: torch.Tensor) -> torch.Tensor:
    return torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)


def _dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-model inner products of [M, d+1, C] tensors -> [M], as float64 for the line-search arithmetic."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1)).double()


def _per_model(v: torch.Tensor) -> torch.Tensor:
    """[M] -> [M, 1, 1] (float32), to scale each model's block."""
    return v.float().view(-1, 1, 1)


class _Objective:
    """Loss and gradient of any subset of the models, evaluated with two matrix products."""

    def __init__(self, X: np.ndarray, y: np.ndarray, n_classes: int, l2: torch.Tensor,
                 sample_weight: np.ndarray | None = None):
        self.Xa = _augment(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))
        self.XaT = self.Xa.T.contiguous()
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.n, self.d1 = self.Xa.shape
        self.c = n_classes
        self.onehot = torch.nn.functional.one_hot(self.y, n_classes).to(torch.float32)
        self.l2 = l2
        # --mitigate reweight: row weights (mean 1) on the cross-entropy; None keeps the plain mean
        self.w = None if sample_weight is None else torch.from_numpy(np.asarray(sample_weight, dtype=np.float32))
        self.evaluations = 0  # model-evaluations, for FLOP counting

    def __call__(self, theta: torch.Tensor, models: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = theta.shape[0]
        self.evaluations += k
        # all models' logits in one product: X [n, d+1] @ Theta [d+1, k*C]
        flat = theta.permute(1, 0, 2).reshape(self.d1, k * self.c)
        logits = (self.Xa @ flat).reshape(self.n, k, self.c)
        logits64 = logits.double()  # the loss in float64: Armijo compares tiny decreases near the optimum
        lse = torch.logsumexp(logits64, dim=2)
        picked = logits64.gather(2, self.y.view(-1, 1, 1).expand(-1, k, 1)).squeeze(2)
        l2 = self.l2[models]
        body = theta[:, :-1]
        ce = lse - picked
        if self.w is not None:
            ce = ce * self.w.double().view(-1, 1)
        loss = ce.mean(dim=0) + 0.5 * l2.double() * _dots(body, body)
        resid = (torch.exp(logits64 - lse.unsqueeze(2)).float() - self.onehot.unsqueeze(1)) / self.n
        if self.w is not None:
            resid = resid * self.w.view(-1, 1, 1)
        grad = (self.XaT @ resid.reshape(self.n, k * self.c)).reshape(self.d1, k, self.c).permute(1, 0, 2)
        grad = grad.contiguous()
        grad[:, :-1] += _per_model(l2) * body
        return loss, grad


class _MultilabelObjective(_Objective):
    """Binary logistic regressions, one per (L2 strength, label): model k fits label ``k % L`` of ``y`` [n, L]
    (0/1) with strength ``l2[k]``: mean_i BCE(x_i w + b, y_il) + wd/2 * ||w||^2, scikit-learn's binary
    ``LogisticRegression(C=1/(wd*n))``. Each label is a model of its own, with its own history, step and stop."""

    def __init__(self, X: np.ndarray, y: np.ndarray, n_classes: int, l2: torch.Tensor):
        self.Xa = _augment(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))
        self.XaT = self.Xa.T.contiguous()
        self.targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))  # [n, L]
        self.n, self.d1 = self.Xa.shape
        self.n_labels = n_classes
        self.c = 1  # one logit per model
        self.l2 = l2
        self.evaluations = 0

    def __call__(self, theta: torch.Tensor, models: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = theta.shape[0]
        self.evaluations += k
        logits64 = (self.Xa @ theta[:, :, 0].T).double()  # [n, k]
        y = self.targets[:, models % self.n_labels]
        l2 = self.l2[models]
        body = theta[:, :-1]
        # BCE with logits: softplus(z) - y z, averaged over rows
        loss = (torch.nn.functional.softplus(logits64) - y * logits64).mean(dim=0)
        loss = loss + 0.5 * l2.double() * _dots(body, body)
        resid = (torch.sigmoid(logits64) - y).float() / self.n
        grad = (self.XaT @ resid).T.unsqueeze(2).contiguous()  # [k, d+1, 1]
        grad[:, :-1] += _per_model(l2) * body
        return loss, grad


def fit_logreg(X: np.ndarray, y: np.ndarray, n_classes: int, l2, max_iter: int = 100, tol: float = 1e-4,
               history: int = HISTORY, sample_weight: np.ndarray | None = None) -> LogregFit:
    """Fit one multinomial logistic regression per entry of ``l2`` (L2 strengths), all at once; ``y`` [n, L] of 0/1
    label lists fits one binary logistic regression per label instead (multi-label).

    ``sample_weight`` [n] (mean 1): the cross-entropy of row i counts ``sample_weight[i]`` times (--mitigate
    reweight; multi-class only); None: the plain mean."""
    from embedkit.heads.probe import flush_denormals  # tiny probabilities must not take the slow subnormal path

    with flush_denormals():
        if np.ndim(y) == 2:
            if sample_weight is not None:
                raise ValueError("row weights (--mitigate) are for multi-class logreg only")
            return _fit_multilabel(X, y, l2, max_iter, tol, history)
        return _lbfgs(X, y, n_classes, l2, max_iter, tol, history, sample_weight=sample_weight)


def _fit_multilabel(X: np.ndarray, Y: np.ndarray, l2, max_iter: int, tol: float, history: int) -> LogregFit:
    """Every (strength, label) as one binary model of the batched L-BFGS, then the labels regrouped per strength:
    theta [M, d+1, L]; a strength's iterations are its slowest label's, converged when every label is."""
    n_labels = Y.shape[1]
    strengths = np.repeat(np.asarray(l2, dtype=np.float32), n_labels)  # model k: strength k // L, label k % L
    fit = _lbfgs(X, Y, n_labels, strengths, max_iter, tol, history, _MultilabelObjective)
    m = len(strengths) // n_labels
    theta = fit.theta[:, :, 0].reshape(m, n_labels, -1).permute(0, 2, 1).contiguous()
    return LogregFit(theta, fit.n_iter.reshape(m, n_labels).max(axis=1),
                     fit.converged.reshape(m, n_labels).all(axis=1), fit.loss.reshape(m, n_labels).sum(axis=1),
                     -(-fit.evaluations // n_labels))  # in evaluations of all L labels, as logreg_flops counts


def _lbfgs(X: np.ndarray, y: np.ndarray, n_classes: int, l2, max_iter: int, tol: float,
           history: int, objective: type[_Objective] = _Objective,
           sample_weight: np.ndarray | None = None) -> LogregFit:
    l2 = torch.as_tensor(np.asarray(l2, dtype=np.float32))
    m = len(l2)
    obj = objective(X, y, n_classes, l2) if sample_weight is None else objective(X, y, n_classes, l2, sample_weight)
    d1, c = obj.d1, obj.c
    theta = torch.zeros(m, d1, c)
    everyone = torch.arange(m)
    loss, grad = obj(theta, everyone)
    S = torch.zeros(history, m, d1, c)
    Yh = torch.zeros(history, m, d1, c)
    rho = torch.zeros(history, m, dtype=torch.float64)
    gamma = torch.ones(m, dtype=torch.float64)
    has_pair = torch.zeros(m, dtype=torch.bool)
    done = torch.zeros(m, dtype=torch.bool)
    converged = torch.zeros(m, dtype=torch.bool)
    n_iter = torch.zeros(m, dtype=torch.int64)
    slots: list[int] = []  # ring buffer positions, oldest first
    for it in range(max_iter):
        small = grad.abs().amax(dim=(1, 2)) <= tol
        converged |= small & ~done
        done |= small
        if bool(done.all()):
            break
        # two-loop recursion for every model at once (models without pairs get -gamma * grad = -grad)
        q = grad.clone()
        alphas = {}
        for j in reversed(slots):
            alphas[j] = rho[j] * _dots(S[j], q)
            q.addcmul_(Yh[j], _per_model(alphas[j]), value=-1)
        direction = q.mul_(_per_model(gamma))
        for j in slots:
            beta = rho[j] * _dots(Yh[j], direction)
            direction.addcmul_(S[j], _per_model(alphas[j] - beta))
        direction.neg_()
        slope = _dots(grad, direction)
        uphill = slope >= 0  # a broken curvature history: restart that model from steepest descent
        if bool(uphill.any()):
            direction[uphill] = -grad[uphill]
            slope[uphill] = -_dots(grad[uphill], grad[uphill])
            rho[:, uphill] = 0
            gamma[uphill] = 1
            has_pair[uphill] = False
        gnorm = _dots(grad, grad).sqrt()
        step = torch.where(has_pair, torch.ones_like(gnorm), torch.clamp(1.0 / gnorm, max=1.0))
        # batched backtracking (Armijo): only models still searching are re-evaluated
        new_theta, new_loss, new_grad = theta.clone(), loss.clone(), grad.clone()
        moved = torch.zeros(m, dtype=torch.bool)
        pending = everyone[~done]
        for _ in range(MAX_HALVINGS):
            if len(pending) == 0:
                break
            cand = theta[pending] + _per_model(step[pending]) * direction[pending]
            c_loss, c_grad = obj(cand, pending)
            ok = c_loss <= loss[pending] + ARMIJO_C1 * step[pending] * slope[pending]
            took = pending[ok]
            new_theta[took], new_loss[took], new_grad[took] = cand[ok], c_loss[ok], c_grad[ok]
            moved[took] = True
            pending = pending[~ok]
            step[pending] *= 0.5
        done[pending] = True  # no decrease found at float precision: as far as this model goes
        s = new_theta - theta
        yv = new_grad - grad
        sy, yy = _dots(s, yv), _dots(yv, yv)
        good = moved & (sy > 1e-10 * yy.clamp(min=1e-30))  # keep only pairs with positive curvature
        slot = it % history
        if slot in slots:
            slots.remove(slot)
        slots.append(slot)
        S[slot], Yh[slot] = s, yv
        rho[slot] = torch.where(good, 1.0 / sy.clamp(min=1e-30), torch.zeros_like(sy))
        gamma = torch.where(good, sy / yy.clamp(min=1e-30), gamma)
        has_pair |= good
        theta, loss, grad = new_theta, new_loss, new_grad
        n_iter += moved.long()
    converged |= grad.abs().amax(dim=(1, 2)) <= tol
    return LogregFit(theta, n_iter.numpy(), converged.numpy(), loss.numpy(), obj.evaluations)


def logreg_flops(n: int, dim: int, n_classes: int, evaluations: int) -> float:
    """FLOPs of the objective evaluations: two (n x (d+1) x C) products per model-evaluation."""
    return 4.0 * n * (dim + 1) * n_classes * evaluations

"""In-processing bias mitigation for the trained heads: group-weighted losses, shared by every trainer.

``--mitigate NAME[:k=v,...]`` on `embedkit probe` and `embedkit sweep` (docs/mitigation.md). Groups are the values
of ``--mitigate-by`` (default the age group x sex cell, ``age_group_sex``) on the training rows; a row without one
is its own group ``?``. Each method is a per-row weight on the cross-entropy of a mini-batch, so the single
reference trainer (:mod:`embedkit.heads.probe`), the batched sweep trainer (:mod:`embedkit.heads.batched`) and
logistic regression (:mod:`embedkit.heads.logreg`) all read the same numbers from here:

- ``reweight``: row i weighs ``w_i = 1 / n(g_i, y_i)`` (its group x class cell's training count), scaled to mean
  1 over the training rows; batch loss ``sum_i w_i CE_i / b``.
- ``resample``: every epoch draws n_train rows with replacement, row i with probability proportional to the same
  ``1 / n(g_i, y_i)``, from the head's own seeded generator (in place of the shuffle); plain mean loss.
- ``groupdro`` (Sagawa et al. 2020, Algorithm 1): online group weights ``q`` (uniform at start, kept across
  batches and epochs); per batch ``q_g <- q_g * exp(eta * loss_g)`` over the groups present, normalised, then
  loss ``sum_g q_g loss_g`` (``loss_g``: the mean CE of the batch's rows of group g). Param ``eta`` (0.01).
- ``gap-penalty``: ``mean CE + lam * (max_g loss_g - min_g loss_g)`` over the groups present in the batch
  (the first group wins ties). Param ``lam`` (1.0).

The weights are constants of the step (q is not differentiated; max/min select groups), so each loss's gradient
with respect to the logits is ``w_i * (softmax_i - onehot_i)`` with the row weights :meth:`GroupWeighting.weights`
returns: one formula for every trainer. Validation loss (best-epoch selection) stays the plain mean CE.
A multi-label head can reuse the same row weights on its per-row loss (sum over labels of the BCE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from embedkit.heads.vectors import HeadsError

MITIGATIONS: tuple[str, ...] = ("reweight", "resample", "groupdro", "gap-penalty")
MITIGATE_BY: tuple[str, ...] = ("sex", "age_group", "age_group_sex")
PARAMS: dict[str, dict[str, float]] = {"reweight": {}, "resample": {}, "groupdro": {"eta": 0.01},
                                       "gap-penalty": {"lam": 1.0}}
BATCH_ONLY = ("groupdro", "gap-penalty")  # online, per mini-batch: no full-batch L-BFGS form
MISSING_GROUP = "?"


@dataclass(frozen=True)
class Mitigation:
    """A parsed ``--mitigate NAME[:k=v,...]`` with its grouping (``--mitigate-by``)."""

    name: str
    by: str = "age_group_sex"
    params: tuple[tuple[str, float], ...] = field(default=())

    @classmethod
    def parse(cls, text: str, by: str = "age_group_sex") -> "Mitigation":
        """``"groupdro:eta=0.05"`` -> Mitigation("groupdro", by, (("eta", 0.05),)); defaults filled in."""
        name, _, rest = text.strip().partition(":")
        if name not in MITIGATIONS:
            raise HeadsError(f"unknown --mitigate '{name}': use one of {', '.join(MITIGATIONS)} "
                             "(e.g. --mitigate groupdro:eta=0.01)")
        by = by.replace("*", "_").strip()
        if by not in MITIGATE_BY:
            raise HeadsError(f"--mitigate-by '{by}' is not one of {', '.join(MITIGATE_BY)}")
        params = dict(PARAMS[name])
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in params:
                allowed = ", ".join(PARAMS[name]) or "none"
                raise HeadsError(f"bad --mitigate parameter '{part}' for {name}: parameters: {allowed}")
            try:
                params[key] = float(value)
            except ValueError:
                raise HeadsError(f"--mitigate {name}: '{key}' must be a number, not '{value}'") from None
            if not np.isfinite(params[key]) or params[key] < 0:
                raise HeadsError(f"--mitigate {name}: '{key}' must be a non-negative number, not {value}")
        return cls(name, by, tuple(sorted(params.items())))

    @property
    def param(self) -> dict[str, float]:
        return dict(self.params)

    def settings(self) -> dict:
        """What a run's config records (``mitigation``)."""
        return {"name": self.name, "by": self.by, "params": self.param,
                "groups": "values of " + self.by + " on the training rows (missing: its own group)"}

    def __str__(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v:g}" for k, v in self.params) if self.params else "")


def method_name(head: str, mitigation: Mitigation | None) -> str:
    """The run's method: the head, plus the mitigation when there is one (``lp+groupdro``)."""
    return head if mitigation is None else f"{head}+{mitigation.name}"


def group_codes(keys: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Group keys (None: missing) -> int codes [n] and the group names in code order (sorted)."""
    names = sorted({MISSING_GROUP if k is None else str(k) for k in keys})
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[MISSING_GROUP if k is None else str(k)] for k in keys], dtype=np.int64), names


def cell_weights(groups: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``1 / n(group, class)`` per row, scaled to mean 1 (float64)."""
    cells = groups.astype(np.int64) * (int(y.max()) + 1) + y.astype(np.int64)
    _, inverse, counts = np.unique(cells, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    return w / w.mean()


class GroupWeighting:
    """A mitigation bound to one training set: the rows' groups, and what each trainer asks of it."""

    def __init__(self, mitigation: Mitigation, groups: np.ndarray, y: np.ndarray, group_names: list[str]):
        self.mitigation, self.name, self.group_names = mitigation, mitigation.name, list(group_names)
        self.n_groups = len(group_names)
        self.groups = torch.from_numpy(np.asarray(groups, dtype=np.int64))
        w = cell_weights(np.asarray(groups), np.asarray(y))
        self.row_weight = torch.from_numpy(w.astype(np.float32))  # reweight
        self.sample_p = torch.from_numpy(w)  # resample: multinomial normalises
        self.param = mitigation.param

    def order(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """This epoch's rows: the shuffle (torch.randperm), or for ``resample`` a group-balanced draw with
        replacement, both from the head's own generator."""
        if self.name == "resample":
            return torch.multinomial(self.sample_p, n, replacement=True, generator=generator)
        return torch.randperm(n, generator=generator)

    def new_state(self, n_models: int) -> torch.Tensor:
        """GroupDRO's q per model [K, G] (float64, uniform); unused by the other methods."""
        return torch.full((n_models, self.n_groups), 1.0 / self.n_groups, dtype=torch.float64)

    def weights(self, ce: torch.Tensor, idx: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """Row weights [K, b] of a batch: ``ce`` [K, b] the rows' cross-entropies (detached), ``idx`` [K, b] their
        training-row indices, ``q`` [K, G] GroupDRO's state (updated in place). The batch loss is
        ``sum_i w_i * ce_i`` and its gradient ``sum_i w_i * grad ce_i``."""
        k, b = ce.shape
        if self.name == "resample":
            return torch.full((k, b), 1.0 / b)
        if self.name == "reweight":
            return self.row_weight[idx] / b
        g = self.groups[idx]  # [K, b]
        ce64 = ce.double()
        sums = torch.zeros(k, self.n_groups, dtype=torch.float64).scatter_add_(1, g, ce64)
        counts = torch.zeros(k, self.n_groups, dtype=torch.float64).scatter_add_(1, g, torch.ones_like(ce64))
        present = counts > 0
        loss_g = sums / counts.clamp(min=1)  # 0 where absent
        if self.name == "groupdro":
            q.mul_(torch.exp(self.param["eta"] * loss_g))  # absent groups: exp(0) = 1
            q.div_(q.sum(dim=1, keepdim=True))
            per_group = q / counts.clamp(min=1)
            return per_group.gather(1, g).float()
        # gap-penalty: mean CE + lam * (loss of the worst present group - loss of the best present group)
        lam = self.param["lam"]
        worst = torch.where(present, loss_g, torch.full_like(loss_g, -np.inf)).argmax(dim=1)
        best = torch.where(present, loss_g, torch.full_like(loss_g, np.inf)).argmin(dim=1)
        extra = torch.zeros(k, self.n_groups, dtype=torch.float64)
        rows = torch.arange(k)
        extra[rows, worst] += lam / counts[rows, worst]
        extra[rows, best] -= lam / counts[rows, best]
        return (1.0 / b + extra.gather(1, g)).float()

    def batch_loss(self, ce: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The objective the weights stand for (what a trainer reports; the gradient is ``w``'s)."""
        return (w * ce).sum(dim=-1)


def bind(mitigation: Mitigation | None, vectors, rows: np.ndarray, y: np.ndarray) -> GroupWeighting | None:
    """The mitigation bound to the training rows ``rows`` (positions in ``vectors``) with labels ``y``."""
    if mitigation is None:
        return None
    from embedkit.fairness.attributes import columns_of

    keys = vectors.groups(columns_of(mitigation.by))[rows]
    codes, names = group_codes(keys)
    return GroupWeighting(mitigation, codes, y, names)

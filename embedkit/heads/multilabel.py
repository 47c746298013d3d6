"""Multi-label heads: one sigmoid per label, thresholds chosen on validation, the runs' contract (docs/multilabel.md).

A multi-label run (``task = "multilabel"``; a cohort is multi-label when a row lists several labels,
:func:`embedkit.data.cohort.cohort_task`, or when ``--task multilabel`` says so) scores every label of
``classes`` (:func:`embedkit.data.cohort.cohort_labels`: the labels alphabetically, "No Finding" last) with its own
probability. Its ``predictions`` rows hold ``probs`` = one sigmoid score per class in class order and
``y_true = y_pred = NULL`` (the truth is ``images.labels``); its config holds ``thresholds`` (one per class, a row
is predicted positive for class c when ``probs[c] >= thresholds[c]``) and the ``threshold_rule`` that chose them on
the validation split alone (:func:`choose_thresholds`, the one place thresholds are chosen).
"""

from __future__ import annotations

import re

import numpy as np

from embedkit.constants import MULTILABEL, TASKS
from embedkit.heads.vectors import CohortVectors, HeadsError
from embedkit.store.runs import record_run
from embedkit.store.store import Store

MAX_F1 = "max_f1"
THRESHOLD_RULES = f"{MAX_F1} or fpr@X (e.g. fpr@0.1: the lowest threshold whose val FPR is at most X)"
NO_POSITIVES_THRESHOLD = 1.0  # max_f1 on a label without val positives: predict positive only at a score of 1


def check_task(task: str | None) -> str | None:
    """``task`` as given (None: the cohort decides), refusing names other than :data:`TASKS`."""
    if task is not None and task not in TASKS:
        raise HeadsError(f"unknown --task '{task}': use one of {', '.join(TASKS)} (default: the cohort's)")
    return task


def parse_threshold_rule(rule: str) -> tuple[str, float | None]:
    """``max_f1`` -> ("max_f1", None); ``fpr@0.1`` -> ("fpr", 0.1); anything else raises HeadsError."""
    text = (rule or "").replace(" ", "")
    if text == MAX_F1:
        return MAX_F1, None
    m = re.fullmatch(r"fpr@([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)", text)
    if m and 0 <= float(m.group(1)) <= 1:
        return "fpr", float(m.group(1))
    raise HeadsError(f"bad --threshold-rule '{rule}': use {THRESHOLD_RULES}, with X in [0, 1]")


def sigmoid(scores: np.ndarray) -> np.ndarray:
    """Elementwise logistic function in float64 (stable for large |x|), returned as float32 like ``probs``."""
    z = np.asarray(scores, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out.astype(np.float32)


def _threshold_one(scores: np.ndarray, truth: np.ndarray, kind: str, target: float | None) -> float:
    """One label's threshold from its val scores and 0/1 truth (see :func:`choose_thresholds`)."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order].astype(np.float64), truth[order].astype(bool)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last row of each run of equal scores
    tp, fp = np.cumsum(t)[last], np.cumsum(~t)[last]  # predicting positive at score >= s[last]
    candidates = s[last]
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if kind == MAX_F1:
        if n_pos == 0:
            return NO_POSITIVES_THRESHOLD
        f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
        return float(candidates[int(np.argmax(f1))])  # ties: the highest threshold (fewest positive calls)
    if n_neg == 0:
        return float(candidates[-1])
    ok = np.flatnonzero(fp / n_neg <= target + 1e-12)
    # the lowest threshold that keeps the val FPR within the target; none does: above every score
    return float(candidates[ok[-1]]) if len(ok) else float(np.nextafter(candidates[0], np.inf))


def choose_thresholds(probs_val: np.ndarray, truth_val: np.ndarray, rule: str = MAX_F1) -> list[float]:
    """Per-label thresholds from VALIDATION rows only: ``probs_val`` [n, L] scores, ``truth_val`` [n, L] 0/1.

    A row is called positive for label l when ``probs[l] >= thresholds[l]``; candidates are the distinct val scores.
    - ``max_f1``: the candidate maximising F1 = 2TP / (2TP + FP + FN) on val (ties: the highest); a label without
      val positives gets :data:`NO_POSITIVES_THRESHOLD`.
    - ``fpr@X``: the lowest candidate whose val FPR = FP / (FP + TN) is at most X (the most sensitive threshold
      meeting the target); a label without val negatives gets its lowest val score.
    The caller hands over val rows and nothing else: the test split cannot move a threshold.
    """
    kind, target = parse_threshold_rule(rule)
    probs_val, truth_val = np.asarray(probs_val), np.asarray(truth_val)
    if probs_val.ndim != 2 or probs_val.shape != truth_val.shape or len(probs_val) == 0:
        raise HeadsError(f"thresholds need val scores and truth of one shape [rows, labels] with rows; got "
                         f"{probs_val.shape} and {truth_val.shape}")
    return [_threshold_one(probs_val[:, c], truth_val[:, c], kind, target) for c in range(probs_val.shape[1])]


def label_auc(scores: np.ndarray, truth: np.ndarray) -> list[float | None]:
    """ROC AUC per label (the Mann-Whitney statistic, ties counted half); None where a label lacks positives or
    negatives. ``scores``, ``truth``: [n, L]."""
    from scipy.stats import rankdata

    out: list[float | None] = []
    for c in range(scores.shape[1]):
        t = truth[:, c].astype(bool)
        n_pos, n_neg = int(t.sum()), int((~t).sum())
        if n_pos == 0 or n_neg == 0:
            out.append(None)
            continue
        ranks = rankdata(scores[:, c].astype(np.float64))
        out.append(float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)))
    return out


def bce_loss(probs: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean binary cross-entropy over rows and labels; ``probs`` [..., n, L] -> [...] (float64)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-7)
    y = np.asarray(truth, dtype=np.float64)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p)).mean(axis=(-2, -1))


def multilabel_config(vectors: CohortVectors, probs: np.ndarray, rule: str) -> dict:
    """The contract's config keys of a multi-label run: task, thresholds (chosen on val) and their rule."""
    va = vectors.index("val")
    if len(va) == 0:
        raise HeadsError(f"cohort '{vectors.cohort}' has no val rows: multi-label thresholds are chosen on val "
                         "(never on test); give the cohort a val split")
    parse_threshold_rule(rule)
    return {"task": MULTILABEL, "thresholds": choose_thresholds(probs[va], vectors.Y[va], rule),
            "threshold_rule": rule.replace(" ", ""), "threshold_split": "val",
            "threshold_call": "positive when probs[c] >= thresholds[c]",
            "probabilities": "sigmoid of each label's logit"}


def head_settings(settings: dict) -> dict:
    """A head's recorded settings, with the multi-label loss in place of cross-entropy."""
    out = dict(settings)
    if out.get("head") == "logreg":
        out["objective"] = ("mean over rows of the sum over labels of binary cross-entropy + wd/2 * ||W||^2 (bias "
                            "unpenalised); per label, scikit-learn LogisticRegression(C=1/(wd*n_train)) solves it")
    else:
        out["loss"] = "binary cross-entropy with logits, one sigmoid per label (mean over rows and labels)"
        out["architecture"] = out["architecture"].replace(",C)", ",L)")
    return out


def record_multilabel_run(store: Store, vectors: CohortVectors, method: str, config: dict, seed: int | None,
                          scores: np.ndarray, extra_metrics: dict | None = None, rule: str = MAX_F1,
                          probs: np.ndarray | None = None) -> dict:
    """Record a multi-label run by the contract: sigmoid ``probs`` of ``scores`` (or ``probs`` as given: zero-shot's
    pair softmax), thresholds on val; ``y_true``/``y_pred`` NULL. Returns the ``runs`` row, with its per-label AUC and F1 per
    split from the SQL views (``metrics.label_metrics``)."""
    probs = sigmoid(scores) if probs is None else np.asarray(probs, dtype=np.float32)
    if not np.isfinite(probs).all():
        raise HeadsError(f"non-finite {method} scores on cohort '{vectors.cohort}': nothing was recorded")
    config = {**config, **multilabel_config(vectors, probs, rule)}
    return record_run(store, vectors, method, config, seed, probs, np.full(vectors.n, -1), extra_metrics)


"""Post-hoc per-group corrections of a stored run, fitted on its validation rows only (`embedkit posthoc`).

Each correction reads a source run's stored probabilities, fits per-group parameters on the val split, applies them
to every row and records a NEW run (method ``<source method>+<correction>``, config ``source_run``: the lineage),
so every fairness view, `compare` and the report read it unchanged (docs/mitigation.md):

- ``thresholds``, multi-class: per-group class-score offsets ``b_g`` [C] added to the log-probabilities before the
  argmax (``b_g[0] = 0``: only differences move the argmax). Fitted by coordinate ascent over a grid of offsets to
  maximise ``val macro-F1 - tradeoff * (max_g m_g - min_g m_g)``, ``m_g`` the chosen metric of group g on val
  (``f1``: macro-F1; ``tpr``: mean recall over the classes). The recorded probabilities are
  ``softmax(log p + b_g)``, so the argmax is the prediction.
- ``thresholds``, binary cohorts: fairlearn's ``ThresholdOptimizer`` (prefit on the score ``log p_1 - log p_0``)
  under a parity constraint (``tpr``: true_positive_rate_parity, ``eqodds``: equalized_odds); its (randomised,
  seeded) predictions are the run's ``y_pred``; the probabilities stay the source's.
- ``temperature``: per-group temperature ``T_g`` minimising the group's val NLL of ``softmax(log p / T_g)``;
  predictions unchanged, calibration per group.

A group without val rows (or the missing group) keeps the identity correction. The fit objective is computed in
numpy on the val rows (hundreds of evaluations); every number reported about the new run comes from the SQL views.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from embedkit.constants import NO_SPLIT
from embedkit.heads.mitigate import group_codes
from embedkit.heads.vectors import META_COLUMNS, CohortVectors, HeadsError
from embedkit.store.runs import record_run, softmax
from embedkit.store.store import Store, sql_eq

POSTHOC_METHODS = ("thresholds", "temperature")
METRICS = ("f1", "tpr", "eqodds")
OFFSET_GRID = np.round(np.linspace(-3.0, 3.0, 31), 6)
MAX_STEPS = 40
TO_CONSTRAINTS = {"tpr": "true_positive_rate_parity", "eqodds": "equalized_odds", "f1": "true_positive_rate_parity"}


@dataclass
class SourceRun:
    """A stored run's probabilities beside its rows (as a heads' CohortVectors without vectors)."""

    run: dict
    config: dict
    vectors: CohortVectors
    probs: np.ndarray  # [N, C] float32 in vectors' row order


def load_source(store: Store, run_id: str) -> SourceRun:
    """The run ``run_id`` and its predictions, with its cohort's labels, splits and demographics by row."""
    from embedkit.data.cohort import load_cohort

    runs = store.read("runs", sql_eq("run_id", run_id)).to_pylist() if store.has("runs") else []
    if not runs:
        raise HeadsError(f"no run '{run_id}' in {store.path}: list them with `embedkit runs`")
    run = runs[0]
    config = json.loads(run["config"] or "{}")
    classes = tuple(config.get("classes") or ())
    if len(classes) < 2:
        raise HeadsError(f"run {run_id} records no class order (config 'classes'): it cannot be corrected")
    preds = store.read("predictions", sql_eq("run_id", run_id), columns=["row_id", "probs"])
    if preds.num_rows == 0:
        raise HeadsError(f"run {run_id} has no predictions to correct")
    images = load_cohort(store, run["cohort"])
    images = images[[c for c in META_COLUMNS if c in images.columns]]
    position = {r: i for i, r in enumerate(preds["row_id"].to_pylist())}
    kept = images["row_id"].isin(set(position)).to_numpy()
    meta = images[kept].reset_index(drop=True)
    meta = meta.astype(object).where(meta.notna(), None)
    meta["split"] = meta["split"].fillna(NO_SPLIT)
    probs_all = np.asarray(preds["probs"].to_pylist(), dtype=np.float32)
    probs = probs_all[[position[r] for r in meta["row_id"]]]
    target = config.get("target", "label")  # an attribute probe's runs predict a demographic column
    lookup = {c: i for i, c in enumerate(classes)}
    y = meta[target].map(lambda v: lookup.get(str(v), -1) if v is not None else -1).to_numpy(dtype=np.int64)
    vectors = CohortVectors(run["model"], run["cohort"], run["weights_id"], classes,
                            np.zeros((len(meta), 0), dtype=np.float32), y, meta, int((~kept).sum()),
                            config.get("embedding") or {})
    return SourceRun(run, config, vectors, probs)


# ---- the fit objective on val rows (numpy) -------------------------------------------------------------------------
def _confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _group_metric(cm: np.ndarray, metric: str) -> float:
    tp = np.diag(cm).astype(float)
    if metric == "tpr":
        support = cm.sum(axis=1)
        return float(np.mean(np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)))
    denom = 2 * tp + (cm.sum(axis=0) - tp) + (cm.sum(axis=1) - tp)
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)))


def offsets_objective(cms: list[np.ndarray], metric: str, tradeoff: float) -> float:
    """``macro-F1 of all rows - tradeoff * (max_g - min_g)`` of the groups' ``metric``, from per-group confusions."""
    overall = _group_metric(sum(cms), "f1")
    values = [_group_metric(cm, metric) for cm in cms if cm.sum() > 0]
    gap = max(values) - min(values) if len(values) > 1 else 0.0
    return overall - tradeoff * gap


def fit_offsets(logp: np.ndarray, y: np.ndarray, groups: np.ndarray, n_groups: int, metric: str = "f1",
                tradeoff: float = 1.0) -> np.ndarray:
    """Per-group class offsets [G, C] maximising :func:`offsets_objective` on the rows given (the val rows).

    Steepest ascent over single coordinates: each step tries every (group, class >= 1, value of ``OFFSET_GRID``)
    and takes the best strict improvement (ties: the first in that order), until none is left or ``MAX_STEPS``.
    Class 0 stays at 0 (only differences move an argmax)."""
    n_classes = logp.shape[1]
    offsets = np.zeros((n_groups, n_classes))
    members = [np.flatnonzero(groups == g) for g in range(n_groups)]
    cms = [_confusion(y[m], (logp[m] + offsets[g]).argmax(axis=1), n_classes) for g, m in enumerate(members)]
    best = offsets_objective(cms, metric, tradeoff)
    for _ in range(MAX_STEPS):
        move = None
        for g, rows in enumerate(members):
            if len(rows) == 0:
                continue
            for c in range(1, n_classes):
                for value in OFFSET_GRID:
                    if value == offsets[g, c]:
                        continue
                    trial = offsets[g].copy()
                    trial[c] = value
                    cm = _confusion(y[rows], (logp[rows] + trial).argmax(axis=1), n_classes)
                    score = offsets_objective(cms[:g] + [cm] + cms[g + 1:], metric, tradeoff)
                    if score > best + 1e-12:
                        best, move = score, (g, c, value, cm)
        if move is None:
            break
        g, c, value, cms[g] = move
        offsets[g, c] = value
    return offsets


def fit_temperatures(logp: np.ndarray, y: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Per-group temperature [G]: argmin over T in [e^-3, e^3] of the group's mean NLL of softmax(logp / T)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    temps = np.ones(n_groups)
    for g in range(n_groups):
        rows = groups == g
        if not rows.any():
            continue
        z, t = logp[rows].astype(np.float64), y[rows]

        def nll(log_t: float) -> float:
            return float(-log_softmax(z / np.exp(log_t), axis=1)[np.arange(len(t)), t].mean())

        temps[g] = float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded",
                                                options={"xatol": 1e-6}).x))
    return temps


def _prefit_scores(score_val: np.ndarray, y_val: np.ndarray):
    """A fitted scikit-learn classifier whose decision function is column 0 of X (the stored score), the prefit
    estimator ThresholdOptimizer reads."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    class PrefitScores(ClassifierMixin, BaseEstimator):
        def fit(self, X, y):
            self.classes_ = np.array([0, 1])
            return self

        def decision_function(self, X):
            return np.asarray(X)[:, 0]

        def predict(self, X):
            return (self.decision_function(X) > 0).astype(int)

    return PrefitScores().fit(score_val[:, None], y_val)


def threshold_optimizer(score_val: np.ndarray, y_val: np.ndarray, groups_val: np.ndarray, score_all: np.ndarray,
                        groups_all: np.ndarray, constraint: str, seed: int):
    """fairlearn's ThresholdOptimizer fitted on the val scores and groups; returns (fitted optimizer, predictions
    of every row drawn with ``random_state=seed``)."""
    from fairlearn.postprocessing import ThresholdOptimizer

    estimator = _prefit_scores(score_val, y_val)
    optimizer = ThresholdOptimizer(estimator=estimator, constraints=constraint, prefit=True,
                                   predict_method="decision_function")
    optimizer.fit(score_val[:, None], y_val, sensitive_features=groups_val)
    pred = optimizer.predict(score_all[:, None], sensitive_features=groups_all, random_state=seed)
    return optimizer, np.asarray(pred, dtype=np.int64)


# ---- the command ---------------------------------------------------------------------------------------------------
def run_posthoc(store: Store, run_id: str, method: str, by: str = "sex", metric: str = "f1",
                tradeoff: float = 1.0, seed: int = 0) -> dict:
    """Fit ``method`` on the val rows of run ``run_id`` per group of ``by``, record the corrected run; returns its
    ``runs`` row (config ``source_run`` and ``posthoc`` with every fitted parameter)."""
    from embedkit.fairness.attributes import columns_of

    if method not in POSTHOC_METHODS:
        raise HeadsError(f"unknown post-hoc method '{method}': use one of {', '.join(POSTHOC_METHODS)}")
    if metric not in METRICS:
        raise HeadsError(f"unknown --metric '{metric}': use one of {', '.join(METRICS)}")
    if not (np.isfinite(tradeoff) and tradeoff >= 0):
        raise HeadsError(f"--tradeoff must be a non-negative number, not {tradeoff}")
    source = load_source(store, run_id)
    vectors = source.vectors
    codes, names = group_codes(vectors.groups(columns_of(by.replace("*", "_"))))
    va = vectors.index("val")
    if len(va) == 0:
        raise HeadsError(f"run {run_id}'s cohort has no labelled val rows: post-hoc corrections fit on val only")
    logp = np.log(np.clip(source.probs.astype(np.float64), 1e-12, None))
    n_classes = len(vectors.classes)
    probs, y_pred = source.probs, None
    fitted: dict = {"groups": names}
    if method == "temperature":
        temps = fit_temperatures(logp[va], vectors.y[va], codes[va], len(names))
        probs = softmax(logp / temps[codes][:, None])
        fitted["temperature"] = dict(zip(names, [round(float(t), 6) for t in temps]))
    elif n_classes == 2:
        score = logp[:, 1] - logp[:, 0]
        group_keys = np.asarray(names, dtype=object)[codes]
        _, y_pred = threshold_optimizer(score[va], vectors.y[va], group_keys[va], score, group_keys,
                                        TO_CONSTRAINTS[metric], seed)
        fitted.update(tool="fairlearn.postprocessing.ThresholdOptimizer", constraint=TO_CONSTRAINTS[metric],
                      score="log p1 - log p0", random_state=seed)
    else:
        offsets = fit_offsets(logp[va], vectors.y[va], codes[va], len(names), metric, tradeoff)
        probs = softmax(logp + offsets[codes])
        fitted.update(offsets={n: [round(float(v), 6) for v in offsets[g]] for g, n in enumerate(names)},
                      objective=f"val macro-F1 - {tradeoff:g} * (max - min over groups of val {metric})")
    source_method = source.run["method"]
    config = {"source_run": run_id, "source_method": source_method,
              "posthoc": {"method": method, "by": by, "metric": metric, "tradeoff": tradeoff, "fitted_on": "val",
                          **fitted},
              "val_split": "val"}
    for key in ("target", "mitigation"):
        if key in source.config:
            config[key] = source.config[key]
    return record_run(store, vectors, f"{source_method}+{method}", config, source.run["seed"], probs, y_pred)

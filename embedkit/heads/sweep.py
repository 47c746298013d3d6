"""Hyper-parameter sweeps: every configuration x seed trained at once, each stored as a run, one picked on val.

``--grid "lr=1e-4,1e-3 wd=0,1e-5 hidden=256,1024"`` and ``--seeds 0-9`` expand to configurations x seeds. lp and
mlp heads train as one batched model per group of models sharing a shape (hidden, epochs, batch size), each
model with its own lr, wd, seed and shuffles (:mod:`embedkit.heads.batched`). logreg solves every distinct L2
strength in one batched L-BFGS (:mod:`embedkit.heads.logreg`); its result does not depend on the seed (convex,
zero init), so each configuration is solved once and recorded under every seed.

Selection (``--select``) reads validation predictions only -- :func:`val_metrics` is handed the val rows and
nothing else, so the test split cannot influence the pick:
- ``val_macro_f1``: highest mean (over seeds) val macro-F1;
- ``val_loss``: lowest mean val cross-entropy;
- ``fair:f1_gap<=B``: highest mean val macro-F1 among configurations whose mean val F1 gap is at most B: the
  largest over the attributes of ``--by`` of max - min macro-F1 over that attribute's groups. ``--by`` names
  attributes as in `embedkit fairness` (:mod:`embedkit.fairness.attributes`): ``sex,age_group`` compares the sex
  groups and the age groups, each on its own; ``age_group*sex`` (the cell attribute ``age_group_sex``) compares
  the four age x sex cells.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np

from embedkit.fairness.attributes import columns_of
from embedkit.heads.probe import HeadConfig, training_arrays
from embedkit.heads import multilabel
from embedkit.heads.vectors import CohortVectors, HeadsError, load_vectors
from embedkit.store.runs import make_run, predictions_table, softmax
from embedkit.store.store import Store, new_run_id

GRID_KEYS: dict[str, dict[str, type]] = {
    "lp": {"lr": float, "wd": float, "hidden": int, "epochs": int, "batch_size": int},
    "mlp": {"lr": float, "wd": float, "hidden": int, "epochs": int, "batch_size": int},
    "logreg": {"wd": float, "max_iter": int, "tol": float},
}
SELECT_FORMS = "val_macro_f1, val_loss, val_macro_auc (multi-label) or fair:f1_gap<=B (e.g. fair:f1_gap<=0.05)"


# ---- parsing ----------------------------------------------------------------------------------------------------
def parse_grid(text: str, head: str) -> dict[str, list]:
    """``"lr=1e-4,1e-3 wd=0,1e-5"`` -> ``{"lr": [1e-4, 1e-3], "wd": [0.0, 1e-5]}`` (keys checked for ``head``)."""
    allowed = GRID_KEYS[head]
    grid: dict[str, list] = {}
    for part in (text or "").split():
        key, sep, values = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values:
            raise HeadsError(f"bad grid entry '{part}': write key=v1,v2 (e.g. --grid \"lr=1e-4,1e-3 wd=0,1e-5\")")
        if key not in allowed:
            raise HeadsError(f"'{key}' cannot be swept for head {head}; sweepable: {', '.join(allowed)}")
        if key in grid:
            raise HeadsError(f"grid key '{key}' given twice")
        grid[key] = list(dict.fromkeys(_convert(key, v, allowed[key]) for v in values.split(",")))
    return grid


def _convert(key: str, text: str, kind: type):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if math.isnan(value) or (kind is int and not value.is_integer()):
        raise HeadsError(f"grid value '{text}' for '{key}' is not {'an integer' if kind is int else 'a number'}")
    return int(value) if kind is int else value


def parse_seeds(text: str | int, option: str = "--seeds") -> list[int]:
    """``"0-9"`` -> 0..9; ``"0,3,7"``; ``"0-4,10"``; a single number. ``option`` names the setting in errors."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise HeadsError(f"bad seed range '{part}': write low-high, e.g. 0-9")
            seeds.extend(range(lo, hi + 1))
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise HeadsError(f"bad {option} '{text}': use a range (0-9), a list (0,3,7) or both (0-4,10)")
    return list(dict.fromkeys(seeds))


@dataclass(frozen=True)
class Selection:
    """A parsed ``--select``."""

    criterion: str  # val_macro_f1 | val_loss | fair
    max_gap: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Selection":
        text = text.replace(" ", "")
        if text in ("val_macro_f1", "val_loss", "val_macro_auc"):
            return cls(text)
        m = re.fullmatch(r"fair:f1_gap<=([0-9.eE+-]+)", text)
        if m:
            try:
                return cls("fair", float(m.group(1)))
            except ValueError:
                pass
        raise HeadsError(f"bad --select '{text}': use {SELECT_FORMS}")

    def __str__(self) -> str:
        return f"fair:f1_gap<={self.max_gap:g}" if self.criterion == "fair" else self.criterion


def expand(base: HeadConfig, grid: dict[str, list]) -> list[HeadConfig]:
    """Every combination of the grid over ``base`` (grid order: keys as given, values as given)."""
    keys = list(grid)
    configs = [base.with_(**dict(zip(keys, combo))) for combo in itertools.product(*(grid[k] for k in keys))]
    return list(dict.fromkeys(configs))


# ---- training ---------------------------------------------------------------------------------------------------
@dataclass
class GridFit:
    """Logits of every (configuration, seed) run, configuration-major: run r = (r // n_seeds, r % n_seeds)."""

    logits: np.ndarray  # [R, N, C]
    extras: list[dict]
    flops: float
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time


def train_grid(vectors: CohortVectors, configs: list[HeadConfig], seeds: list[int],
               models_per_slice: int | str | None = "auto", progress=None) -> GridFit:
    """Train every configuration x seed on ``vectors``: one batched model per group of equal shapes."""
    from embedkit.heads.batched import train_batched
    from embedkit.heads.logreg import fit_logreg, logreg_flops
    from embedkit.heads.mitigate import bind

    X_train, y_train, X_val, y_val = training_arrays(vectors)
    n_classes, n_seeds = len(vectors.classes), len(seeds)
    weighting = bind(configs[0].mitigate, vectors, vectors.index("train"), y_train)  # the grid shares it
    logits = np.empty((len(configs) * n_seeds, vectors.n, n_classes), dtype=np.float32)
    extras: list[dict] = [{} for _ in range(len(logits))]
    flops, start, cpu_start = 0.0, time.perf_counter(), time.process_time()
    if configs[0].head == "logreg":
        groups = _group(configs, ("max_iter", "tol"))
        for (max_iter, tol), members in groups.items():
            strengths = sorted({configs[i].wd for i in members})  # the seed changes nothing: solve each once
            fit = fit_logreg(X_train, y_train, n_classes, strengths, max_iter=max_iter, tol=tol,
                             sample_weight=None if weighting is None else weighting.row_weight.numpy())
            scored = fit.logits(vectors.X)
            flops += logreg_flops(len(X_train), vectors.dim, n_classes, fit.evaluations)
            flops += 2.0 * len(strengths) * vectors.n * (vectors.dim + 1) * n_classes
            for i in members:
                j = strengths.index(configs[i].wd)
                for s in range(n_seeds):
                    logits[i * n_seeds + s] = scored[j]
                    extras[i * n_seeds + s] = {"iterations": int(fit.n_iter[j]), "converged": bool(fit.converged[j])}
        return GridFit(logits, extras, flops, time.perf_counter() - start, time.process_time() - cpu_start)
    for (hidden, epochs, batch_size), members in _group(configs, ("hidden", "epochs", "batch_size")).items():
        runs = [(i, s) for i in members for s in range(n_seeds)]
        fit = train_batched(X_train, y_train, X_val, y_val, vectors.X, n_classes, configs[0].head, hidden, epochs,
                            batch_size, [configs[i].lr for i, _ in runs], [configs[i].wd for i, _ in runs],
                            [seeds[s] for _, s in runs], models_per_slice=models_per_slice, progress=progress,
                            weighting=weighting)
        flops += fit.flops
        for k, (i, s) in enumerate(runs):
            logits[i * n_seeds + s] = fit.logits[k]
            extras[i * n_seeds + s] = {"val_loss": float(fit.val_loss[k]), "best_epoch": int(fit.best_epoch[k])}
    return GridFit(logits, extras, flops, time.perf_counter() - start, time.process_time() - cpu_start)


def _group(configs: list[HeadConfig], keys: tuple[str, ...]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(tuple(getattr(cfg, k) for k in keys), []).append(i)
    return groups


# ---- selection (validation rows only) ---------------------------------------------------------------------------
def val_loss(probs_val: np.ndarray, y_val: np.ndarray) -> np.ndarray:
    """Per run: the val cross-entropy, the heads' training objective (the one number not read from the SQL views)."""
    picked = np.take_along_axis(probs_val, y_val[None, :, None], axis=2)[:, :, 0].astype(np.float64)
    return -np.log(np.clip(picked, 1e-12, None)).mean(axis=1)


def val_metrics(store: Store, run_ids: list[str], by: list[str]) -> dict:
    """Per run, on the val split, from the SQL views (embedkit.fairness.summary): macro-F1, and the F1 gap, the
    largest over the attributes in ``by`` (each attribute's groups compared separately, as `embedkit fairness`
    does). NaN where undefined."""
    from embedkit.fairness.summary import selection_metrics

    f1, gaps, groups = selection_metrics(store, run_ids, by, "val")
    f1_arr = np.array([np.nan if f1.get(r) is None else f1[r] for r in run_ids], dtype=float)
    gap = np.array([max((g for g in gaps.get(r, {}).values() if g is not None), default=np.nan) for r in run_ids],
                   dtype=float)
    # Rounded: DuckDB's parallel sums may differ in the last bit from one query to the next, which must not turn a
    # tie between two configurations (first in grid order wins) into a different pick. Both are ratios of counts.
    return {"macro_f1": f1_arr.round(12), "f1_gap": gap.round(12), "groups": groups}


def _mean_std(values: np.ndarray) -> tuple[float, float | None]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), None
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def pareto_front(utility: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """Configurations no other one beats on both axes (higher utility, lower gap, one strictly)."""
    front = np.zeros(len(utility), dtype=bool)
    for i in range(len(utility)):
        if np.isnan(utility[i]) or np.isnan(gap[i]):
            continue
        dominated = (utility >= utility[i]) & (gap <= gap[i]) & ((utility > utility[i]) | (gap < gap[i]))
        front[i] = not bool(np.any(dominated))
    return front


def choose(summary: list[dict], selection: Selection) -> tuple[int | None, str]:
    """Index of the picked configuration (ties: the first in grid order) and a sentence saying why."""
    f1 = np.array([s["val_macro_f1_mean"] for s in summary])
    if selection.criterion == "val_loss":
        loss = np.array([s["val_loss_mean"] for s in summary])
        i = int(np.nanargmin(loss))
        return i, f"lowest mean val loss ({loss[i]:.4f})"
    if selection.criterion == "val_macro_f1":
        i = int(np.nanargmax(f1))
        return i, f"highest mean val macro-F1 ({f1[i]:.4f})"
    if selection.criterion == "val_macro_auc":  # multi-label sweeps (run_multilabel_sweep)
        auc = np.array([s.get("val_macro_auc_mean", np.nan) for s in summary], dtype=float)
        i = int(np.nanargmax(auc))
        return i, f"highest mean val macro-AUC ({auc[i]:.4f})"
    gap = np.array([s["val_f1_gap_mean"] for s in summary])
    if np.all(np.isnan(gap)):
        raise HeadsError("fair selection needs at least two groups with val rows in --by; none has a val F1 gap")
    ok = gap <= selection.max_gap + 1e-12
    if not ok.any():
        return None, (f"no configuration has mean val F1 gap <= {selection.max_gap:g} (smallest: "
                      f"{np.nanmin(gap):.4f}); nothing picked: raise the bound or widen the grid")
    i = int(np.nanargmax(np.where(ok, f1, -np.inf)))
    return i, f"highest mean val macro-F1 ({f1[i]:.4f}) among configurations with val F1 gap <= {selection.max_gap:g}"


# ---- the sweep --------------------------------------------------------------------------------------------------
@dataclass
class SweepOutcome:
    sweep_id: str
    model: str
    cohort: str
    weights_id: str
    head: str
    grid: dict
    seeds: list[int]
    select: str
    by: list[str]
    summary: list[dict]
    pick: int | None
    reason: str
    n_runs: int
    train_seconds: float
    total_seconds: float
    flops: float
    groups: list[str] = field(default_factory=list)
    task: str = "multiclass"
    method: str = ""  # the runs' method: the head, + a mitigation (lp+groupdro)

    def to_json(self) -> dict:
        """A JSON-ready dict (the ``--json`` output)."""
        return {
            "sweep_id": self.sweep_id, "model": self.model, "cohort": self.cohort, "weights_id": self.weights_id,
            "head": self.head, "method": self.method or self.head, "grid": self.grid, "seeds": self.seeds,
            "select": self.select, "by": self.by,
            "groups": self.groups, "n_runs": self.n_runs, "train_seconds": round(self.train_seconds, 4),
            "total_seconds": round(self.total_seconds, 4),
            "runs_per_second": round(self.n_runs / self.train_seconds, 3) if self.train_seconds else None,
            "gflops_per_second": round(self.flops / self.train_seconds / 1e9, 2) if self.train_seconds else None,
            "configs": [_clean(s) for s in self.summary],
            "pick": _clean(self.summary[self.pick]) if self.pick is not None else None,
            "reason": self.reason,
            "task": self.task,
        }


def _clean(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def run_sweep(store: Store, model: str, head: str, grid: dict[str, list], seeds: list[int],
              base: HeadConfig | None = None, select: str = "val_macro_f1", by: list[str] | tuple = ("sex",),
              cohort: str | None = None, weights_id: str | None = None,
              models_per_slice: int | str | None = "auto", progress=None,
              allow_partial: bool = False, task: str | None = None,
              threshold_rule: str = multilabel.MAX_F1) -> SweepOutcome:
    """Train the grid x seeds, store every run with its predictions, and pick a configuration on val only.

    ``by``: attribute names, a cell by its column (``age_group_sex``; the command line's ``age_group*sex`` is read by
    :func:`embedkit.fairness.attributes.parse_by`). ``task`` (default: the cohort's) multilabel sweeps sigmoid heads
    (:func:`run_multilabel_sweep`).
    """
    total_start = time.perf_counter()
    selection = Selection.parse(select)
    base = (base or HeadConfig(head)).with_(head=head)
    if not seeds:
        raise HeadsError("no seeds: pass --seeds, e.g. 0-9")
    configs = expand(base, grid)
    multilabel.check_task(task)
    vectors = load_vectors(store, model, cohort, weights_id, allow_partial, task)
    if vectors.task == multilabel.MULTILABEL:
        return run_multilabel_sweep(store, vectors, head, grid, configs, seeds, selection, models_per_slice,
                                    progress, threshold_rule, total_start)
    if selection.criterion == "val_macro_auc":
        raise HeadsError("--select val_macro_auc picks multi-label sweeps; this cohort is multi-class: use "
                         f"{SELECT_FORMS.split(', val_macro_auc')[0]} or fair:f1_gap<=B")
    by = list(by)
    for attribute in by:  # validates the column names before any training
        vectors.groups(columns_of(attribute))
    fit = train_grid(vectors, configs, seeds, models_per_slice, progress)
    probs = softmax(fit.logits)
    sweep_id = new_run_id("sweep")
    runs = []
    for r in range(len(probs)):
        cfg, seed = configs[r // len(seeds)], seeds[r % len(seeds)]
        config = {**cfg.settings(), "trainer": "batched L-BFGS" if head == "logreg" else "batched",
                  "sweep_id": sweep_id, "sweep_grid": grid, "sweep_select": str(selection),
                  "train_split": "train", "val_split": "val"}
        runs.append(make_run(vectors, cfg.method, config, seed, fit.extras[r]))
    # the ids the store holds: a run recorded before with the same inputs keeps its id (and is not stored twice)
    run_ids = store.write_runs(runs, predictions_table([r["run_id"] for r in runs], vectors.meta, vectors.y, probs,
                                                       fit.logits.argmax(axis=2)))
    va = vectors.index("val")  # selection sees the val rows and nothing else
    metrics = {**val_metrics(store, run_ids, by), "loss": val_loss(probs[:, va], vectors.y[va])}
    summary = []
    for i, cfg in enumerate(configs):
        rs = slice(i * len(seeds), (i + 1) * len(seeds))
        f1_mean, f1_std = _mean_std(metrics["macro_f1"][rs])
        gap_mean, gap_std = _mean_std(metrics["f1_gap"][rs])
        loss_mean, loss_std = _mean_std(metrics["loss"][rs])
        summary.append({"config": {k: getattr(cfg, k) for k in GRID_KEYS[head]},
                        "swept": {k: getattr(cfg, k) for k in grid},
                        "n_seeds": len(seeds), "val_macro_f1_mean": f1_mean, "val_macro_f1_std": f1_std,
                        "val_f1_gap_mean": gap_mean, "val_f1_gap_std": gap_std, "val_loss_mean": loss_mean,
                        "val_loss_std": loss_std, "run_ids": run_ids[rs]})
    front = pareto_front(np.array([s["val_macro_f1_mean"] for s in summary]),
                         np.array([s["val_f1_gap_mean"] for s in summary]))
    pick, reason = choose(summary, selection)
    for i, s in enumerate(summary):
        s["pareto"], s["picked"] = bool(front[i]), i == pick
    return SweepOutcome(sweep_id, model, vectors.cohort, vectors.weights_id, head, grid, list(seeds), str(selection),
                        by, summary, pick, reason, len(runs), fit.seconds, time.perf_counter() - total_start,
                        fit.flops, groups=metrics["groups"], method=base.method)


def run_multilabel_sweep(store: Store, vectors: CohortVectors, head: str, grid: dict[str, list],
                         configs: list[HeadConfig], seeds: list[int], selection: Selection,
                         models_per_slice: int | str | None, progress, threshold_rule: str,
                         total_start: float) -> SweepOutcome:
    """A sweep of multi-label heads (one sigmoid per label): the same batched training, every run recorded by the
    multi-label contract with its own val thresholds, the pick on val only: ``val_macro_auc`` (mean over labels of
    the val AUC), ``val_loss`` (val BCE) or ``val_macro_f1`` (mean over labels of the val F1 at the run's val
    thresholds). ``fair:`` selection reads the multi-class views and is refused here."""
    if selection.criterion == "fair":
        raise HeadsError("fair:f1_gap<=B selects multi-class sweeps; a multi-label sweep selects by val_macro_auc, "
                         "val_loss or val_macro_f1")
    if configs[0].mitigate is not None:
        raise HeadsError(f"--mitigate {configs[0].mitigate.name} is for multi-class heads; this cohort is multi-label "
                         "(run with --task multiclass, or without --mitigate)")
    from embedkit.fairness.summary import label_summaries

    multilabel.parse_threshold_rule(threshold_rule)
    fit = train_grid(vectors, configs, seeds, models_per_slice, progress)
    probs = multilabel.sigmoid(fit.logits)
    sweep_id = new_run_id("sweep")
    va = vectors.index("val")  # thresholds and selection see the val rows and nothing else
    runs = []
    for r in range(len(probs)):
        cfg, seed = configs[r // len(seeds)], seeds[r % len(seeds)]
        config = {**multilabel.head_settings(cfg.settings()), "trainer": "batched L-BFGS" if head == "logreg"
                  else "batched", "sweep_id": sweep_id, "sweep_grid": grid, "sweep_select": str(selection),
                  "train_split": "train", "val_split": "val", **multilabel.multilabel_config(vectors, probs[r],
                                                                                             threshold_rule)}
        runs.append(make_run(vectors, head, config, seed, fit.extras[r]))
    run_ids = store.write_runs(runs, predictions_table([r["run_id"] for r in runs], vectors.meta, vectors.y, probs,
                                                       np.full(probs.shape[:2], -1)))
    # per-label AUC and F1 from the SQL views (the one definition); selection reads their val split only
    summaries = label_summaries(store, run_ids)
    reports = [summaries.get(r, {}) for r in run_ids]
    loss = multilabel.bce_loss(probs[:, va], vectors.Y[va][None])

    def val(report: dict, key: str) -> float:
        value = report.get("val", {}).get(key)
        return np.nan if value is None else value

    # Rounded as val_metrics rounds: DuckDB's parallel sums must not turn a tie into a different pick.
    val_auc = np.array([val(r, "macro_auc") for r in reports], dtype=float).round(12)
    val_f1 = np.array([val(r, "macro_f1") for r in reports], dtype=float).round(12)
    summary = []
    for i, cfg in enumerate(configs):
        rs = slice(i * len(seeds), (i + 1) * len(seeds))
        f1_mean, f1_std = _mean_std(val_f1[rs])
        auc_mean, auc_std = _mean_std(val_auc[rs])
        loss_mean, loss_std = _mean_std(loss[rs])
        summary.append({"config": {k: getattr(cfg, k) for k in GRID_KEYS[head]},
                        "swept": {k: getattr(cfg, k) for k in grid}, "n_seeds": len(seeds),
                        "val_macro_f1_mean": f1_mean, "val_macro_f1_std": f1_std,
                        "val_macro_auc_mean": auc_mean, "val_macro_auc_std": auc_std,
                        "val_f1_gap_mean": float("nan"), "val_f1_gap_std": None,
                        "val_loss_mean": loss_mean, "val_loss_std": loss_std, "run_ids": run_ids[rs],
                        "pareto": False, "label_auc_mean": _label_auc_means(reports[rs], vectors.classes)})
    pick, reason = choose(summary, selection)
    for i, s in enumerate(summary):
        s["picked"] = i == pick
    return SweepOutcome(sweep_id, vectors.model, vectors.cohort, vectors.weights_id, head, grid, list(seeds),
                        str(selection), [], summary, pick, reason, len(runs), fit.seconds,
                        time.perf_counter() - total_start, fit.flops, task=multilabel.MULTILABEL, method=head)


def _label_auc_means(reports: list[dict], classes: tuple[str, ...]) -> dict:
    """{split: {label: mean over the seeds' runs of its AUC}} for val and test (reported, never selected on test)."""
    out = {}
    for split in ("val", "test"):
        if all(split in r for r in reports):
            values = {c: [r[split]["auc"][c] for r in reports if r[split]["auc"].get(c) is not None] for c in classes}
            out[split] = {c: (float(np.mean(v)) if v else None) for c, v in values.items()}
    return out


def render_table(outcome: SweepOutcome):
    """A rich Table: one row per configuration (mean and seed-to-seed std on val), Pareto front and pick marked."""
    from rich.table import Table

    def pm(mean, std) -> str:
        if mean is None or (isinstance(mean, float) and math.isnan(mean)):
            return "-"
        return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")

    by = ", ".join(outcome.by)
    table = Table(title=f"sweep {outcome.sweep_id}: {outcome.model} {outcome.method}, {outcome.n_runs} runs "
                        f"({len(outcome.summary)} configurations x {len(outcome.seeds)} seeds), "
                        f"select {outcome.select}")
    table.add_column("#", justify="right")
    keys = list(outcome.grid) or ["(defaults)"]
    for k in keys:
        table.add_column(k, justify="right")
    table.add_column("val macro-F1 (mean ± std)", justify="right")
    is_multilabel = outcome.task == "multilabel"  # per-label AUC and F1 averaged over labels; no F1 gap selection
    if is_multilabel:
        table.add_column("val macro-AUC (mean ± std)", justify="right")
    else:
        table.add_column(f"val F1 gap by {by} (mean ± std)", justify="right")
    table.add_column("val loss", justify="right")
    table.add_column("Pareto", justify="center")
    table.add_column("pick", justify="center")
    for i, s in enumerate(outcome.summary):
        cells = [f"{s['swept'][k]:g}" for k in outcome.grid] or ["-"]
        second = pm(s["val_macro_auc_mean"], s["val_macro_auc_std"]) if is_multilabel else \
            pm(s["val_f1_gap_mean"], s["val_f1_gap_std"])
        table.add_row(str(i), *cells, pm(s["val_macro_f1_mean"], s["val_macro_f1_std"]),
                      second, pm(s["val_loss_mean"], None),
                      "*" if s["pareto"] else "", "<- pick" if s["picked"] else "",
                      style="bold green" if s["picked"] else None)
    table.caption = (f"Pareto front (*): no other configuration has both higher val macro-F1 and lower val F1 gap. "
                     f"Pick: {outcome.reason}. Trained in {outcome.train_seconds:.2f} s "
                     f"({outcome.n_runs / outcome.train_seconds:.1f} runs/s).")
    if is_multilabel:
        table.caption = (f"Multi-label: macro = mean over the labels; val F1 at each run's val thresholds; val loss "
                         f"is BCE. Pick: {outcome.reason}. Trained in {outcome.train_seconds:.2f} s "
                         f"({outcome.n_runs / outcome.train_seconds:.1f} runs/s).")
    return table

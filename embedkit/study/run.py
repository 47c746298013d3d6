"""Running a study: plan it, run every step not yet done (in order, resumably), then write its report.

Runs are written atomically (predictions first, then the ``runs`` row that makes them visible) and embedding
resumes by itself, so a killed study leaves no half-done step visible and a re-run does only what is missing.
Fine-tuning steps get a deterministic run id, so a killed fine-tune continues from its last checkpointed epoch.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from embedkit.data.build import SYNTHETIC_COHORT
from embedkit.store.store import Store, sql_eq
from embedkit.study.config import FIXED_SETTINGS, RUN_KINDS, SEED_INIT, StudyConfig, StudyError
from embedkit.study.plan import Step, plan_study, step_key, step_settings, study_runs, synthetic_images_dir


@dataclass
class StudyResult:
    """What :func:`run_study` planned and did."""

    config: StudyConfig
    steps: list[Step]  # the whole plan, in order, with each step's final status
    run: list[Step] = field(default_factory=list)  # steps run in this call, in order
    report: Path | None = None
    stopped: bool = False  # stop_after ended the call before every step ran
    plan_only: bool = False
    executor: str = "local"  # local (in this process) | ray (embedkit/study/ray_exec.py)
    cluster: dict | None = None  # what the Ray cluster reports (CPUs, GPUs, memory, nodes); ray only
    wall_estimate_s: float | None = None  # the steps to do, scheduled on the Ray cluster's resources; ray only

    @property
    def todo(self) -> list[Step]:
        return [s for s in self.steps if s.status == "todo"]

    @property
    def done(self) -> list[Step]:
        return [s for s in self.steps if s.status == "done"]

    @property
    def skipped(self) -> list[Step]:
        return [s for s in self.steps if s.status == "skipped"]

    @property
    def blocked(self) -> list[Step]:
        return [s for s in self.steps if s.status == "blocked"]

    @property
    def nothing_to_do(self) -> bool:
        return not self.todo and not self.blocked

    def to_json(self) -> dict:
        return {"study": self.config.name, "config": self.config.to_json(), "plan_only": self.plan_only,
                "stopped": self.stopped, "report": str(self.report) if self.report else None,
                "steps": [s.to_json() for s in self.steps], "run": [s.key for s in self.run],
                "executor": self.executor, "cluster": self.cluster, "wall_estimate_s": self.wall_estimate_s}


# ---- the studies table -------------------------------------------------------------------------------------


def stored_study(store: Store, name: str) -> dict | None:
    """The ``studies`` row of ``name`` (config parsed), or None."""
    if not store.has("studies"):
        return None
    rows = store.read("studies", sql_eq("study_id", name)).to_pylist()
    if not rows:
        return None
    row = rows[0]
    row["config"] = json.loads(row["config"] or "{}")
    return row


def _check_fixed(stored: dict | None, config: StudyConfig) -> None:
    if stored is None:
        return
    before = stored["config"]
    changed = [f"{k} {before.get(k)!r} -> {getattr(config, k)!r}" for k in FIXED_SETTINGS
               if k in before and before.get(k) != getattr(config, k)]
    if changed:
        raise StudyError(f"study '{config.name}' was run with other settings ({'; '.join(changed)}). A study keeps "
                         f"its settings and grows only by models, methods and seeds: choose another --name for "
                         f"these settings")


def _record_study(store: Store, config: StudyConfig, stored: dict | None) -> None:
    import pyarrow as pa

    from embedkit.store import schemas

    now = datetime.now(timezone.utc)
    row = {"study_id": config.name, "config": json.dumps(config.to_json(), sort_keys=True),
           "created_at": stored["created_at"] if stored else now, "updated_at": now}
    store.upsert("studies", pa.Table.from_pylist([row], schema=schemas.STUDIES), ["study_id"], schemas.STUDIES)


# ---- running -----------------------------------------------------------------------------------------------


def _say(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(message)


def _make_cohort(store: Store, config: StudyConfig) -> None:
    """Draw and import the synthetic cohort, or import the shipped NIH protocol from --images."""
    from embedkit.data.build import import_nih, import_synthetic
    from embedkit.data.nih import shipped_manifest

    if config.cohort == SYNTHETIC_COHORT:
        import_synthetic(store, synthetic_images_dir(store))
    else:  # the plan blocks any other cohort the store lacks
        import_nih(store, config.cohort, shipped_manifest(config.cohort), config.images)


def _run_one(store: Store, config: StudyConfig, step: Step, weights: dict[str, str | None], progress: bool) -> None:
    """Do one step; run steps get ``run_id``, embed steps record the weights_id in ``weights``."""
    if step.kind == "cohort":
        _make_cohort(store, config)
    elif step.kind == "embed":
        import gc

        from embedkit.embed import embed_cohort
        from embedkit.models.registry import get_spec, instantiate

        spec = get_spec(step.model)
        net, weights_id, source = instantiate(spec, None, config.random_init, SEED_INIT, config.weights_dir)
        summary = embed_cohort(store, spec, net, weights_id, source, config.cohort, device=config.device,
                               workers=config.workers, progress=progress, amp=config.amp,
                               preprocess=config.preprocessing_of(step.model))
        weights[step.model] = step.weights_id = weights_id
        step.note = summary.line()
        del net
        gc.collect()  # one full-size model at a time
    elif step.kind == "zeroshot":
        from embedkit.heads.zeroshot import run_zeroshot

        step.run_id = run_zeroshot(store, step.model, config.cohort, step.weights_id, study_id=config.name)["run_id"]
    elif step.kind in ("lp", "mlp"):
        from embedkit.heads.probe import HeadConfig, run_probe

        cfg = HeadConfig(head=step.kind, epochs=config.probe_epochs)
        step.run_id = run_probe(store, step.model, cfg, step.seed, config.cohort, step.weights_id,
                                study_id=config.name)["run_id"]
    else:
        step.run_id = _finetune_step(store, config, step, progress)


def _finetune_run_id(study: str, key: str) -> str:
    """Deterministic, so a killed fine-tune is found again and resumed from its checkpoint."""
    return f"{key.split('|')[0]}-{study}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _finetune_step(store: Store, config: StudyConfig, step: Step, progress: bool) -> str:
    """LoRA / FT with a deterministic run id: resumed from its checkpoint when an earlier call was killed."""
    import shutil

    from embedkit.finetune import train

    run_id = _finetune_run_id(config.name, step.key)
    folder = train.checkpoint_dir(store, run_id)
    if (folder / "config.json").is_file() and (folder / "last.pt").is_file():
        _say(progress, f"  continuing {run_id} from its last checkpointed epoch")
        result = train.resume(store, run_id, device=config.device, workers=config.workers, progress=progress)
    else:
        if folder.exists():
            shutil.rmtree(folder)  # killed before its first epoch finished: nothing to continue from
        cfg = train.FinetuneConfig(model=step.model, method=step.kind, cohort=config.cohort,
                                   weights_dir=config.weights_dir, random_init=config.random_init,
                                   seed_init=SEED_INIT, epochs=config.ft_epochs, seed=step.seed,
                                   device=config.device, workers=config.workers, study_id=config.name,
                                   amp=config.amp, preprocess=config.preprocessing_of(step.model))
        result = train.finetune(store, cfg, progress=progress, run_id=run_id)
    return result.run_id


def _default_report_dir(store: Store, name: str) -> Path:
    return Path(store.path).resolve().parent / f"study-{name}"


EXECUTORS = ("local", "ray")


def run_study(store: Store, config: StudyConfig, plan_only: bool = False, progress: bool = True,
              stop_after: int | None = None, executor: str = "local", address: str | None = None) -> StudyResult:
    """Plan the study and (unless ``plan_only``) run every missing step, then write its report.

    ``stop_after`` stops after that many steps have run (the study resumes from there on the next call).
    Blocked steps (no cohort, no weights) raise :class:`StudyError` before anything runs.
    ``executor``: ``local`` runs the steps one after the other in this process; ``ray`` runs each as a Ray task on
    the cluster at ``address`` (a local one when None; :mod:`embedkit.study.ray_exec`), and the plan's GPU
    question and wall-time estimate are the cluster's.
    """
    config.validate()
    store.require_local("a study (its synthetic X-rays, checkpoints and report are files beside the tables)")
    if executor not in EXECUTORS:
        raise StudyError(f"--executor must be one of {', '.join(EXECUTORS)}, not '{executor}'")
    if address is not None and executor != "ray":
        raise StudyError("--address names a Ray cluster: pass it with --executor ray")
    stored = stored_study(store, config.name)
    _check_fixed(stored, config)
    cluster = None
    if executor == "ray":
        from embedkit.study import ray_exec

        cluster = ray_exec.connect(address)
    steps = plan_study(store, config, gpu=None if cluster is None else cluster["gpus"] > 0)
    result = StudyResult(config, steps, plan_only=plan_only, executor=executor, cluster=cluster)
    if cluster is not None:
        result.wall_estimate_s = ray_exec.estimate_wall(result.todo, config, cluster)
    if plan_only:
        return result
    if result.blocked:
        reasons = list(dict.fromkeys(s.note for s in result.blocked if not s.note.startswith("waits for")))
        raise StudyError(f"study '{config.name}' cannot run; nothing was done:\n  " + "\n  ".join(reasons))
    _record_study(store, config, stored)
    if cluster is not None:
        todo = result.todo if stop_after is None else result.todo[:stop_after]
        result.stopped = len(todo) < len(result.todo)
        _say(progress, f"[bold]{len(todo)} step(s) as Ray tasks[/bold] on {cluster['nodes']} node(s), "
                       f"{cluster['cpus']:g} CPUs, {cluster['gpus']:g} GPUs")
        result.run = ray_exec.run_steps(store, config, todo, cluster, lambda line: _say(progress, line))
    else:
        _run_local(store, config, result, steps, progress, stop_after)
    return _finish(store, config, result, steps, progress)


def _run_local(store: Store, config: StudyConfig, result: StudyResult, steps: list[Step], progress: bool,
               stop_after: int | None) -> None:
    """The in-process executor: every step to do, in plan order, in this process."""
    existing: dict[str, str] | None = None
    weights = {s.model: s.weights_id for s in steps if s.kind == "embed"}
    todo = result.todo
    for index, step in enumerate(todo):
        if stop_after is not None and len(result.run) >= stop_after:
            result.stopped = True
            break
        if step.kind in RUN_KINDS and step.weights_id is None:
            # Real weights seen for the first time: the embed step has hashed them; the step may exist already.
            step.weights_id = weights[step.model]
            step.key = step_key(step.kind, step.model, step.weights_id, step.seed, step_settings(config, step.kind))
            existing = study_runs(store, config.name) if existing is None else existing
            if step.key in existing:
                step.status, step.run_id, step.note = "done", existing[step.key], ""
                continue
        _say(progress, f"[bold]step {index + 1}/{len(todo)}[/bold] {step.label()}")
        start = time.perf_counter()
        _run_one(store, config, step, weights, progress)
        step.seconds = time.perf_counter() - start
        step.status = "done"
        result.run.append(step)
        _say(progress, f"[green]done[/green] {step.label()} ({step.seconds:.1f} s)"
             + (f": run {step.run_id}" if step.run_id else ""))


def _finish(store: Store, config: StudyConfig, result: StudyResult, steps: list[Step], progress: bool) -> StudyResult:
    """After the steps: the skipped ones said, then the report of the study's runs (when something ran, or it is
    missing)."""
    if result.stopped:
        return result
    for step in result.skipped:
        _say(progress, f"[yellow]skipped[/yellow] {step.label()}: {step.note}")
    run_ids = [s.run_id for s in steps if s.status == "done" and s.run_id]
    out = Path(config.report) if config.report else _default_report_dir(store, config.name)
    from embedkit.report.build import HTML_NAME

    if not run_ids:
        _say(progress, "no runs to report (every run step was skipped)")
    elif result.run or not (out / HTML_NAME).is_file():
        from embedkit.report import build_report

        start = time.perf_counter()
        models = len(config.models)
        result.report = build_report(
            store, out, runs=run_ids, study=config.name, ci=config.ci,
            title=f"embedkit study '{config.name}': {models} model{'s' * (models > 1)} x "
                  f"{', '.join(config.methods)} x seeds {', '.join(map(str, config.seeds))} on {config.cohort}")
        _say(progress, f"report written in {time.perf_counter() - start:.1f} s: {result.report}")
    else:
        result.report = out / HTML_NAME
    return result

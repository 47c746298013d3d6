"""The Ray executor of a study (``embedkit study --executor ray``): every step of the plan is a Ray task.

Each step (the cohort, an embedding group, one head run, one LoRA/FT run) becomes a task with its resource request
(:func:`step_resources`: a GPU where the step streams images through a tower on a cluster with GPUs, CPUs for its
DataLoader workers, memory) and runs the very code the in-process executor runs (``run._run_one``). A step's
task takes its model's embedding task as an argument, so Ray starts it once the vectors are stored; embeddings of
different models, and every head and fine-tune, run wherever the cluster has room.

Retries and idempotence: a task whose worker dies (killed, out of memory, node lost) or that fails on I/O is run
again, up to :data:`STEP_RETRIES` times. A task may therefore run twice, even after its first attempt committed.
It is made idempotent the way the in-process runner skips done steps: it first rebuilds the study's step keys from
the stored runs (``plan.study_runs``) and returns the stored run when its key is there; runs are committed through
:meth:`Store.write_runs` (atomic, and a run whose fingerprint is stored is not stored again); embedding resumes by
itself (rows already embedded are skipped); a fine-tune has a deterministic run id and resumes from its checkpoint.

Ray is imported only here, and only when asked for: the default executor needs no Ray.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.store.store import Store
from embedkit.study.config import GPU_METHODS, RUN_KINDS, StudyConfig, StudyError
from embedkit.study.plan import Step, step_key, step_settings, study_runs

STEP_RETRIES = 3  # attempts after the first, for a dead worker or an I/O failure (Ray's max_retries)
GIB = 1024 ** 3
# Memory asked per step (bytes): full-size towers, tiny test configurations. Rough, like the plan's speed table.
STEP_MEMORY = {False: {"cohort": 1 * GIB, "embed": 4 * GIB, "head": 1 * GIB, "train": 8 * GIB},
               True: {"cohort": GIB // 4, "embed": GIB // 4, "head": GIB // 4, "train": GIB // 4}}
IMAGE_KINDS = ("embed",) + GPU_METHODS  # steps that stream images through a model (a GPU, where the cluster has one)
# Test hook, like the store's EMBEDKIT_FAULT: "KIND:WHEN:MARKER[,...]" makes the first task of that step kind
# (lp, embed, ...) exit its worker abruptly ``before`` or ``after`` the step's work (after = its run is committed),
# once: the marker file records that it did. tests/test_study_ray.py uses it to kill a worker mid-task.
FAULT_STEP_ENV = "EMBEDKIT_FAULT_STEP"


def _ray():
    """Ray itself, or a StudyError saying how to get it."""
    try:
        import ray
    except ImportError:
        raise StudyError("--executor ray needs Ray, which is not installed: `pip install 'embedkit[ray]'` (or use "
                         "the default --executor local)") from None
    return ray


def connect(address: str | None) -> dict:
    """Join the Ray cluster at ``address`` (``auto``, ``ray://host:10001``, ...), or start a local one when None and
    none is running (``$RAY_ADDRESS`` is honoured by Ray); returns what the cluster reports (:func:`cluster_facts`)."""
    ray = _ray()
    _check_reachable(address)
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"at {address}" if address else "(a local one)"
            raise StudyError(f"could not reach a Ray cluster {where}: {' '.join(str(exc).split())[:300]}; start one "
                             f"with `ray start --head` or pass --address") from None
    return cluster_facts()


REACH_TIMEOUT_S = 5.0


def _check_reachable(address: str | None) -> None:
    """A ``host:port`` (or ``ray://host:port``) address that takes no TCP connection is one error line at once;
    Ray itself would retry it for minutes, logging as it goes. ``auto`` and None are left to Ray."""
    import socket

    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise StudyError(f"--address '{address}' is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise StudyError(f"could not reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
                         "`ray start --head` there, or check the address") from None


def cluster_facts() -> dict:
    """{'cpus', 'gpus', 'memory' (bytes), 'nodes'} of the running Ray cluster, plus the largest node's figures
    (``node_cpus``, ``node_gpus``, ``node_memory``): a task must fit on one node."""
    ray = _ray()
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return {"cpus": float(total.get("CPU", 0)), "gpus": float(total.get("GPU", 0)),
            "memory": float(total.get("memory", 0)), "nodes": len(nodes),
            "node_cpus": max((n.get("CPU", 0) for n in nodes), default=0.0),
            "node_gpus": max((n.get("GPU", 0) for n in nodes), default=0.0),
            "node_memory": max((n.get("memory", 0) for n in nodes), default=0.0)}


def step_resources(step: Step, config: StudyConfig, gpus: bool) -> dict:
    """The Ray resource request of ``step``: ``num_gpus`` 1 where it streams images and the cluster has GPUs (and
    the study does not ask for ``--device cpu``), ``num_cpus`` its DataLoader workers (at least 1), ``memory``."""
    from embedkit.models.registry import get_spec

    tiny = get_spec(step.model).tiny if step.model else True
    cuda = gpus and step.kind in IMAGE_KINDS and config.device != "cpu"
    group = ("cohort" if step.kind == "cohort" else "embed" if step.kind == "embed"
             else "train" if step.kind in GPU_METHODS else "head")
    cpus = max(1, config.workers) if step.kind in IMAGE_KINDS else 1
    return {"num_cpus": cpus, "num_gpus": 1 if cuda else 0, "memory": STEP_MEMORY[tiny][group]}


def check_fits(steps: list[Step], config: StudyConfig, facts: dict) -> None:
    """Refuse, before anything runs, a step whose request no node of the cluster can meet (Ray would wait for it
    for ever)."""
    for step in steps:
        want = step_resources(step, config, facts["gpus"] > 0)
        short = [f"{need:g} {name}" for name, need, have in
                 (("CPU(s)", want["num_cpus"], facts["node_cpus"]), ("GPU(s)", want["num_gpus"], facts["node_gpus"]),
                  ("GiB of memory", want["memory"] / GIB, facts["node_memory"] / GIB)) if need > have]
        if short:
            raise StudyError(f"step '{step.label()}' asks for {', '.join(short)}, more than any node of the Ray "
                             f"cluster has ({facts['node_cpus']:g} CPUs, {facts['node_gpus']:g} GPUs, "
                             f"{facts['node_memory'] / GIB:.1f} GiB): lower --workers or add a larger node")


# ---- the wall-time estimate ---------------------------------------------------------------------------------------


def _parent(step: Step, todo: list[Step]) -> int | None:
    """Index in ``todo`` of the step ``step`` waits for: the cohort for an embedding, its model's embedding for a
    run step (when that is to do too), the embedding's cohort otherwise."""
    for i, other in enumerate(todo):
        if step.kind == "embed" and other.kind == "cohort":
            return i
        if step.kind in RUN_KINDS and other.kind == "embed" and other.model == step.model:
            return i
    if step.kind in RUN_KINDS:
        return next((i for i, o in enumerate(todo) if o.kind == "cohort"), None)
    return None


def estimate_wall(todo: list[Step], config: StudyConfig, facts: dict) -> float | None:
    """Estimated wall time of ``todo`` on the cluster: steps started in plan order as soon as their parent is done
    and their request fits in the cluster's free CPUs and GPUs (a list schedule). None if a step has no estimate."""
    if any(s.estimate_s is None for s in todo):
        return None
    gpus = facts["gpus"] > 0
    size = {"num_cpus": max(facts["cpus"], 1.0), "num_gpus": facts["gpus"]}
    free = dict(size)
    # a request larger than the whole cluster is refused by check_fits; clamp it so the estimate still ends
    want = [{k: min(step_resources(s, config, gpus)[k], size[k]) for k in size} for s in todo]
    parents = [_parent(s, todo) for s in todo]
    finish: dict[int, float] = {}
    running: list[tuple[float, int]] = []
    waiting = list(range(len(todo)))
    now = 0.0
    while waiting or running:
        for i in list(waiting):  # start, in plan order, every step that is ready and fits
            if (parents[i] is None or parents[i] in finish) and all(want[i][k] <= free[k] for k in free):
                for k in free:
                    free[k] -= want[i][k]
                running.append((now + todo[i].estimate_s, i))
                waiting.remove(i)
        if not running:
            return None
        running.sort()
        now, i = running.pop(0)
        finish[i] = now
        for k in free:
            free[k] += want[i][k]
    return now


# ---- the task ----------------------------------------------------------------------------------------------------


@dataclass
class StepOutcome:
    """What a step's task sends back to the driver."""

    step: Step
    attempt_skipped: bool  # the step was found done when the task started (an earlier attempt committed it)


def _fault(kind: str, when: str) -> None:
    spec = os.environ.get(FAULT_STEP_ENV)
    for item in (spec.split(",") if spec else []):
        want_kind, want_when, marker = item.split(":", 2)
        if (want_kind, want_when) == (kind, when) and not os.path.exists(marker):
            Path(marker).write_text(f"pid {os.getpid()}\n")
            os._exit(137)  # as a killed worker: no cleanup, no exception


def run_step_task(store_path: str, config: StudyConfig, step: Step, parent: StepOutcome | None) -> StepOutcome:
    """One step in a Ray worker: idempotent (a step already stored is returned as it is), then ``run._run_one``.
    ``parent``: the outcome of the step this one waits for (Ray passes it once that task is done)."""
    from embedkit.study.run import _run_one

    store = Store(store_path)
    if step.kind in RUN_KINDS:
        if step.weights_id is None:  # real weights first hashed by this model's embedding task
            weights_id = parent.step.weights_id if parent is not None else None
            step.weights_id = weights_id
            step.key = step_key(step.kind, step.model, weights_id, step.seed, step_settings(config, step.kind))
        existing = study_runs(store, config.name)
        if step.key in existing:
            step.status, step.run_id, step.note = "done", existing[step.key], ""
            return StepOutcome(step, True)
    _fault(step.kind, "before")
    start = time.perf_counter()
    _run_one(store, config, step, {}, progress=False)
    step.seconds = time.perf_counter() - start
    step.status = "done"
    _fault(step.kind, "after")
    return StepOutcome(step, False)


# ---- the driver --------------------------------------------------------------------------------------------------


def _failure(step: Step, exc: BaseException) -> Exception:
    """The error the driver raises for a step whose task failed: the step's own EmbedkitError where it raised one,
    else a StudyError naming the step and what happened."""
    ray = _ray()
    cause = getattr(exc, "cause", None)
    if isinstance(cause, EmbedkitError):
        return cause
    if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None:
        what = f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
    else:
        what = " ".join(str(exc).split())[:300]
    return StudyError(f"step '{step.label()}' failed on the Ray cluster ({what}; a dead worker or an I/O error is "
                      f"retried {STEP_RETRIES} times); the steps that finished are stored: run the same command "
                      f"again to continue")


def run_steps(store: Store, config: StudyConfig, todo: list[Step], facts: dict, say) -> list[Step]:
    """Run ``todo`` (in plan order) as Ray tasks; returns the steps that completed, in the order they finished.

    The cohort task runs first; an embedding task starts after it; a run step's task is given its model's
    embedding task (Ray starts it when that one is done). Every task is retried on a dead worker or an I/O error.
    """
    ray = _ray()
    check_fits(todo, config, facts)
    gpus = facts["gpus"] > 0
    task = ray.remote(run_step_task)
    store_path = str(Path(store.path).resolve())
    if any(s.kind == "embed" for s in todo):
        _shared_tables(store)
    pending: dict = {}
    embeds: dict[str, object] = {}
    cohort_ref = None
    for step in todo:
        options = {**step_resources(step, config, gpus), "max_retries": STEP_RETRIES,
                   "retry_exceptions": [OSError, RuntimeError]}
        if step.kind == "cohort":
            after = None
        elif step.kind == "embed":
            after = cohort_ref
        else:
            after = embeds.get(step.model, cohort_ref)
        # The last argument is the task the step waits for: Ray starts this one with that one's outcome.
        ref = task.options(**options).remote(store_path, config, step, after)
        pending[ref] = step
        if step.kind == "cohort":
            cohort_ref = ref
        elif step.kind == "embed":
            embeds[step.model] = ref
    finished: list[Step] = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        step = pending.pop(ref)
        try:
            outcome = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - ray wraps the task's exception; sorted out in _failure
            for other in pending:
                ray.cancel(other)
            raise _failure(step, exc) from None
        done = outcome.step
        for field in ("status", "run_id", "weights_id", "key", "note", "seconds"):
            setattr(step, field, getattr(done, field))
        finished.append(step)
        say(f"[green]done[/green] {step.label()}" + (f" ({step.seconds:.1f} s)" if step.seconds else "")
            + (f": run {step.run_id}" if step.run_id else "") + (" (found stored)" if outcome.attempt_skipped else ""))
    return finished


def _shared_tables(store: Store) -> None:
    """Create the small tables every embedding pass upserts into (weights, embedding settings) before the parallel
    embedding tasks start: two passes creating one table at the same moment would race."""
    from embedkit.embed import SETTINGS_TABLE
    from embedkit.store import schemas

    store.ensure_table("weights", schemas.WEIGHTS)
    store.ensure_table(SETTINGS_TABLE, schemas.EMBEDDING_SETTINGS)

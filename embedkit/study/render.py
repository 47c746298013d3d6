"""Showing a study: its plan as lines of text, durations rounded for reading (every time shown is an estimate)."""

from __future__ import annotations

from embedkit.device import has_gpu
from embedkit.study.run import StudyResult


def duration(seconds: float) -> str:
    """``~40 s``, ``~12 min``, ``~3.5 h``: an estimate, rounded to what it can tell."""
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def plan_lines(result: StudyResult) -> list[str]:
    """The plan as text: every step with its status and why, then the estimated time of what is to do."""
    config = result.config
    lines = [f"study '{config.name}': {len(config.models)} model(s) x {', '.join(config.methods)} x seeds "
             f"{', '.join(map(str, config.seeds))} on cohort '{config.cohort}' "
             f"({'random-init weights' if config.random_init else 'released weights'})"]
    waiting: dict[str, int] = {}
    for step in result.steps:
        if step.status == "blocked" and step.note.startswith("waits for"):
            waiting[step.note] = waiting.get(step.note, 0) + 1  # one line per cause, not one per step
            continue
        estimate = ""
        if step.estimate_s and step.status in ("todo", "skipped"):
            where = " on the CPU" if step.status == "skipped" else ""
            estimate = f"  [estimate{where} {duration(step.estimate_s)}]"
        note = f"  ({step.note})" if step.note else ""
        lines.append(f"  {step.status:<8} {step.label()}{note}{estimate}")
    for note, n in waiting.items():
        lines.append(f"  blocked  {n} more step(s): {note}")
    todo = result.todo
    counts = (f"{len(result.done)} done, {len(todo)} to do, {len(result.skipped)} skipped"
              + (f", {len(result.blocked)} blocked" if result.blocked else ""))
    if result.nothing_to_do:
        lines.append(f"nothing to do: {counts}" + (" (the skipped steps need a GPU or --cpu-ok)"
                                                     if result.skipped else ""))
    else:
        lines.append(counts)
    if todo:
        known = [s.estimate_s for s in todo if s.estimate_s is not None]
        unknown = len(todo) - len(known)
        lines.append(f"estimated time of the steps to do: {duration(sum(known))} (rough estimates from images x "
                     f"a per-model images/s figure for {'GPU' if has_gpu(config.device) else 'CPU'}"
                     + (f"; {unknown} step(s) not estimated until the cohort is imported" if unknown else "") + ")")
    if todo and result.cluster is not None:
        lines.append(_cluster_line(result))
    if result.blocked:
        lines.append("blocked steps must be fixed before the study can run (see their notes)")
    return lines


def _cluster_line(result: StudyResult) -> str:
    """The Ray executor's estimate: the steps to do scheduled on the resources the cluster reports."""
    c = result.cluster
    where = (f"the Ray cluster ({c['nodes']} node{'s' * (c['nodes'] != 1)}, {c['cpus']:g} CPUs, {c['gpus']:g} GPUs, "
             f"{c['memory'] / 1024 ** 3:.0f} GiB)")
    if result.wall_estimate_s is None:
        return f"estimated wall time on {where}: not estimated until the cohort is imported"
    return (f"estimated wall time on {where}: {duration(result.wall_estimate_s)} (steps run in parallel as "
            f"their resource requests fit; same rough per-step figures)")

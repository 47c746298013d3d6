"""`embedkit study`: the paper's whole experiment matrix (models x regimes x seeds) as one resumable command.

A study is named (its ``study_id`` is the name). Running it works out what is missing, in order:

1. the cohort: imported? (``nih6x200`` / ``nih6x200-paper`` are imported from ``images``; ``synthetic`` is drawn
   from the shipped nih6x200 manifest into ``<store>/synthetic-images``; anything else must be imported first);
2. each model embedded with the study's weights for every cohort row;
3. the heads off the stored vectors: zero-shot once per model (it has no seed), lp and mlp per seed;
4. LoRA and full fine-tuning per model and seed (GPU regimes: skipped on a CPU-only machine unless ``cpu_ok``).

Every run a study makes carries ``study_id``; a step is done when the study holds a run with the same step key
(method | model | weights_id | seed | hash of the settings that decide the result). Runs are written atomically
(predictions first, then the ``runs`` row that makes them visible) and embedding resumes by itself, so a killed
study leaves no half-done step visible and a re-run does only what is missing. Fine-tuning steps get a
deterministic run id, so a killed fine-tune continues from its last checkpointed epoch.

When every step is done, the report of exactly this matrix is written (:func:`embedkit.report.build_report`).
The ``studies`` table records each study's matrix and settings (and the study file's text, when one was given).

Modules: :mod:`~embedkit.study.config` (the settings, study files), :mod:`~embedkit.study.plan` (steps, their
status, the speed table behind the estimates), :mod:`~embedkit.study.run` (the executor, the ``studies`` table),
:mod:`~embedkit.study.render` (the plan as text). See docs/study.md.
"""

from embedkit.study.config import (
    FILE_KEYS,
    GPU_METHODS,
    HEAD_METHODS,
    PAPER_MODELS,
    STUDY_METHODS,
    StudyConfig,
    StudyError,
    make_config,
    read_study_file,
)
from embedkit.study.plan import Step, plan_study, step_key
from embedkit.study.render import plan_lines
from embedkit.study.run import StudyResult, run_study, stored_study

__all__ = [
    "FILE_KEYS",
    "GPU_METHODS",
    "HEAD_METHODS",
    "PAPER_MODELS",
    "STUDY_METHODS",
    "Step",
    "StudyConfig",
    "StudyError",
    "StudyResult",
    "make_config",
    "plan_lines",
    "plan_study",
    "read_study_file",
    "run_study",
    "step_key",
    "stored_study",
]

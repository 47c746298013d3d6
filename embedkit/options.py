"""Option types of the command line: the fixed choices (str Enums, so --help lists them and Typer refuses the rest),
defaults read from the library, and ``--by``.

The choices are built from embedkit.constants, where the library reads the same tuples (light to import:
`embedkit --help` never waits for torch).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from enum import Enum
from typing import Any, Optional

import typer

from embedkit.constants import (AMP_MODES, FINETUNE_METHODS, HEADS, LORA_PRESETS, LR_SCHEDULES, RUN_METHODS,
                                SCORED_SPLITS, TASKS)


def _choices(name: str, values: tuple[str, ...], doc: str) -> type[Enum]:
    choice = Enum(name, [(v, v) for v in values], type=str)
    choice.__doc__ = doc
    return choice


Split = _choices("Split", SCORED_SPLITS, "A split predictions were scored on (none: rows the cohort gives no split).")
Head = _choices("Head", HEADS, "A trained head off the stored vectors.")
Method = _choices("Method", RUN_METHODS, "What produced a run: a filter of `runs`, `fairness` and `report`.")
FinetuneMethod = _choices("FinetuneMethod", FINETUNE_METHODS, "Fine-tuning regimes.")
Schedule = _choices("Schedule", LR_SCHEDULES, "Learning-rate schedules of fine-tuning.")
Amp = _choices("Amp", AMP_MODES, "Autocast modes on CUDA (fine-tuning, the embedding pass).")
LoraPreset = _choices("LoraPreset", LORA_PRESETS, "Where LoRA goes, how it is scaled, what the head reads.")
Task = _choices("Task", TASKS, "What a head predicts: one class per image, or each label of its label list.")


def task_option():
    """``--task``: multiclass or multilabel; by default the cohort's (multi-label when a row lists several labels)."""
    return typer.Option(None, help="multiclass | multilabel (default: the cohort's; multi-label when a row lists "
                                   "several labels, docs/multilabel.md)")


def threshold_rule_option():
    """``--threshold-rule``: how multi-label runs choose each label's threshold on val (never on test)."""
    return typer.Option("max_f1", help="Multi-label: per-label threshold chosen on val: max_f1 | fpr@X (e.g. "
                                       "fpr@0.1)")


class Ensemble(str, Enum):
    """How zero-shot combines a class's prompts: every family's choices (``ModelFamily.ensembles``); a family
    refuses those its rule does not have."""

    embedding = "embedding"
    mean = "mean"
    max = "max"
    pair = "pair"


class LibraryDefault:
    """An option default that lives in the library: a dataclass field's or a function parameter's default, looked up
    when first needed (parsing that command, or its --help), so `embedkit --help` imports no model code.

    Pass it as the option's default: click calls a callable default when the option is not given, and Typer's
    help prints ``str()`` of it. A tuple of strings (a list default) reads as the comma-separated text the option
    takes.
    """

    def __init__(self, module: str, owner: str, name: str):
        self.module, self.owner, self.name = module, owner, name

    def __call__(self) -> Any:
        owner = getattr(importlib.import_module(self.module), self.owner)
        if dataclasses.is_dataclass(owner):
            value = owner.__dataclass_fields__[self.name].default
        else:
            value = inspect.signature(owner).parameters[self.name].default
        if value is inspect.Parameter.empty or value is dataclasses.MISSING:
            raise LookupError(f"{self.module}.{self.owner}.{self.name} has no default")
        return ",".join(value) if isinstance(value, (tuple, list)) else value

    def __str__(self) -> str:
        value = self()
        return str(value.value if isinstance(value, Enum) else value)

    __repr__ = __str__


def by_option(default: Optional[str], help: str) -> Any:
    """The ``--by`` option: attributes, comma-separated; a cell as ``a*b`` (embedkit.fairness.attributes)."""
    return typer.Option(default, "--by", help=f"{help} Comma-separated attributes (columns of images: sex, "
                                              "age_group, view, ...), each sliced on its own; a cell of two or more "
                                              "as a*b, e.g. 'age_group*sex' or 'view*sex' (quoted for the shell).")


def parse_by(text: Optional[str]) -> list[str]:
    """``--by`` as attribute names; a bad cell is a usage error naming the option."""
    from embedkit.fairness.attributes import parse_by as parse
    from embedkit.fairness.db import FairnessError

    try:
        return parse(text)
    except FairnessError as exc:
        raise typer.BadParameter(str(exc), param_hint="--by") from None

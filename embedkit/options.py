"""Option types of the command line: the fixed choices (str Enums, so --help lists them and Typer refuses the rest),
defaults read from the library, and ``--by``.

The choices are the library's tuples (``embedkit.heads.probe.HEADS``, ``embedkit.finetune.train.METHODS``, ...)
written out again: those modules import torch, which `embedkit --help` must not wait for. tests/test_cli.py checks
that each Enum equals its tuple.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from enum import Enum
from typing import Any, Optional

import typer

from embedkit.constants import SPLITS

# A cohort's splits (embedkit.constants.SPLITS, light to import: the Enum is built from it).
Split = Enum("Split", [(s, s) for s in SPLITS], type=str)


class Head(str, Enum):
    """A trained head (embedkit.heads.probe.HEADS)."""

    lp = "lp"
    mlp = "mlp"
    logreg = "logreg"


class Method(str, Enum):
    """What produced a run (embedkit.store.runs.METHODS): a filter of `runs`, `fairness` and `report`."""

    zeroshot = "zeroshot"
    lp = "lp"
    mlp = "mlp"
    logreg = "logreg"
    lora = "lora"
    ft = "ft"


class FinetuneMethod(str, Enum):
    """Fine-tuning regimes (embedkit.finetune.train.METHODS)."""

    lora = "lora"
    ft = "ft"


class Schedule(str, Enum):
    """Learning-rate schedules of fine-tuning (embedkit.finetune.train.SCHEDULES)."""

    cosine = "cosine"
    step = "step"
    constant = "constant"


class Amp(str, Enum):
    """Autocast modes of fine-tuning on CUDA (embedkit.finetune.train.AMP_MODES)."""

    bf16 = "bf16"
    fp16 = "fp16"
    none = "none"


class Ensemble(str, Enum):
    """How zero-shot combines a class's prompts: every family's choices (``ModelFamily.ensembles``); a family
    refuses those its rule does not have."""

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
    """The ``--by`` option: attributes, comma-separated; a cell of two as ``a*b`` (embedkit.fairness.attributes)."""
    return typer.Option(default, "--by", help=f"{help} Comma-separated attributes (columns of images: sex, "
                                              "age_group, view, ...), each sliced on its own; a cell of two as a*b, "
                                              "e.g. 'age_group*sex' (quoted for the shell).")


def parse_by(text: Optional[str]) -> list[str]:
    """``--by`` as attribute names; a bad cell is a usage error naming the option."""
    from embedkit.fairness.attributes import parse_by as parse
    from embedkit.fairness.db import FairnessError

    try:
        return parse(text)
    except FairnessError as exc:
        raise typer.BadParameter(str(exc), param_hint="--by") from None

"""Shared fixtures: a temporary store and a small cohort of images written on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from embedkit.constants import NIH_CLASSES

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`embedkit ARGS` through the console entry point (the one that turns errors into lines), in this process:
    (exit code, stdout, stderr)."""
    import sys

    from embedkit import cli

    monkeypatch.setattr(sys, "argv", ["embedkit", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.fixture
def store(tmp_path):
    from embedkit.store.store import Store

    return Store(tmp_path / "store")


def write_cohort_images(folder: Path, n_per_class: int = 4, size: int = 32, seed: int = 0) -> pd.DataFrame:
    """A small labelled cohort (every class x sex x age group x split) with random grayscale PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    splits = ["train", "train", "val", "test"]
    for c, label in enumerate(NIH_CLASSES):
        for k in range(n_per_class):
            image_id = f"{c:02d}{k:03d}_000.png"
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / image_id)
            rows.append({"image_id": image_id, "label": label, "age": 30 + 15 * (k % 4), "sex": "MF"[k % 2],
                         "view": "PA", "patient_id": f"p{c}{k}", "split": splits[k % 4]})
    return pd.DataFrame(rows)


@pytest.fixture
def small_cohort(tmp_path) -> tuple[pd.DataFrame, Path]:
    folder = tmp_path / "images"
    return write_cohort_images(folder), folder


@pytest.fixture
def one_thread():
    """One torch thread: on tiny matrices it is fastest, and CI shares its cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

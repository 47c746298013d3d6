"""Synthetic chest X-rays: bias specs, determinism, files, anatomy, and that the class signal is learnable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from embedkit.constants import AGE_OLD_FROM, NIH_CLASSES, age_group
from embedkit.data.synth import (
    BiasRule,
    BiasSpec,
    image_seed,
    parse_bias,
    render_image,
    synthesize,
)

PER_CLASS = 100  # 60 train + 40 test per class, half M half F, ages across both age groups
N_TRAIN = 60


def make_cohort(per_class: int = PER_CLASS, seed: int = 0) -> pd.DataFrame:
    """A cohort frame like the real ones: balanced classes, sexes alternating, ages spread over both groups."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in NIH_CLASSES:
        for k in range(per_class):
            age = int(rng.integers(20, 90))
            rows.append(
                {
                    "image_id": f"{len(rows):08d}_000.png",
                    "label": label,
                    "age": age,
                    "sex": "MF"[k % 2],
                    "age_group": age_group(age),
                    "view": "PA" if k % 3 else "AP",
                    "split": "train" if k < N_TRAIN else "test",
                }
            )
    return pd.DataFrame(rows)


def pixels(paths: list[str]) -> np.ndarray:
    """The linear-probe proxy's features: images box-downsampled to 32 x 32, flattened, in [0, 1]."""
    small = [Image.open(p).resize((32, 32), Image.Resampling.BOX) for p in paths]
    return np.stack([np.asarray(im, dtype=np.float32).ravel() / 255.0 for im in small])


def probe(cohort: pd.DataFrame, out: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Fit logistic regression on the train rows; return (test rows mask, correct per test row)."""
    frame = cohort.merge(out[["image_id", "path"]], on="image_id")
    x = pixels(frame["path"].tolist())
    y = frame["label"].map(NIH_CLASSES.index).to_numpy()
    train = (frame["split"] == "train").to_numpy()
    with threadpool_limits(1):  # BLAS threads on a small, shared machine only slow this fit down
        clf = LogisticRegression(C=1.0, max_iter=3000).fit(x[train], y[train])
    return ~train, clf.predict(x[~train]) == y[~train]


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    return make_cohort()


@pytest.fixture(scope="module")
def clean(cohort: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return synthesize(cohort, tmp_path_factory.mktemp("clean"), size=64, seed=3, workers=2)


# --- bias specs ----------------------------------------------------------------------------------------------


def test_parse_bias_builds_rules_and_round_trips() -> None:
    spec = parse_bias("sex=F:signal=0.3;age_group=old:label_noise=0.4")
    assert spec.rules == (
        BiasRule("sex", "F", "signal", 0.3),
        BiasRule("age_group", "old", "label_noise", 0.4),
    )
    assert str(spec) == "sex=F:signal=0.3;age_group=old:label_noise=0.4"
    assert parse_bias(str(spec)) == spec
    # Whitespace and number spelling are normalised; the canonical string still parses back to the same spec.
    loose = parse_bias(" view = AP : signal = 0.50 ; sex=M:label_noise=1 ")
    assert str(loose) == "view=AP:signal=0.5;sex=M:label_noise=1"
    assert parse_bias(str(loose)) == loose
    odd = BiasSpec((BiasRule("sex", "F", "signal", 0.1234567890123),))
    assert parse_bias(str(odd)) == odd


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sex=F",
        "sex=F:signal",
        "sex:signal=0.3",
        "=F:signal=0.3",
        "sex=:signal=0.3",
        "sex=F:gain=0.3",
        "sex=F:signal=1.5",
        "sex=F:signal=-0.1",
        "sex=F:signal=nan",
        "sex=F:signal=abc",
        "sex=F:signal=0.3;",
        "sex=F:signal=0.3:label_noise=0.1",
        "sex=F=M:signal=0.3",
    ],
)
def test_parse_bias_rejects_bad_specs_with_the_syntax(bad: str) -> None:
    with pytest.raises(ValueError, match="expected 'column=value:effect=amount'"):
        parse_bias(bad)


# --- rendering -------------------------------------------------------------------------------------------------


def patch(img: np.ndarray, x: float, y: float, half: int = 4) -> float:
    """Mean of a small square around the fractional position (x, y)."""
    n = img.shape[0]
    r, c = int(y * n), int(x * n)
    return float(img[r - half : r + half + 1, c - half : c + half + 1].mean())


@pytest.mark.parametrize("size", [64, 256, 512])
def test_render_image_shape_and_anatomy(size: int) -> None:
    imgs = [render_image(k % 6, 30 + 7 * k, "MF"[k % 2], image_seed(1, f"a{k}"), size=size) for k in range(6)]
    for img in imgs:
        assert img.shape == (size, size) and img.dtype == np.uint8
    half = max(1, size // 64)
    mean = {  # averaged over images so one random pose or pattern cannot decide
        name: np.mean([patch(img, x, y, half) for img in imgs])
        for name, (x, y) in {
            "corner": (0.03, 0.03),
            "right_lung": (0.28, 0.38),
            "left_lung": (0.72, 0.38),
            "mediastinum": (0.5, 0.5),
            "abdomen": (0.3, 0.93),
        }.items()
    }
    assert mean["corner"] < 40  # dark background
    assert mean["corner"] + 20 < mean["right_lung"] < mean["mediastinum"] - 40
    assert mean["left_lung"] < mean["mediastinum"] - 40
    assert mean["abdomen"] > mean["right_lung"] + 40  # below the diaphragm: soft tissue, no air


def test_signal_zero_carries_no_class_information() -> None:
    seed = image_seed(0, "00000042_000.png")
    blank = [render_image(c, 70, "F", seed, size=64, signal=0.0) for c in range(len(NIH_CLASSES))]
    assert all(np.array_equal(blank[0], other) for other in blank[1:])
    full = [render_image(c, 70, "F", seed, size=64, signal=1.0) for c in range(len(NIH_CLASSES))]
    diffs = [np.abs(f.astype(int) - blank[0]).mean() for f in full]
    assert min(diffs) > 0.2  # every class pattern changes the image


def test_age_and_sex_change_the_image() -> None:
    def stats(age: int, sex: str) -> tuple[float, float, float]:
        contrast, grain, width = [], [], []
        for k in range(8):
            img = render_image(1, age, sex, image_seed(5, f"s{k}"), size=128, signal=0.0).astype(float)
            contrast.append(patch(img, 0.5, 0.5) - patch(img, 0.28, 0.4))
            grain.append(np.std(img[40:80, 30:50] - np.roll(img[40:80, 30:50], 1, axis=1)))  # pixel-scale noise
            body = np.flatnonzero(img[75:80].mean(axis=0) > 22)  # body silhouette at mid-chest
            width.append(body.max() - body.min())
        return float(np.mean(contrast)), float(np.mean(grain)), float(np.mean(width))

    young_m, old_m, young_f = stats(30, "M"), stats(80, "M"), stats(30, "F")
    assert young_m[0] > old_m[0] + 5  # older: lower contrast
    assert old_m[1] > young_m[1] * 1.3  # older: more grain
    assert young_m[2] > young_f[2] + 4  # women: narrower chest
    assert old_m[2] > young_m[2] + 4  # older: broader chest


@pytest.mark.parametrize("bad", [{"label_index": 6}, {"age": -1}, {"sex": "X"}, {"size": 32}, {"signal": 1.5}])
def test_render_image_rejects_bad_inputs(bad: dict) -> None:
    args = {"label_index": 0, "age": 50, "sex": "M", "rng_seed": 1, "size": 64, "signal": 1.0} | bad
    with pytest.raises(ValueError):
        render_image(**args)


# --- synthesize: files, determinism, bias bookkeeping ------------------------------------------------------------


def test_synthesize_writes_each_image_once_named_by_image_id(tmp_path: Path) -> None:
    cohort = pd.DataFrame(
        {
            "image_id": ["00000001_000.png", "00000002_001.png", "00000001_000.png", "patientX"],
            "label": ["Edema", "Effusion", "Edema", 3],
            "age": [70, 30, 70, 45],
            "sex": ["F", "M", "F", "M"],
        }
    )
    out = synthesize(cohort, tmp_path / "imgs", size=96, seed=1)
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == [
        "00000001_000.png",
        "00000002_001.png",
        "patientX.png",
    ]
    assert out["image_id"].tolist() == ["00000001_000.png", "00000002_001.png", "patientX"]
    assert out["label"].tolist() == ["Edema", "Effusion", "Edema"]
    assert out["pattern"].tolist() == out["label"].tolist() and not out["biased"].any()
    for path in out["path"]:
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (96, 96)


def test_synthesize_is_byte_identical_for_same_seed(tmp_path: Path) -> None:
    cohort = make_cohort(per_class=4)  # 24 images: enough to use the worker pool
    a = synthesize(cohort, tmp_path / "a", size=64, seed=7, workers=1)
    b = synthesize(cohort, tmp_path / "b", size=64, seed=7, workers=2)
    c = synthesize(cohort, tmp_path / "c", size=64, seed=8, workers=1)
    same = [Path(pa).read_bytes() == Path(pb).read_bytes() for pa, pb in zip(a["path"], b["path"])]
    assert all(same) and len(same) == 24
    assert sum(Path(pa).read_bytes() != Path(pc).read_bytes() for pa, pc in zip(a["path"], c["path"])) == 24
    # An image depends on (seed, image_id) only, not on which other rows the cohort holds.
    d = synthesize(cohort.iloc[::-1].head(5), tmp_path / "d", size=64, seed=7)
    for image_id, path in zip(d["image_id"], d["path"]):
        assert Path(path).read_bytes() == (tmp_path / "a" / image_id).read_bytes()


def test_synthesize_rejects_bad_cohorts(tmp_path: Path) -> None:
    good = make_cohort(per_class=1)
    with pytest.raises(ValueError, match="lacks column"):
        synthesize(good.drop(columns="sex"), tmp_path)
    conflicting = pd.concat([good, good.head(1).assign(age=99)])
    with pytest.raises(ValueError, match="differing"):
        synthesize(conflicting, tmp_path)
    with pytest.raises(ValueError, match="file names"):
        synthesize(good.assign(image_id="../escape"), tmp_path)
    with pytest.raises(ValueError, match="neither one of"):
        synthesize(good.assign(label="Pneumonia"), tmp_path)
    with pytest.raises(ValueError, match="lacks"):
        synthesize(good, tmp_path, bias=parse_bias("scanner=GE:signal=0.5"))
    assert not any(tmp_path.iterdir())  # nothing written on bad input


def test_a_failing_worker_raises_with_its_error(tmp_path: Path) -> None:
    cohort = make_cohort(per_class=4)
    (tmp_path / cohort["image_id"].iloc[5]).mkdir()  # a directory where a PNG must go: that worker fails
    with pytest.raises(ValueError, match="worker.*failed.*Error"):
        synthesize(cohort, tmp_path, size=64, workers=2)
    assert not list(tmp_path.glob("*.tmp*"))  # no half-written files left behind


def test_label_noise_hits_exactly_the_fraction_of_the_selected_group(tmp_path: Path) -> None:
    cohort = make_cohort(per_class=10).drop(columns="age_group")  # age_group is derived from age
    bias = parse_bias("age_group=old:label_noise=0.5")
    out = synthesize(cohort, tmp_path / "a", size=64, seed=2, bias=bias, workers=1)
    old = (cohort["age"] >= AGE_OLD_FROM).to_numpy()
    assert out["biased"].to_numpy()[old].sum() == round(0.5 * old.sum())
    assert not out["biased"].to_numpy()[~old].any()
    # Biased rows show another class's pattern; every other row shows its own.
    assert (out["pattern"] != out["label"]).to_numpy().tolist() == out["biased"].tolist()
    assert (out["signal"] == 1.0).all()
    again = synthesize(cohort, tmp_path / "b", size=64, seed=2, bias=bias, workers=1)
    assert again["pattern"].tolist() == out["pattern"].tolist()


def test_signal_bias_scales_only_the_selected_rows(tmp_path: Path) -> None:
    cohort = make_cohort(per_class=2)
    out = synthesize(cohort, tmp_path, size=64, seed=2, bias=parse_bias("sex=F:signal=0.3;view=AP:signal=0.5"))
    expected = np.where(cohort["sex"] == "F", 0.3, 1.0) * np.where(cohort["view"] == "AP", 0.5, 1.0)
    assert np.allclose(out["signal"], expected)
    assert out["biased"].tolist() == (expected < 1.0).tolist()


# --- learnability (the cheap linear-probe proxy) ---------------------------------------------------------------


def test_class_signal_is_learnable(cohort: pd.DataFrame, clean: pd.DataFrame) -> None:
    _, correct = probe(cohort, clean)
    assert correct.mean() > 0.6, correct.mean()


def test_signal_zero_is_at_chance(cohort: pd.DataFrame, tmp_path: Path) -> None:
    out = synthesize(cohort, tmp_path, size=64, seed=3, workers=2, signal=0.0)
    _, correct = probe(cohort, out)
    assert correct.mean() < 0.35, correct.mean()


def test_planted_signal_bias_lowers_the_groups_accuracy(
    cohort: pd.DataFrame, clean: pd.DataFrame, tmp_path: Path
) -> None:
    out = synthesize(cohort, tmp_path, size=64, seed=3, workers=2, bias=parse_bias("sex=F:signal=0.2"))
    # The bias leaves the other group's images untouched, byte for byte.
    male = (cohort["sex"] == "M").to_numpy()
    assert all(Path(a).read_bytes() == Path(b).read_bytes() for a, b in zip(out["path"][male], clean["path"][male]))
    test_rows, correct = probe(cohort, out)
    female_test = (cohort["sex"] == "F").to_numpy()[test_rows]
    acc_f, acc_m = correct[female_test].mean(), correct[~female_test].mean()
    assert acc_m - acc_f > 0.2, (acc_m, acc_f)

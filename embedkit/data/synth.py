"""Synthetic chest X-rays: the demo's embedded default dataset and the test data, with optional planted bias.

Each image is a frontal (PA-like) radiograph drawn from simple shapes: a dark background, a body silhouette,
two dark lung fields cut by diaphragm domes, a mediastinum and heart shadow, clavicles, rib arcs, vascular
markings and grain. Age and sex change the anatomy and the image quality (older: lower contrast, more grain,
a broader chest, lower diaphragms, fainter ribs; female: narrower shoulders, smaller lungs, breast shadows).
One class pattern per image, loosely after the disease (class order of :data:`NIH_CLASSES`):

- Atelectasis: a wedge and a plate-like linear opacity at one base, with volume loss (raised hemidiaphragm,
  mediastinum pulled toward that side).
- Cardiomegaly: an enlarged heart shadow.
- Consolidation: a dense bright patch in one lobe.
- Edema: bilateral perihilar ("bat-wing") haze.
- Effusion: bright fluid with a meniscus at one base, blunting the costophrenic angle.
- Pneumothorax: a dark, markings-free rim at one apex/lateral edge behind a thin pleural line.

``signal`` scales the class pattern (0 draws exactly the same image whatever the label). All random draws
come from one generator seeded from (seed, image_id) with a stable hash, so files are byte-identical across
runs, processes and worker counts (for the same numpy and Pillow versions; float rounding may differ elsewhere).

A :class:`BiasSpec` plants a known unfairness in a subgroup: a weaker signal (``sex=F:signal=0.3``) or a
fraction of images showing another class's pattern than their label (``age_group=old:label_noise=0.4``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from embedkit.constants import AGE_MAX, AGE_MIN, NIH_CLASSES, NIH_FINDINGS, SEXES, age_group
from embedkit.errors import EmbedkitError

if TYPE_CHECKING:  # pandas is imported lazily: pool workers only need numpy and PIL
    import pandas as pd

N_CLASSES = len(NIH_CLASSES)
MIN_SIZE, MAX_SIZE = 64, 512
BIAS_EFFECTS: tuple[str, ...] = ("signal", "label_noise")
BIAS_SYNTAX = (
    "expected 'column=value:effect=amount' clauses joined by ';', each optionally ending ':label=NAME', effect one of "
    f"{', '.join(BIAS_EFFECTS)}, amount a number in [0, 1], NAME a finding whose pattern alone the rule changes, "
    "e.g. 'sex=F:signal=0.3', 'sex=F:signal=0.3;age_group=old:label_noise=0.4' or 'sex=F:signal=0:label=Effusion'"
)


class SynthError(EmbedkitError, ValueError):
    """Bad input to the synthetic image generator (cohort frame, size, label, age or sex)."""


class BiasSpecError(SynthError):
    """A bias specification string that does not parse."""


# ---------------------------------------------------------------------------------------------------------
# Planted bias
# ---------------------------------------------------------------------------------------------------------


def _fmt_amount(x: float) -> str:
    # repr is the shortest string that parses back to the same float; drop a trailing ".0" for readability.
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class BiasRule:
    """One clause: rows whose ``column`` equals ``value`` (compared as strings) get ``effect`` of ``amount``.

    With ``label`` the rule touches that class's pattern only: in a single-label cohort, rows of that label; in a
    multi-label cohort (:func:`synthesize_multilabel`), that finding's strength in every matching image.
    """

    column: str
    value: str
    effect: str
    amount: float
    label: str | None = None

    def __str__(self) -> str:
        scope = f":label={self.label}" if self.label else ""
        return f"{self.column}={self.value}:{self.effect}={_fmt_amount(self.amount)}{scope}"


@dataclass(frozen=True)
class BiasSpec:
    """A planted, known unfairness: one or more :class:`BiasRule` clauses.

    Rules combine: ``signal`` factors of every matching rule multiply; an image is label-noised when any
    ``label_noise`` rule selects it.
    """

    rules: tuple[BiasRule, ...]

    def __str__(self) -> str:
        return ";".join(str(rule) for rule in self.rules)


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_bias(spec: str) -> BiasSpec:
    """Parse ``"column=value:effect=amount[;...]"`` into a :class:`BiasSpec`; ``str()`` of the result parses back.

    Raises :class:`BiasSpecError` (a ValueError) naming the expected syntax when the string does not parse.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise BiasSpecError(f"empty bias spec: {BIAS_SYNTAX}")
    rules = []
    for clause in spec.split(";"):
        clause = clause.strip()
        parts = clause.split(":")
        if len(parts) not in (2, 3):
            raise BiasSpecError(f"bad bias clause {clause!r}: {BIAS_SYNTAX}")
        label = None
        if len(parts) == 3:
            key, _, label = (t.strip() for t in parts[2].partition("="))
            if key != "label" or label not in NIH_FINDINGS:
                raise BiasSpecError(f"bad label scope {parts[2]!r} in {clause!r} (findings: "
                                    f"{', '.join(NIH_FINDINGS)}): {BIAS_SYNTAX}")
        selector, effect_part = (p.strip() for p in parts[:2])
        if selector.count("=") != 1 or effect_part.count("=") != 1:
            raise BiasSpecError(f"bad bias clause {clause!r}: {BIAS_SYNTAX}")
        column, value = (s.strip() for s in selector.split("="))
        effect, amount_text = (s.strip() for s in effect_part.split("="))
        if not _NAME.match(column) or not value:
            raise BiasSpecError(f"bad selector {selector!r} in {clause!r}: {BIAS_SYNTAX}")
        if effect not in BIAS_EFFECTS:
            raise BiasSpecError(f"unknown bias effect {effect!r} in {clause!r}: {BIAS_SYNTAX}")
        try:
            amount = float(amount_text)
        except ValueError:
            raise BiasSpecError(f"bad amount {amount_text!r} in {clause!r}: {BIAS_SYNTAX}") from None
        if not (0.0 <= amount <= 1.0):  # also rejects nan
            raise BiasSpecError(f"amount {amount_text!r} in {clause!r} is outside [0, 1]: {BIAS_SYNTAX}")
        rules.append(BiasRule(column, value, effect, amount, label))
    return BiasSpec(tuple(rules))


# ---------------------------------------------------------------------------------------------------------
# Stable seeds
# ---------------------------------------------------------------------------------------------------------


def image_seed(seed: int, image_id: str, purpose: str = "image") -> int:
    """A 64-bit seed from (seed, image_id, purpose) by BLAKE2b: stable across processes, unlike ``hash()``."""
    digest = hashlib.blake2b(f"{int(seed)}\x1f{image_id}\x1f{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# ---------------------------------------------------------------------------------------------------------
# Rendering helpers (canonical, unrotated coordinates in [0, 1]; x to the image right, y down)
# ---------------------------------------------------------------------------------------------------------


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-mask of a signed distance (negative inside): 1 inside, 0 outside, a linear edge 4 * width wide.

    A ramp, not a sigmoid: as smooth to the eye at these sizes and several times cheaper (it runs ~25 times an image).
    """
    mask = np.multiply(d, -0.25 / width, dtype=np.float32)
    mask += 0.5
    return np.clip(mask, 0.0, 1.0, out=mask)


def _lerp(img: np.ndarray, target: float | np.ndarray, alpha: np.ndarray) -> None:
    """Blend ``img`` toward ``target`` by ``alpha`` in place (overlaying a denser structure)."""
    img += (target - img) * alpha


@dataclass(frozen=True)
class _Grid:
    """Canonical pixel grid: ``n`` pixels per unit, padded by ``margin`` so the final pose jitter never
    samples outside the drawing."""

    n: int
    margin: float
    xs: np.ndarray  # (1, N) x coordinates of pixel centres
    ys: np.ndarray  # (N, 1) y coordinates

    @classmethod
    def make(cls, n: int, margin: float) -> _Grid:
        pad = int(math.ceil(margin * n))
        coords = ((np.arange(n + 2 * pad, dtype=np.float32) + 0.5) / n - pad / n).astype(np.float32)
        return cls(n, pad / n, coords[None, :], coords[:, None])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.ys.shape[0], self.xs.shape[1])

    def box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """Row and column slices covering the coordinate box [x0, x1] x [y0, y1]."""
        size = self.xs.shape[1]

        def index(v: float) -> float:
            return (v + self.margin) * self.n - 0.5

        c0, c1 = max(0, math.floor(index(x0))), min(size, math.ceil(index(x1)) + 1)
        r0, r1 = max(0, math.floor(index(y0))), min(size, math.ceil(index(y1)) + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _segment(
    img: np.ndarray, g: _Grid, p0: tuple[float, float], p1: tuple[float, float],
    width: float, amp: float, amp_end: float | None = None,
) -> None:
    """Add a soft line from p0 to p1 (brightness ``amp`` fading linearly to ``amp_end``), in place.

    Only the segment's bounding box is computed: markings are many and thin.
    """
    pad = 3 * width
    rows, cols = g.box(min(p0[0], p1[0]) - pad, max(p0[0], p1[0]) + pad,
                       min(p0[1], p1[1]) - pad, max(p0[1], p1[1]) + pad)
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return
    x, y = g.xs[:, cols], g.ys[rows, :]
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    dist2 = (x - p0[0] - t * dx) ** 2 + (y - p0[1] - t * dy) ** 2
    gain = amp if amp_end is None else amp + (amp_end - amp) * t
    img[rows, cols] += gain * np.exp(-dist2 / (width * width))


def _lowfreq(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise of unit-ish amplitude: a cells x cells normal grid upsampled bicubically to ``shape``."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    resized = Image.fromarray(grid).resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float32)


def _draw_params(rng: np.random.Generator, age: float, sex: str) -> dict[str, Any]:
    """Every random draw of one image, in a fixed order that never depends on the label (signal 0 = no info)."""
    t = min(max((age - 20.0) / 65.0, 0.0), 1.0)  # 0 young adult .. 1 elderly
    female = sex == "F"
    u = rng.uniform
    p: dict[str, Any] = {"t": t, "female": female}
    # Anatomy: women narrower with smaller lungs; older patients a broader chest, hyperinflated lungs, lower
    # and flatter domes, a bigger aortic knob.
    p["shoulder"] = (0.41 if female else 0.455) + 0.015 * t + u(-0.012, 0.012)
    p["waist"] = (0.35 if female else 0.39) + 0.045 * t + u(-0.012, 0.012)
    p["lung_a"] = (0.145 if female else 0.158) + 0.012 * t + u(-0.008, 0.008)
    p["lung_b"] = 0.315 + 0.02 * t + u(-0.012, 0.012)
    p["lung_cy"] = 0.49 + u(-0.01, 0.01)
    p["dome_y"] = 0.735 + 0.035 * t + u(-0.015, 0.015)
    p["dome_h"] = 0.085 - 0.025 * t + u(-0.008, 0.008)
    p["heart_w"] = 0.13 + 0.01 * t + u(-0.01, 0.01)
    p["heart_h"] = 0.105 + u(-0.006, 0.006)
    p["heart_cx"] = 0.535 + u(-0.01, 0.01)
    p["aorta"] = 0.01 + 0.014 * t
    p["breast"] = (0.06 + 0.025 * (1 - t)) if female else 0.0
    p["breast_y"] = 0.72 + 0.04 * t + u(-0.02, 0.02)
    p["gastric"] = u(0.0, 1.0) < 0.6
    p["rib_alpha"] = 0.085 * (1.0 - 0.45 * t) * u(0.85, 1.15)  # osteopenia: fainter ribs
    p["rib_phase"] = u(-0.01, 0.01)
    # Vascular markings: per side, branches fanning out of the hilum (angle, length, bend, branch point).
    p["vessels"] = [
        [(u(-1.1, 1.25), u(0.12, 0.26), u(-0.6, 0.6), u(0.35, 0.7)) for _ in range(10)] for _ in range(2)
    ]
    # Image quality: contrast falls and grain rises with age; exposure varies for everyone.
    p["contrast"] = (1.0 - 0.32 * t) * u(0.92, 1.08)
    p["grain"] = 0.02 + 0.035 * t
    p["gamma"] = u(0.85, 1.15)
    p["pose"] = (u(-0.03, 0.03), u(-0.02, 0.02), u(-0.02, 0.02), u(0.97, 1.05))  # rotation, dx, dy, scale
    # Class patterns: all drawn for every image so the random stream does not depend on the label.
    p["atel_side"] = 1 if u() < 0.5 else -1
    p["atel_size"] = u(0.85, 1.2)
    p["cardio_scale"] = u(0.4, 0.55)
    p["cons_side"] = 1 if u() < 0.5 else -1
    p["cons_zone"] = u(0.25, 0.7)
    p["cons_lat"] = u(-0.3, 0.4)
    p["cons_r"] = u(0.075, 0.1)
    p["cons_blobs"] = [(u(-1, 1), u(-1, 1), u(0.5, 1.0)) for _ in range(5)]
    p["cons_bronchi"] = [(u(-0.6, 0.6), u(0.6, 1.1)) for _ in range(3)]  # air bronchograms: angle, length
    p["edema_w"] = u(0.9, 1.15)
    p["eff_side"] = 1 if u() < 0.5 else -1
    p["eff_height"] = u(0.15, 0.24)
    p["ptx_side"] = 1 if u() < 0.5 else -1
    p["ptx_depth"] = u(0.6, 0.72)
    p["ptx_extent"] = u(0.12, 0.3)
    return p


def _check_inputs(label_index: int, age: int, sex: str, size: int, signal: float) -> None:
    if not (0 <= int(label_index) < N_CLASSES):
        raise SynthError(f"label_index {label_index} is outside 0..{N_CLASSES - 1} (classes {NIH_CLASSES})")
    if age is None or not math.isfinite(float(age)) or not (AGE_MIN <= float(age) <= AGE_MAX):
        raise SynthError(f"age {age!r} is not a number in [{AGE_MIN}, {AGE_MAX}]")
    if sex not in SEXES:
        raise SynthError(f"sex {sex!r} is not one of {SEXES}")
    if not (MIN_SIZE <= int(size) <= MAX_SIZE):
        raise SynthError(f"size {size} is outside {MIN_SIZE}..{MAX_SIZE}")
    if not (0.0 <= float(signal) <= 1.0):
        raise SynthError(f"signal {signal} is outside [0, 1]")


_POSE_MARGIN = 0.07  # covers the largest rotation + shift + zoom-out of the pose jitter


def render_image(
    label_index: int, age: int, sex: str, rng_seed: int, size: int = 256, signal: float = 1.0,
    patterns: dict[str, float] | None = None,
) -> np.ndarray:
    """Draw one synthetic frontal chest X-ray as a ``size`` x ``size`` uint8 grayscale array.

    ``label_index`` indexes :data:`NIH_CLASSES` and picks the class pattern; ``signal`` in [0, 1] scales it
    (0: the image is identical whatever the label). ``rng_seed`` fixes every random draw (see :func:`image_seed`).
    ``patterns`` (multi-label images) replaces both: ``{class: strength}`` draws every named class's pattern at
    its own strength (an empty dict: no finding); ``{NIH_CLASSES[i]: signal}`` draws what ``label_index=i`` does.
    The image is the patient facing the viewer: the patient's right (side -1 below) is on the image's left.
    """
    _check_inputs(label_index, age, sex, size, signal)
    if patterns is None:
        patterns = {NIH_CLASSES[int(label_index)]: float(signal)}
    elif any(c not in NIH_CLASSES or not 0.0 <= float(v) <= 1.0 for c, v in patterns.items()):
        raise SynthError(f"patterns {patterns} must map classes of {NIH_CLASSES} to strengths in [0, 1]")
    n = int(size)
    strength = {c: float(patterns.get(c, 0.0)) for c in NIH_CLASSES}
    rng = np.random.default_rng(int(rng_seed))
    p = _draw_params(rng, float(age), sex)
    g = _Grid.make(n, _POSE_MARGIN)
    xs, ys = g.xs, g.ys
    ax = np.abs(xs - 0.5)

    # Volume loss of atelectasis raises one hemidiaphragm and pulls the mediastinum toward that side.
    atel = strength["Atelectasis"]
    shift = 0.02 * atel * p["atel_side"]

    # Body: neck, sloping shoulders, trunk; brightness follows the path length through an elliptic trunk.
    knots_y = [-0.1, 0.04, 0.1, 0.17, 0.25, 0.6, 1.1]
    knots_w = [0.09, 0.1, 0.27, p["shoulder"] * 0.96, p["shoulder"], p["waist"] + 0.02, p["waist"]]
    half_w = np.interp(ys[:, 0], knots_y, knots_w).astype(np.float32)[:, None]
    body = _soft(ax - half_w, 0.01)
    thick = np.sqrt(np.clip(1.0 - (ax / half_w) ** 2, 0.0, 1.0))
    img = 0.03 + body * (0.07 + 0.4 * thick)

    # Lungs: egg-shaped fields (narrow apex, square base) cut by the diaphragm domes.
    lungs = np.zeros(g.shape, dtype=np.float32)
    lung_side: dict[int, tuple[np.ndarray, float, float, float, float, np.ndarray]] = {}
    domes: dict[int, np.ndarray] = {}
    for side in (-1, 1):
        cx, cy, a, b = 0.5 + side * 0.2 + 0.3 * shift, p["lung_cy"], p["lung_a"], p["lung_b"]
        # The normalised radius r is computed only in the lung's box (r = 9 elsewhere): it is the costly part.
        rows, cols = g.box(cx - 1.4 * a, cx + 1.4 * a, cy - 1.2 * b, cy + 1.2 * b)
        x, y = xs[:, cols], ys[rows, :]
        v = (y - cy) / b
        a_eff = a * (1.0 + 0.16 * np.clip(v, -1.0, 1.0))
        uu, vv = np.abs(x - cx) / a_eff, np.abs(v)
        r = np.full(g.shape, 9.0, dtype=np.float32)
        r[rows, cols] = np.where(v < 0, np.sqrt(uu ** 2 + vv ** 2), np.sqrt(np.sqrt(uu ** 4 + vv ** 4)))
        dome_y = p["dome_y"] + (0.0 if side == -1 else 0.025)  # the right dome sits higher
        if p["atel_side"] == side:
            dome_y -= 0.08 * atel
        dome = dome_y - p["dome_h"] * np.clip(1.0 - ((xs - cx - side * 0.02) / (1.05 * a)) ** 2, 0.0, 1.0)
        mask = _soft((r - 1.0) * a, 0.005) * _soft(ys - dome, 0.004)
        lung_side[side] = (mask, cx, cy, a, b, r)
        domes[side] = dome
        lungs += mask
    lungs = np.clip(lungs, 0.0, 1.0)

    # Abdomen below the domes is denser (liver on the right); a gastric air bubble under the left dome.
    liver = _soft(domes[-1] + 0.01 - ys, 0.012) * _soft(xs - 0.5, 0.03)
    img += 0.05 * liver * body
    if p["gastric"]:
        gb = np.sqrt(((xs - 0.64) / 0.045) ** 2 + ((ys - domes[1] - 0.045) / 0.028) ** 2)
        img -= 0.1 * _soft(gb - 1.0, 0.15) * body

    # Lung parenchyma: air-dark, with a soft mottled texture and hilar shadows.
    texture = 0.02 * _lowfreq(rng, g.shape, 14)
    _lerp(img, 0.12 + texture, lungs * 0.95)
    markings = np.zeros(g.shape, dtype=np.float32)
    width = max(0.004, 0.8 / n)
    for k, side in enumerate((-1, 1)):
        _, cx, cy, a, _, _ = lung_side[side]
        hx, hy = 0.5 + side * 0.095 + 0.3 * shift, cy - 0.03
        markings += 0.09 * np.exp(-(((xs - hx - side * 0.01) / 0.03) ** 2 + ((ys - hy) / 0.05) ** 2))
        for ang, length, bend, frac in p["vessels"][k]:
            # Branches fan from up-lateral to down-lateral, mirrored per side; they start off the hilum's
            # centre so their sum does not pile up into a bright star there.
            dxn, dyn = math.cos(ang) * side, math.sin(ang) * 1.1
            sx, sy = hx + dxn * 0.03, hy + dyn * 0.03
            ex, ey = hx + dxn * length, hy + dyn * length
            _segment(markings, g, (sx, sy), (ex, ey), width * 1.5, 0.07, 0.012)
            mx, my = hx + dxn * length * frac, hy + dyn * length * frac
            bx = mx + math.cos(ang + bend) * side * length * 0.45
            by = my + math.sin(ang + bend) * 1.1 * length * 0.45
            _segment(markings, g, (mx, my), (bx, by), width, 0.04, 0.008)

    # Pneumothorax: the lung rim beyond a pleural line holds air only: dark, no markings.
    ptx = strength["Pneumothorax"]
    if ptx > 0:
        side = p["ptx_side"]
        mask, cx, cy, a, b, r = lung_side[side]
        lateral = (xs - cx) * side / a  # -1 medial .. +1 lateral
        upper = _soft(ys - (cy + p["ptx_extent"]), 0.03)
        sector = _soft(-(lateral + 0.55 - 0.9 * np.clip((cy - ys) / b, 0, 1)), 0.08) * upper
        rim = _soft(p["ptx_depth"] - r, 0.015) * sector * mask
        markings *= 1.0 - rim * ptx
        img += markings * lungs
        _lerp(img, 0.05, rim * 0.95 * ptx)
        img += 0.14 * ptx * np.exp(-(((r - p["ptx_depth"]) / 0.016) ** 2)) * sector * mask
    else:
        img += markings * lungs

    # Ribs: posterior arcs (up from the spine, then down laterally) and fainter, oblique anterior ones.
    thorax = np.zeros(g.shape, dtype=np.float32)
    for side in (-1, 1):
        _, _, _, a, _, r = lung_side[side]
        thorax += _soft((r - 1.1) * a, 0.01) * _soft(ys - domes[side] - 0.03, 0.015)
    thorax = np.clip(thorax, 0.0, 1.0)
    ribs = np.zeros(g.shape, dtype=np.float32)
    q = np.clip((ax - 0.03) / 0.4, 0.0, 1.0)
    arc = -0.03 * np.sin(np.pi * q * 0.8) + 0.17 * q ** 2.2  # posterior rib, relative to its height at the spine
    arc_a = 0.02 + 0.16 * (1.0 - q) ** 1.6  # anterior rib
    fade_a = 0.4 * _soft(0.3 - q, 0.03)
    rib_h = 0.0095
    for i in range(10):
        y0 = 0.14 + p["rib_phase"] + 0.058 * i
        rows, _ = g.box(0.0, 1.0, y0 - 0.05, y0 + 0.2)
        y = ys[rows] - y0
        ribs[rows] += np.exp(-(((y - arc) / rib_h) ** 2)) + fade_a * np.exp(-(((y - arc_a) / (rib_h * 0.9)) ** 2))
    img += p["rib_alpha"] * ribs * thorax * (0.5 + 0.5 * lungs)

    # Clavicles: bright bars from the shoulders to the sternal notch.
    for side in (-1, 1):
        _segment(img, g, (0.5 + side * 0.045, 0.17), (0.5 + side * 0.32, 0.12), 0.012, 0.12, 0.09)

    # Breast shadows over the lower lateral lung fields.
    if p["breast"] > 0:
        for side in (-1, 1):
            rb = np.sqrt(((xs - 0.5 - side * 0.25) / 0.17) ** 2 + ((ys - p["breast_y"]) / 0.12) ** 2)
            img += p["breast"] * _soft(rb - 1.0, 0.1) * body

    # Mediastinum with spine, trachea and aortic knob; then the heart.
    mid = xs - 0.5 - shift
    medw = 0.058 + 0.005 * p["t"] + np.clip((ys - 0.35) * 0.1, 0, None)
    med = _soft(np.abs(mid) - medw, 0.008) * _soft(0.02 - ys, 0.01)
    _lerp(img, 0.55, med * body)
    spine = _soft(np.abs(mid) - 0.03, 0.005) * (0.8 + 0.2 * np.cos(ys * 2 * np.pi / 0.046))
    img += 0.05 * spine * body
    img -= 0.11 * _soft(np.abs(mid) - 0.013, 0.004) * _soft(ys - 0.38, 0.02) * body  # tracheal air
    knob = np.sqrt(((mid - 0.05) / (0.03 + p["aorta"])) ** 2 + ((ys - 0.3) / 0.035) ** 2)
    _lerp(img, 0.57, _soft(knob - 1.0, 0.06) * body)

    cardio = strength["Cardiomegaly"]
    grow = 1.0 + p["cardio_scale"] * cardio
    hw, hh = p["heart_w"] * grow, p["heart_h"] * (1.0 + 0.35 * (grow - 1.0))
    hcx = p["heart_cx"] + 0.3 * (hw - p["heart_w"]) + shift
    hcy = p["lung_cy"] + 0.135 + 0.3 * (hh - p["heart_h"])
    rot = -0.5  # the heart's axis points down and to the patient's left (image right)
    hu = ((xs - hcx) * math.cos(rot) - (ys - hcy) * math.sin(rot)) / hw
    hv = ((xs - hcx) * math.sin(rot) + (ys - hcy) * math.cos(rot)) / hh
    heart = _soft(np.sqrt(hu ** 2 + hv ** 2) - 1.0, 0.04)
    _lerp(img, 0.6, heart * body)

    # The remaining class patterns (cardiomegaly, pneumothorax and atelectatic volume loss are above).
    if atel > 0:
        side = p["atel_side"]
        mask, cx, cy, a, b, _ = lung_side[side]
        sz = p["atel_size"]
        # Wedge of collapsed lower lobe: a triangle from the hilum widening down to the base.
        hx, hy = cx - side * 0.35 * a, cy + 0.02
        rel_x, rel_y = (xs - hx) * side, ys - hy
        wedge = _soft(-rel_y, 0.015) * _soft(rel_x - 1.1 * sz * rel_y, 0.012) * _soft(-0.1 * rel_y - rel_x, 0.012)
        _lerp(img, 0.56, wedge * mask * 0.9 * atel)
        # Plate-like band across the lower zone.
        yb = float(domes[side].min()) - 0.07
        _segment(img, g, (cx - side * 0.5 * a, yb + 0.03), (cx + side * 0.95 * a, yb - 0.025),
                 0.02 * sz, 0.2 * atel)
    if strength["Consolidation"] > 0:
        s = strength["Consolidation"]
        side = p["cons_side"]
        _, cx, cy, a, b, _ = lung_side[side]
        px = cx + side * p["cons_lat"] * a
        py = cy - b + p["cons_zone"] * 1.7 * b
        rad = p["cons_r"]
        patch = np.zeros(g.shape, dtype=np.float32)
        for jx, jy, wt in p["cons_blobs"]:
            d2 = (xs - px - jx * rad * 0.6) ** 2 + (ys - py - jy * rad * 0.6) ** 2
            patch = np.maximum(patch, wt * np.exp(-d2 / (rad * rad)))
        patch = np.clip(patch * 1.6, 0.0, 1.0) * lungs
        _lerp(img, 0.62, patch * 0.9 * s)
        # Air bronchograms: dark branching tubes inside the patch, pointing away from the hilum.
        tubes = np.zeros(g.shape, dtype=np.float32)
        for ang, length in p["cons_bronchi"]:
            start = (px - side * rad * 0.8, py)
            end = (start[0] + side * math.cos(ang) * rad * 1.6 * length, py + math.sin(ang) * rad * 1.6 * length)
            _segment(tubes, g, start, end, max(0.007, 1.2 / n), 0.1, 0.02)
        img -= np.minimum(tubes, 0.12) * patch * s
    if strength["Edema"] > 0:
        s = strength["Edema"]
        w = p["edema_w"]
        haze = np.zeros(g.shape, dtype=np.float32)
        for side in (-1, 1):
            cy = lung_side[side][2]
            haze += np.exp(-(((xs - 0.5 - side * 0.11) / (0.13 * w)) ** 2 + ((ys - cy) / (0.17 * w)) ** 2))
        _lerp(img, 0.5, lungs * (0.75 * np.clip(haze, 0.0, 1.0) + 0.12) * s)
        for side in (-1, 1):  # Kerley B lines: short horizontal lines at the lateral bases
            _, cx, _, a, _, _ = lung_side[side]
            y_base = float(domes[side].min())
            for j in range(4):
                yk = y_base - 0.015 - 0.022 * j
                _segment(img, g, (cx + side * 0.55 * a, yk), (cx + side * 0.95 * a, yk), 0.004, 0.07 * s)
    if strength["Effusion"] > 0:
        s = strength["Effusion"]
        side = p["eff_side"]
        mask, cx, cy, a, b, _ = lung_side[side]
        lateral = np.clip((xs - cx) * side / a, -1.0, 1.0)
        # A meniscus: the fluid level climbs toward the chest wall, blunting the costophrenic angle.
        level = p["dome_y"] + 0.02 - p["eff_height"] - 0.08 * (lateral + 1.0) ** 2 / 4.0
        fluid = _soft(level - ys, 0.012) * np.clip(mask * 1.3, 0.0, 1.0)
        _lerp(img, 0.56, fluid * 0.95 * s)

    # Pose jitter (rotation, shift, zoom) as one affine resample of the padded canvas into the output.
    rot_a, dx, dy, zoom = p["pose"]
    ca, sa = math.cos(rot_a) / zoom, math.sin(rot_a) / zoom
    half, off = n / 2.0, g.margin * n
    coeffs = (ca, sa, (0.5 - dx) * n + off - (ca + sa) * half,
              -sa, ca, (0.5 - dy) * n + off - (ca - sa) * half)
    img = np.asarray(
        Image.fromarray(img.astype(np.float32)).transform(
            (n, n), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=0.03
        ),
        dtype=np.float32,
    )

    # Image quality: contrast around mid-grey, exposure (gamma), quantum mottle and fine grain.
    img = 0.3 + (img - 0.3) * p["contrast"]
    img = np.clip(img, 0.0, 1.0) ** p["gamma"]
    img += 0.012 * _lowfreq(rng, (n, n), 24)
    img += p["grain"] * rng.standard_normal((n, n), dtype=np.float32)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Cohorts
# ---------------------------------------------------------------------------------------------------------


def image_filename(image_id: str) -> str:
    """The PNG file name of an image: the image_id itself when it ends in .png, else image_id + '.png'."""
    return image_id if image_id.lower().endswith(".png") else f"{image_id}.png"


def _label_index(label: Any) -> int:
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < N_CLASSES:
            return int(label)
    elif isinstance(label, str) and label in NIH_CLASSES:
        return NIH_CLASSES.index(label)
    raise SynthError(f"label {label!r} is neither one of {NIH_CLASSES} nor an index 0..{N_CLASSES - 1}")


# path, pattern index, age, sex, rng seed, size, signal[, {class: strength} of a multi-label image]
Job = tuple[Any, ...]


def _render_job(job: Job) -> str:
    """Render one image and write it atomically (a crash never leaves a half-written PNG)."""
    path, label_index, age, sex, rng_seed, size, signal = job[:7]
    patterns = job[7] if len(job) > 7 else None
    array = render_image(label_index, age, sex, rng_seed, size=size, signal=signal, patterns=patterns)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)  # speed over a few % of file size
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _worker_main() -> None:
    """Entry point of a worker process: render the JSON list of jobs read from stdin."""
    for job in json.load(sys.stdin):
        _render_job(tuple(job))  # type: ignore[arg-type]


_WORKER_CMD = "from embedkit.data.synth import _worker_main; _worker_main()"


def _run_pool(jobs: list[Job], n_workers: int) -> None:
    """Render ``jobs`` in ``n_workers`` fresh Python processes.

    Why not multiprocessing: fork is unsafe once torch's threads run in the parent, and spawn/forkserver
    re-run the user's ``__main__`` script (failing in scripts without a main guard). Plain worker processes
    that import only this module have neither problem. Jobs are dealt round-robin: they cost about the same.
    """
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # the worker imports this very copy of embedkit
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n_workers):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _WORKER_CMD], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env=env,
            ))
        for k, proc in enumerate(procs):
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps(jobs[k::n_workers]).encode())
                proc.stdin.close()
            except BrokenPipeError:  # the worker died before reading; its exit status and stderr say why
                pass
        failures = []
        for proc in procs:
            assert proc.stderr is not None
            err = proc.stderr.read()  # small: only a traceback on failure
            if proc.wait() != 0:
                failures.append(err.decode(errors="replace").strip().splitlines()[-1:] or ["(no message)"])
        if failures:
            raise SynthError(f"{len(failures)} synthetic-image worker(s) failed: {failures[0][0]}")
    finally:
        for proc in procs:  # only on errors or interrupts: stop the workers this call started
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _selector_values(images: pd.DataFrame, column: str) -> pd.Series:
    if column in images.columns:
        return images[column].astype(str)
    if column == "age_group":  # derivable: one age boundary everywhere
        return images["age"].map(age_group).astype(str)
    raise SynthError(f"bias selects on column {column!r}, which the cohort lacks (columns: {list(images.columns)})")


def _apply_bias(images: pd.DataFrame, bias: BiasSpec | None, seed: int, signal: float) -> pd.DataFrame:
    """Add ``pattern_index``, ``signal`` and ``biased`` columns to the one-row-per-image frame."""
    out = images.copy()
    out["pattern_index"] = out["label_index"]
    out["signal"] = float(signal)
    out["biased"] = False
    if bias is None:
        return out
    noised = np.zeros(len(out), dtype=bool)
    for k, rule in enumerate(bias.rules):
        match = (_selector_values(out, rule.column) == rule.value).to_numpy()
        if rule.label is not None:
            if rule.label not in NIH_CLASSES:
                raise SynthError(f"bias rule {rule}: {rule.label} is not a class of this cohort ({NIH_CLASSES})")
            match &= (out["label_index"] == NIH_CLASSES.index(rule.label)).to_numpy()
        if rule.effect == "signal":
            out.loc[match, "signal"] *= rule.amount
            if rule.amount != 1.0:  # a factor of 1 changes nothing
                out.loc[match, "biased"] = True
        else:
            # Exactly round(amount * n) of the matching images, ranked by a stable hash: deterministic, and
            # independent of row order.
            idx = np.flatnonzero(match)
            keys = [image_seed(seed, iid, f"label_noise/{k}/{rule}") for iid in out["image_id"].iloc[idx]]
            take = idx[np.argsort(np.array(keys, dtype=np.uint64), kind="stable")][: round(rule.amount * len(idx))]
            noised[take] = True
    for i in np.flatnonzero(noised):
        iid, true = out["image_id"].iat[i], int(out["label_index"].iat[i])
        offset = 1 + image_seed(seed, iid, "label_noise/class") % (N_CLASSES - 1)  # uniform over the others
        out.iat[i, out.columns.get_loc("pattern_index")] = (true + offset) % N_CLASSES
    out.loc[noised, "biased"] = True
    return out


def _default_workers(n_jobs: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, n_jobs))


def synthesize(
    cohort: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    size: int = 256,
    seed: int = 0,
    bias: BiasSpec | None = None,
    workers: int | None = None,
    signal: float = 1.0,
    sex_differences: bool = True,
) -> pd.DataFrame:
    """Write one 8-bit grayscale PNG per distinct ``image_id`` of ``cohort`` into ``out_dir``.

    ``cohort`` needs columns image_id, label (a class name or index), age and sex, plus any column a ``bias``
    rule selects on (age_group is derived from age when absent). A repeated image_id is written once; its
    rows must agree on label, age and sex. Each image's randomness comes from (seed, image_id) only, so the
    files are byte-identical for the same inputs whatever ``workers`` is. ``signal`` scales every class
    pattern before the bias's own factors. ``sex_differences=False`` draws every image with the male anatomy
    (the recorded sex is unchanged; every random draw is the same), so the images carry no sex signal: the null
    cohort of the attribute probe (`embedkit probe --target sex`).

    Returns one row per distinct image_id, in first-appearance order: ``image_id, path`` (absolute),
    ``label``, ``pattern`` (the class whose pattern was drawn; differs from label where label noise hit),
    ``signal`` (effective strength) and ``biased`` (whether a bias rule changed the image).
    """
    import pandas as pd  # lazy: keeps pool workers light

    if not isinstance(cohort, pd.DataFrame):
        raise SynthError(f"cohort must be a pandas DataFrame, not {type(cohort).__name__}")
    missing = [c for c in ("image_id", "label", "age", "sex") if c not in cohort.columns]
    if missing:
        raise SynthError(f"cohort lacks column(s) {missing}; it needs image_id, label, age, sex")
    if not (MIN_SIZE <= int(size) <= MAX_SIZE):
        raise SynthError(f"size {size} is outside {MIN_SIZE}..{MAX_SIZE}")
    if not (0.0 <= float(signal) <= 1.0):
        raise SynthError(f"signal {signal} is outside [0, 1]")
    if bias is not None and not isinstance(bias, BiasSpec):
        raise SynthError(f"bias must be a BiasSpec (see parse_bias), not {type(bias).__name__}")

    ids = cohort["image_id"].astype(str)
    bad = [i for i in ids.unique() if not i or "/" in i or "\\" in i or i in (".", "..") or i.startswith(".")]
    if bad:
        raise SynthError(f"image_id(s) unusable as file names: {bad[:5]}")
    frame = cohort.assign(image_id=ids)
    conflicts = frame.groupby("image_id", sort=False)[["label", "age", "sex"]].nunique(dropna=False)
    conflicts = conflicts[(conflicts > 1).any(axis=1)]
    if len(conflicts):
        raise SynthError(f"repeated image_id(s) with differing label/age/sex: {list(conflicts.index[:5])}")
    images = frame.drop_duplicates("image_id", keep="first").reset_index(drop=True)
    images["label_index"] = [_label_index(v) for v in images["label"]]

    out = _apply_bias(images, bias, seed, signal)
    folder = Path(out_dir).resolve()
    out["path"] = [str(folder / image_filename(i)) for i in out["image_id"]]
    jobs: list[Job] = []
    for row in out.itertuples(index=False):
        try:  # every input is checked before anything is written
            _check_inputs(row.pattern_index, row.age, row.sex, size, row.signal)
        except (TypeError, ValueError) as exc:
            raise SynthError(f"image {row.image_id!r}: {exc}") from None
        drawn_sex = str(row.sex) if sex_differences else "M"
        jobs.append((row.path, int(row.pattern_index), int(row.age), drawn_sex,
                     image_seed(seed, row.image_id), int(size), float(row.signal)))
    folder.mkdir(parents=True, exist_ok=True)

    n_workers = _default_workers(len(jobs)) if workers is None else max(1, int(workers))
    if n_workers == 1 or len(jobs) < 16:  # a pool costs more than it saves on a handful of images
        for job in jobs:
            _render_job(job)
    else:
        _run_pool(jobs, min(n_workers, len(jobs)))

    result = pd.DataFrame(
        {
            "image_id": out["image_id"],
            "path": out["path"],
            "label": [NIH_CLASSES[i] for i in out["label_index"]],
            "pattern": [NIH_CLASSES[i] for i in out["pattern_index"]],
            "signal": out["signal"].astype(float),
            "biased": out["biased"].astype(bool),
        }
    )
    return result


def example_sheet(tile: int = 128, seed: int = 0, signal: float = 1.0) -> Image.Image:
    """A labelled contact sheet: one row per class, columns young M, young F, old M, old F.

    Tiles are drawn at twice ``tile`` and box-downsampled (as a viewer would see them). docs/synthetic-examples.png
    is ``example_sheet().save(path, optimize=True)``.
    """
    from PIL import ImageDraw

    cells = [("young", 35, "M"), ("young", 35, "F"), ("old", 75, "M"), ("old", 75, "F")]
    left, top = 96, 18
    sheet = Image.new("L", (left + tile * len(cells), top + tile * N_CLASSES), color=255)
    draw = ImageDraw.Draw(sheet)
    for j, (group, age, sex) in enumerate(cells):
        draw.text((left + j * tile + 6, 3), f"{group} {sex} ({age})", fill=0)
    for i, name in enumerate(NIH_CLASSES):
        draw.text((4, top + i * tile + tile // 2 - 6), name, fill=0)
        for j, (group, age, sex) in enumerate(cells):
            big = render_image(i, age, sex, image_seed(seed, f"example/{name}/{group}/{sex}"), 2 * tile, signal)
            small = Image.fromarray(big).resize((tile, tile), Image.Resampling.BOX)
            sheet.paste(small, (left + j * tile, top + i * tile))
    return sheet

"""Hostile-input cases: manifests and image folders given to `data import` (see tests/hostile.py)."""

from __future__ import annotations

from pathlib import Path

from hostile import Case


def _manifest(text: str, name: str = "m.csv"):
    def setup(tmp: Path, store: Path) -> None:
        (tmp / name).write_text(text)
        (tmp / "images").mkdir(exist_ok=True)

    return setup


def _import(*extra: str, name: str = "m.csv") -> tuple[str, ...]:
    return ("data", "import", f"{{tmp}}/{name}", "--images", "{tmp}/images", "--cohort", "c", "--no-verify", *extra)


CASES = [
    Case("manifest-header-only", _import(), "has a header but no rows", names="{tmp}/m.csv",
         setup=_manifest("image_id,label,age,sex\n")),
    Case("manifest-repeated-column", _import(), "appear more than once in the header", names="{tmp}/m.csv",
         setup=_manifest("image_id,label,age,sex,sex\na.png,Effusion,40,M,F\n")),
    Case("manifest-map-onto-existing-column", _import("--map", "Sex=sex"), "--map would give two columns the name",
         names="{tmp}/m.csv", setup=_manifest("image_id,label,age,Sex,sex\na.png,Effusion,40,M,F\n")),
    Case("manifest-repeated-column-into-existing-store", _import(), "appear more than once in the header",
         names="{tmp}/m.csv", store="cohort", setup=_manifest("image_id,label,age,sex,sex\na.png,Effusion,40,M,F\n")),
]

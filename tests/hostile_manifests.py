"""Hostile-input cases: manifests and image folders given to `data import` (see tests/hostile.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from hostile import Case


def _manifest(text: str, name: str = "m.csv"):
    def setup(tmp: Path, store: Path) -> None:
        (tmp / name).write_text(text.replace("{tmp}", str(tmp)))
        (tmp / "images").mkdir(exist_ok=True)

    return setup


def _outside(link: str = "") -> Callable[[Path, Path], None]:
    """A real PNG beside the images folder (and, with ``link``, a symlink to it inside the folder)."""
    def setup(tmp: Path, store: Path) -> None:
        from PIL import Image

        (tmp / "images").mkdir(exist_ok=True)
        Image.new("L", (32, 32)).save(tmp / "outside.png")
        if link:
            (tmp / "images" / link).symlink_to(tmp / "outside.png")

    return setup


def _both(*setups: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, store: Path) -> None:
        for one in setups:
            one(tmp, store)

    return setup


def _bomb(tmp: Path, store: Path) -> None:
    """A 30000 x 30000 PNG of a few hundred bytes (a decompression bomb's header) and a manifest naming it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    (tmp / "images").mkdir(exist_ok=True)
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    (tmp / "images" / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                              + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    (tmp / "m.csv").write_text("image_id,label,age,sex\nbomb.png,Effusion,40,M\n")


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
    # field sizes: a label of megabytes is a rejected row (never a class), its reason cut to a bound
    Case("manifest-label-of-megabytes", _import(), "column 'label' holds 8000000 characters, more than the 4096",
         names="row 1 (a.png)", setup=_manifest("image_id,label,age,sex\na.png," + "Effusion" * 1_000_000 + ",40,M\n")),
    Case("manifest-image-id-of-10kb", _import(), "column 'image_id' holds 10004 characters", names="row 1 (bbbb",
         store="cohort", setup=_manifest("image_id,label,age,sex\n" + "b" * 10_000 + ".png,Effusion,40,M\n")),
    Case("manifest-extra-cell-over-64k", _import(), "column 'note' holds 70000 characters, more than the 65536",
         names="row 1 (a.png)", setup=_manifest("image_id,label,age,sex,note\na.png,Effusion,40,M," + "n" * 70_000 + "\n")),
    # paths leaving --images, checked with --no-verify too; the files exist
    Case("manifest-path-dotdot-no-verify", _import(), "lies outside the images folder", names="row 1 (../outside.png)",
         setup=_both(_outside(), _manifest("image_id,label,age,sex\n../outside.png,Effusion,40,M\n"))),
    Case("manifest-path-absolute-no-verify", _import(), "lies outside the images folder", names="path '{tmp}/outside.png'",
         setup=_both(_outside(), _manifest("image_id,path,label,age,sex\na.png,{tmp}/outside.png,Effusion,40,M\n"))),
    Case("manifest-symlink-outside-no-verify", _import(), "(after '..' and symlinks; --allow-outside-images",
         names="row 1 (link.png)", setup=_both(_outside("link.png"), _manifest("image_id,label,age,sex\nlink.png,Effusion,40,M\n"))),
    Case("manifest-symlink-outside-verified", _import()[:-1], "lies outside the images folder", names="row 1 (link.png)",
         store="cohort", setup=_both(_outside("link.png"), _manifest("image_id,label,age,sex\nlink.png,Effusion,40,M\n"))),
    # labels that differ only in case are not new classes; a bomb is a named row, not a crash
    Case("manifest-labels-differing-in-case", _import(), "differs only in case from 'Effusion'", names="row 3 (c.png)",
         setup=_manifest("image_id,label,age,sex\na.png,Effusion,40,M\nb.png,Effusion,41,F\nc.png,effusion,42,M\n")),
    Case("manifest-decompression-bomb", _import()[:-1], "decompression bomb", names="bomb.png", setup=_bomb),
]

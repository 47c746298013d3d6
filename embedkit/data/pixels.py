"""The pixel cache: each image's 8-bit pixels as a model's preprocessing leaves them, decoded once for every epoch.

A model's preprocessing has two stages (:class:`embedkit.models.base.Preprocessing`): ``pixels`` (decode, channel
conversion, resize, pad, crop: the costly part, ~20 ms for a 1024 x 1024 PNG) and ``tensor`` (scaling and
normalisation: microseconds). The cache stores the first stage's uint8 output for every image of a cohort, one
entry per distinct *recipe* (what ``pixels`` computes; CLIP and BiomedCLIP share one), so fine-tuning epochs and
later embedding passes read ``[H, W, C]`` arrays instead of decoding PNGs. The training augmentations act on these
pixels too, so an epoch from the cache is the epoch from the PNGs, bit for bit.

Layout: ``<store>/_cache/pixels/<cohort>/<recipe key>/`` holds ``index.json`` (the recipe, the pixel shape, and
for every distinct image of the cohort, in cohort order, its path, size and modification time) and the one data
file it names, ``pixels-<token>.npy`` (``[N, H, W, C]`` uint8, read memory-mapped). An entry is used only while it
matches: the same recipe, the same image list, and every file's size and mtime as cached. A changed file, recipe
or cohort makes the next build recompute what changed (the rest is copied) into a new data file.

Writes are whole or nothing: a build writes its data file under a temporary name, renames it, then replaces the
index (the commit), then removes the data file the old index named. A build killed before the index swap leaves
the old entry in force and a temporary file the next build (or ``embedkit doctor --repair``) removes; one build per
entry at a time (a store lock). The cache is derived data: deleting ``_cache/`` loses nothing but time.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from embedkit.errors import EmbedkitError

CACHE_DIR = Path("_cache") / "pixels"
FORMAT = 1  # of index.json and the data file; a key of the entry, so a new format never reads an old entry
INDEX = "index.json"
TMP_SUFFIX = ".tmp"


class PixelCacheError(EmbedkitError):
    """The pixel cache cannot be written or read as asked."""


def recipe_key(recipe: str) -> str:
    """The folder name of a recipe's entry: a digest of the recipe and the cache format."""
    return hashlib.sha256(f"{FORMAT}\n{recipe}".encode()).hexdigest()[:16]


def cohort_folder(store_path: Path, cohort: str) -> Path:
    # Cohort names are plain identifiers (embedkit/data/cohort.py); quote anything else rather than nest folders.
    safe = "".join(c if c.isalnum() or c in "-_." else f"%{ord(c):02x}" for c in cohort)
    return Path(store_path) / CACHE_DIR / safe


def file_stamp(path: str) -> tuple[int, int] | None:
    """(size in bytes, mtime in ns) of an image file: the fingerprint a cached image must still have; None when
    the file is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class CachedPixels:
    """One committed cache entry, read-only and picklable (DataLoader workers open the memory map themselves)."""

    folder: Path
    recipe: str
    cohort: str
    shape: tuple[int, int, int]
    data: str  # the data file's name in ``folder``
    paths: tuple[str, ...]
    stamps: tuple[tuple[int, int], ...]
    created_at: str

    @property
    def data_path(self) -> Path:
        return self.folder / self.data

    @property
    def nbytes(self) -> int:
        return len(self.paths) * int(np.prod(self.shape))

    def array(self) -> np.ndarray:
        """The ``[N, H, W, C]`` uint8 pixels, memory-mapped (opened once per process)."""
        return _open_memmap(str(self.data_path))

    def stale(self, paths: list[str]) -> list[int] | None:
        """Positions in ``paths`` whose cached pixels cannot be used (file changed or gone), or None when the entry
        is of another image list altogether (the cohort changed: nothing lines up)."""
        if tuple(paths) != self.paths:
            return None
        return [i for i, (p, stamp) in enumerate(zip(paths, self.stamps)) if file_stamp(p) != tuple(stamp)]


_MEMMAPS: dict[str, np.ndarray] = {}


def _open_memmap(path: str) -> np.ndarray:
    if path not in _MEMMAPS:
        _MEMMAPS[path] = np.load(path, mmap_mode="r")
    return _MEMMAPS[path]


class PixelSource:
    """Where a dataset reads an image's pixels: the cache entry (by path) when it has them; picklable."""

    def __init__(self, entry: CachedPixels):
        self.entry = entry
        self.position = {p: i for i, p in enumerate(entry.paths)}

    def __contains__(self, path: str) -> bool:
        return path in self.position

    def pixels(self, path: str) -> np.ndarray:
        return np.array(self.entry.array()[self.position[path]])


def read_entry(store_path: Path, cohort: str, recipe: str) -> CachedPixels | None:
    """The committed entry of (cohort, recipe), or None when there is none (or its index is unreadable)."""
    folder = cohort_folder(store_path, cohort) / recipe_key(recipe)
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError):
        return None
    if index.get("format") != FORMAT or index.get("recipe") != recipe or not (folder / index["data"]).is_file():
        return None
    return CachedPixels(folder, recipe, cohort, tuple(index["shape"]), index["data"],
                        tuple(i["path"] for i in index["images"]),
                        tuple((i["size"], i["mtime_ns"]) for i in index["images"]), index["created_at"])


def usable_source(store_path: Path, cohort: str, recipe: str, paths: list[str]) -> PixelSource | None:
    """A source for the images of ``paths`` (a cohort's distinct images, in cohort order) when the cache holds all
    of them as they are now; None otherwise (nothing cached, or something changed: build again)."""
    entry = read_entry(store_path, cohort, recipe)
    if entry is None or entry.stale(paths) != []:
        return None
    return PixelSource(entry)


@dataclass
class CacheSummary:
    cohort: str
    recipe: str
    images: int  # in the entry
    decoded: int  # images computed by this build (the rest were copied from the entry before it, or it was current)
    nbytes: int
    folder: Path
    seconds: float

    def line(self) -> str:
        what = "up to date" if self.decoded == 0 else f"{self.decoded} decoded"
        return (f"{self.recipe}: {self.images} images ({what}), {self.nbytes / 2**20:.1f} MiB in "
                f"{self.folder} ({self.seconds:.1f} s)")


def _write_header(handle, n: int, shape: tuple[int, ...]) -> None:
    np.lib.format.write_array_header_2_0(handle, {"descr": "|u1", "fortran_order": False, "shape": (n, *shape)})


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete what a killed build left in an entry's folder: temporary files and data files no index names.
    Call with the entry's lock held. Returns what was removed."""
    try:
        named = json.loads((folder / INDEX).read_text()).get("data")
    except (OSError, ValueError):
        named = None
    removed = []
    for path in folder.glob("*"):
        if path.name.endswith(TMP_SUFFIX) or (path.name.startswith("pixels-") and path.name != named):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _collate_items(items: list) -> list:
    return items


def build(store, cohort: str, paths: list[str], preprocessings: list, workers: int = 2,
          progress: Callable[[int, int], None] | None = None, wait_s: float = 0.0) -> list[CacheSummary]:
    """Bring the entries of ``preprocessings``' recipes for ``paths`` (a cohort's distinct images, in cohort order)
    up to date: each image that any entry lacks (or holds from a file since changed) is decoded once, and every
    recipe that needs it computes its pixels from that one decode. An entry already current is left alone.

    ``progress(done, total)`` is called as images are decoded. A file that fails to decode raises
    :class:`~embedkit.data.images.ImageDecodeError` naming it, and no entry changes. Raises StoreBusy when another
    process builds one of these entries (after ``wait_s`` seconds).
    """
    import time
    from contextlib import ExitStack

    import torch

    from embedkit.embed import MultiImageFiles, decode_failure
    from embedkit.data.images import ImageDecodeError

    by_recipe: dict[str, object] = {}
    for p in preprocessings:
        by_recipe.setdefault(p.recipe(), p)
    start = time.perf_counter()
    with ExitStack() as locks:
        for recipe in by_recipe:
            locks.enter_context(store.lock(f"pixels-{recipe_key(cohort)}-{recipe_key(recipe)}", wait_s=wait_s,
                                           holder=f"a pixel-cache build of cohort '{cohort}'"))
        stamps = [file_stamp(p) for p in paths]  # what the entries will record; checked again before the commit
        plans = []
        for recipe, prep in by_recipe.items():
            folder = cohort_folder(store.path, cohort) / recipe_key(recipe)
            folder.mkdir(parents=True, exist_ok=True)
            remove_leftovers(folder)
            old = read_entry(store.path, cohort, recipe)
            stale = old.stale(paths) if old is not None else None
            todo = set(range(len(paths))) if stale is None else set(stale)
            plans.append((recipe, prep, folder, old if stale is not None else None, todo))
        needs = [tuple(i in todo for *_, todo in plans) for i in range(len(paths))]
        work = [i for i, need in enumerate(needs) if any(need)]
        writers = [_EntryWriter(folder, len(paths)) if todo else None for _, _, folder, _, todo in plans]
        try:
            if work:
                loader = torch.utils.data.DataLoader(
                    MultiImageFiles([paths[i] for i in work], [prep.pixels for _, prep, *_ in plans],
                                    [needs[i] for i in work]),
                    batch_size=16, num_workers=workers, collate_fn=_collate_items,
                    multiprocessing_context="forkserver" if workers else None)
                computed: dict[int, list] = {}
                done = 0
                if progress:
                    progress(0, len(work))
                batches = iter(loader)
                next_position = 0
                while True:
                    try:
                        batch = next(batches)
                    except StopIteration:
                        break
                    except ImageDecodeError as exc:
                        raise ImageDecodeError(decode_failure(exc, "no pixel-cache entry was changed")) from None
                    for k, arrays in batch:
                        computed[work[k]] = arrays
                    done += len(batch)
                    # Write every image up to the first one not decoded yet, in cohort order (the files are written
                    # front to back: a full disk is an OSError, never a SIGBUS from a memory map).
                    next_position = _write_ready(plans, writers, paths, computed, next_position)
                    if progress:
                        progress(done, len(work))
                next_position = _write_ready(plans, writers, paths, computed, next_position)
            else:
                _write_ready(plans, writers, paths, {}, 0)
            if [file_stamp(p) for p in paths] != stamps:
                raise PixelCacheError(f"image files of cohort '{cohort}' changed while the pixel cache was built; "
                                      "no entry was changed: run it again")
            summaries = []
            for (recipe, prep, folder, old, todo), writer in zip(plans, writers):
                if writer is not None:
                    writer.commit(cohort, recipe, paths, stamps)
                entry = read_entry(store.path, cohort, recipe)
                summaries.append(CacheSummary(cohort, recipe, len(paths), len(todo), entry.nbytes, folder,
                                              time.perf_counter() - start))
            return summaries
        except OSError as exc:
            raise PixelCacheError(f"writing the pixel cache of cohort '{cohort}' under "
                                  f"{cohort_folder(store.path, cohort)} failed: {exc.strerror or exc}; no entry "
                                  "was changed") from None
        finally:
            for writer in writers:
                if writer is not None:
                    writer.discard()


def _write_ready(plans, writers, paths: list[str], computed: dict[int, list], position: int) -> int:
    """Append to each entry's data file the images from ``position`` on that are ready (decoded, or copied from the
    entry before); returns the first position not written."""
    while position < len(paths):
        needed = any(position in todo for *_, todo in plans)
        if needed and position not in computed:
            break
        arrays = computed.pop(position, None)
        for m, ((recipe, prep, folder, old, todo), writer) in enumerate(zip(plans, writers)):
            if writer is None:
                continue
            pixels = arrays[m] if position in todo else old.array()[position]
            writer.write(pixels, paths[position])
        position += 1
    return position


class _EntryWriter:
    """One entry's new data file, written front to back under a temporary name until :meth:`commit`."""

    def __init__(self, folder: Path, n: int):
        self.folder = folder
        self.n = n
        self.name = f"pixels-{secrets.token_hex(6)}.npy"
        self.tmp = folder / (self.name + TMP_SUFFIX)
        self.handle = None
        self.shape: tuple[int, ...] | None = None
        self.written = 0

    def write(self, pixels: np.ndarray, path: str) -> None:
        if pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise PixelCacheError(f"{path}: the preprocessing gave {pixels.dtype} pixels of shape {pixels.shape}, "
                                  "not uint8 [H, W, C]")
        if self.handle is None:
            self.shape = tuple(pixels.shape)
            self.handle = open(self.tmp, "wb")
            _write_header(self.handle, self.n, self.shape)
        elif tuple(pixels.shape) != self.shape:
            raise PixelCacheError(f"{path}: pixels of shape {tuple(pixels.shape)}, where the other images of this "
                                  f"recipe have {self.shape}")
        self.handle.write(np.ascontiguousarray(pixels).tobytes())
        self.written += 1

    def commit(self, cohort: str, recipe: str, paths: list[str], stamps: list[tuple[int, int]]) -> None:
        if self.handle is None:  # an empty cohort: nothing to cache
            return
        assert self.written == self.n, (self.written, self.n)
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.handle = None
        os.replace(self.tmp, self.folder / self.name)
        images = [{"path": p, "size": size, "mtime_ns": mtime} for p, (size, mtime) in zip(paths, stamps)]
        index = {"format": FORMAT, "recipe": recipe, "cohort": cohort, "shape": list(self.shape), "data": self.name,
                 "images": images, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _atomic_write_text(self.folder / INDEX, json.dumps(index))  # the commit
        remove_leftovers(self.folder)  # the data file the old index named

    def discard(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        self.tmp.unlink(missing_ok=True)


def entries(store_path: Path) -> list[CachedPixels]:
    """Every committed entry of the store's cache."""
    root = Path(store_path) / CACHE_DIR
    found = []
    for index in sorted(root.glob(f"*/*/{INDEX}")) if root.is_dir() else []:
        try:
            meta = json.loads(index.read_text())
        except (OSError, ValueError):
            continue
        entry = read_entry(store_path, meta.get("cohort", ""), meta.get("recipe", ""))
        if entry is not None:
            found.append(entry)
    return found


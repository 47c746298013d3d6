"""The pixel cache: exact pixels per recipe, epochs from the cache equal to epochs from the PNGs, invalidation by
fingerprint, whole-or-nothing writes, and the CLI (`data cache`, `data info`, `finetune --no-pixel-cache`)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_cohort_images
from embedkit.data import pixels
from embedkit.data.images import decode_image
from embedkit.finetune.augment import Augment, AugmentedImageFiles
from embedkit.models.registry import get_spec

FAMILIES = ["tiny-clip", "tiny-biomedclip", "tiny-medclip-rn50", "tiny-gloria", "tiny-chexzero"]


@pytest.fixture()
def cohort(tmp_path):
    from embedkit.data.cohort import import_cohort, load_cohort, validate_cohort
    from embedkit.store.store import Store

    frame = write_cohort_images(tmp_path / "images", n_per_class=4, size=64)
    store = Store(tmp_path / "store")
    import_cohort(store, validate_cohort(frame, "c", images_dir=tmp_path / "images"), "c")
    paths = list(dict.fromkeys(load_cohort(store, "c")["path"]))
    return store, paths


def _transform(name: str):
    return get_spec(name).build(seed=0).image_transform()


@pytest.mark.parametrize("name", FAMILIES)
def test_the_two_stages_are_the_whole_preprocessing(name):
    transform = _transform(name)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8), "RGB")
    px = transform.pixels(image)
    assert px.dtype == np.uint8 and px.ndim == 3
    assert torch.equal(transform(image), transform.tensor(px))


def test_cached_epochs_feed_the_tensors_decoding_feeds(cohort):
    """Without and with augmentation, every item from the cache equals the item decoded from its PNG."""
    store, paths = cohort
    transforms = [_transform(name) for name in FAMILIES]
    built = pixels.build(store, "c", paths, transforms, workers=0)
    assert len(built) == 4  # CLIP and BiomedCLIP share one recipe
    for transform in transforms:
        source = pixels.usable_source(store.path, "c", transform.recipe(), paths)
        assert source is not None
        for augment in (None, Augment()):
            from_png = AugmentedImageFiles(paths, transform, augment, seed=77)
            from_cache = AugmentedImageFiles(paths, transform, augment, seed=77, source=source)
            for key in [(i, epoch, k) for k, i in enumerate(range(len(paths))) for epoch in (-1, 0, 3)]:
                a, b = from_png[key], from_cache[key]
                assert a[0] == b[0] and torch.equal(a[1], b[1])
        png = transform.pixels(decode_image(paths[3]))
        assert np.array_equal(source.pixels(paths[3]), png)


def test_a_changed_file_is_recomputed_alone_and_a_changed_cohort_rebuilds(cohort):
    store, paths = cohort
    transform = _transform("tiny-gloria")
    pixels.build(store, "c", paths, [transform], workers=0)
    entry = pixels.read_entry(store.path, "c", transform.recipe())
    assert entry.stale(paths) == []
    Image.fromarray(np.full((64, 64), 200, dtype=np.uint8)).save(paths[2])
    os.utime(paths[2], ns=(1, 1))  # a rewritten file: other bytes, other mtime
    assert pixels.usable_source(store.path, "c", transform.recipe(), paths) is None
    assert entry.stale(paths) == [2]
    summary = pixels.build(store, "c", paths, [transform], workers=0)[0]
    assert summary.decoded == 1
    source = pixels.usable_source(store.path, "c", transform.recipe(), paths)
    assert np.array_equal(source.pixels(paths[2]), transform.pixels(decode_image(paths[2])))
    assert pixels.build(store, "c", paths, [transform], workers=0)[0].decoded == 0  # current: nothing to do
    assert pixels.usable_source(store.path, "c", transform.recipe(), paths[:-1]) is None  # another image list
    folder = entry.folder
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("pixels-")) == [
        pixels.read_entry(store.path, "c", transform.recipe()).data]  # the replaced data files are gone


def test_a_failed_build_changes_nothing_and_leaves_no_file(cohort, monkeypatch):
    store, paths = cohort
    transform = _transform("tiny-medclip-rn50")
    pixels.build(store, "c", paths, [transform], workers=0)
    before = pixels.read_entry(store.path, "c", transform.recipe())
    listing = sorted(p.name for p in before.folder.iterdir())
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(paths[0])
    os.utime(paths[0], ns=(2, 2))

    calls = {"n": 0}
    real_write = pixels._EntryWriter.write

    def full_disk(self, px, path):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real_write(self, px, path)

    monkeypatch.setattr(pixels._EntryWriter, "write", full_disk)
    with pytest.raises(pixels.PixelCacheError, match="No space left on device; no entry was changed"):
        pixels.build(store, "c", paths, [transform], workers=0)
    assert sorted(p.name for p in before.folder.iterdir()) == listing
    assert pixels.read_entry(store.path, "c", transform.recipe()) == before


def test_a_file_that_does_not_decode_names_itself_and_changes_nothing(cohort):
    from embedkit.data.images import ImageDecodeError

    store, paths = cohort
    with open(paths[4], "wb") as handle:
        handle.write(b"not a png")
    with pytest.raises(ImageDecodeError, match=os.path.basename(paths[4])):
        pixels.build(store, "c", paths, [_transform("tiny-clip")], workers=0)
    assert pixels.entries(store.path) == []


def test_cli_cache_info_and_finetune_read_the_cache(cohort):
    from typer.testing import CliRunner

    from embedkit.cli import app

    store, paths = cohort
    runner = CliRunner()
    base = ["--store", str(store.path)]
    result = runner.invoke(app, [*base, "data", "cache", "--cohort", "c", "--model", "tiny-gloria,tiny-clip",
                                 "--random-init", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.count("decoded)") == 2
    info = runner.invoke(app, [*base, "data", "info", "--cohort", "c", "--json"])
    cache = json.loads(info.output)["c"]["pixel_cache"]
    assert sorted(e["state"] for e in cache) == ["current", "current"]
    assert all(e["images"] == len(paths) and e["bytes"] > 0 for e in cache)
    args = [*base, "finetune", "--model", "tiny-gloria", "--method", "lora", "--cohort", "c", "--random-init",
            "--epochs", "1", "--batch-size", "8", "--workers", "0"]
    with_cache = runner.invoke(app, args + ["--json"])
    assert with_cache.exit_code == 0, with_cache.output
    assert "pixels from the cache" in with_cache.stderr
    without = runner.invoke(app, args + ["--json", "--no-pixel-cache"])
    assert without.exit_code == 0, without.output
    assert "--no-pixel-cache" in without.stderr
    a, b = (json.loads(r.stdout) for r in (with_cache, without))
    assert a["metrics"] == b["metrics"]  # the same run, from the cache or from the files

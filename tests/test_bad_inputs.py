"""Bad input checked below the CLI (loaders, validation) or needing more than one command; the one-command cases
through the real CLI are the hostile-input corpus (tests/hostile.py, tests/test_hostile_corpus.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


def _embedkit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


class _Hostile:
    def __reduce__(self):
        return (print, ("this must never run",))


def _bad_weight_files(folder):
    """(name, bytes) of weights files that cannot be loaded: truncated, malformed, and pickles of non-tensors."""
    import io

    import torch

    good = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, good)
    hostile = io.BytesIO()
    torch.save({"w": _Hostile()}, hostile)
    return {
        "truncated.bin": good.getvalue()[: len(good.getvalue()) // 2],
        "hostile.bin": hostile.getvalue(),
        "malformed.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......",
        "text.bin": b"this is not a checkpoint\n",
    }


OPEN_CLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")


# BiomedCLIP's weights go through the same reader as CLIP's (openclip._checkpoint_state); GLoRIA's Lightning file has
# its own restricted unpickler, tested in test_models_gloria.py.
@pytest.mark.parametrize("model, files", [("tiny-clip", OPEN_CLIP_FILES),
                                          ("tiny-medclip-rn50", ("pytorch_model.bin", "pytorch_model.bin"))])
def test_unreadable_weights_are_one_error_without_unsafe_advice(tmp_path, capfd, model, files):
    from embedkit.models import bert
    from embedkit.models.base import CheckpointError
    from embedkit.models.registry import get_spec

    for name, data in _bad_weight_files(tmp_path).items():
        folder = tmp_path / f"{model}-{name}"
        folder.mkdir()
        file = folder / files[name.endswith(".safetensors")]
        file.write_bytes(data)
        (folder / "vocab.txt").write_text("\n".join(bert.synthetic_vocab(512)) + "\n")
        with pytest.raises(CheckpointError) as info:
            get_spec(model).load(folder)
        message = str(info.value)
        assert str(file) in message and "weights_only" not in message and "\n" not in message, message
    assert "this must never run" not in capfd.readouterr().out


def test_weights_holding_nan_are_refused_before_any_pass(tmp_path):
    import torch

    from embedkit.models import bert
    from embedkit.models.base import CheckpointError
    from embedkit.models.registry import get_spec

    spec = get_spec("tiny-medclip-rn50")
    state = spec.build(seed=0).state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    folder = tmp_path / "w"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "vocab.txt").write_text("\n".join(bert.synthetic_vocab(512)) + "\n")
    with pytest.raises(CheckpointError, match=rf"weight '{name}' holds NaN"):
        spec.load(folder)


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (8-bit grey) and whose data is a few bytes: a decompression bomb's
    shape without its cost."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_decompression_bombs_strips_and_corrupt_files_are_rejected_rows_not_crashes(tmp_path):
    from PIL import Image

    from conftest import write_cohort_images

    folder = tmp_path / "images"
    frame = write_cohort_images(folder, n_per_class=2)
    bomb, strip, large, corrupt = (frame["image_id"][i] for i in range(4))
    _png_header_only(folder / bomb, 30000, 30000)  # past PIL's own bomb limit
    _png_header_only(folder / large, 9000, 9000)  # below PIL's, above a radiograph's
    Image.new("L", (1, 40000)).save(folder / strip)
    (folder / corrupt).write_bytes((folder / corrupt).read_bytes()[:60])  # a PNG cut short
    manifest = tmp_path / "m.csv"
    frame.to_csv(manifest, index=False)
    store = tmp_path / "s"
    result = _embedkit("--store", str(store), "data", "import", str(manifest), "--images", str(folder), "--cohort", "c",
                       "--skip-bad")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    from embedkit.store.store import Store

    rejects = {r["image_id"]: r["reason"] for r in Store(store).read("rejects").to_pylist()}
    assert "decompression bomb" in rejects[bomb]
    assert "1 x 40000 pixels: one side is more than" in rejects[strip]
    assert "9000 x 9000 pixels, over the limit of 64 megapixels" in rejects[large]
    assert f"cannot decode image {folder / corrupt}" in rejects[corrupt]
    assert set(rejects) == {bomb, strip, large, corrupt}
    assert Store(store).count("images") == len(frame) - 4
    # without verification the pass meets the bomb itself: one line, from a worker process too
    unverified = tmp_path / "u"
    assert _embedkit("--store", str(unverified), "data", "import", str(manifest), "--images", str(folder), "--cohort",
                     "c", "--no-verify").returncode == 0
    embed = _embedkit("--store", str(unverified), "embed", "--model", "tiny-clip", "--random-init", "--cohort", "c",
                      "--workers", "1", "--quiet")
    assert embed.returncode == 1 and "Traceback" not in embed.stderr, embed.stderr
    assert embed.stderr.startswith("error: image ") and len(embed.stderr.strip().splitlines()) == 1, embed.stderr
    assert "it resumes" in embed.stderr


def test_labels_that_differ_only_in_case_are_rejected_not_new_classes(tmp_path):
    import pandas as pd

    from embedkit.data.cohort import validate_cohort

    rows = [{"image_id": f"{i}.png", "label": label, "age": 40, "sex": "M"}
            for i, label in enumerate(["Effusion"] * 3 + ["effusion", "EFFUSION", "Edema"])]
    validated = validate_cohort(pd.DataFrame(rows), "c", verify_images=False)
    reasons = {r.image_id: r.reason for r in validated.rejects}
    assert set(reasons) == {"3.png", "4.png"}
    assert "label 'effusion' differs only in case from 'Effusion'" in reasons["3.png"]
    assert sorted(validated.rows["label"].unique()) == ["Edema", "Effusion"]


def test_paths_that_leave_the_images_folder_are_rejected(tmp_path):
    import pandas as pd

    from embedkit.data.cohort import validate_cohort

    folder = tmp_path / "images"
    folder.mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    (folder / "link.png").symlink_to(outside)  # inside by name, outside once resolved
    (folder / "d.png").write_bytes(b"x")
    (folder / "inner.png").symlink_to(folder / "d.png")  # a symlink that stays inside is fine
    rows = [{"image_id": "a.png", "path": "../outside.png"}, {"image_id": "b.png", "path": str(outside)},
            {"image_id": "../outside.png"}, {"image_id": "link.png"}, {"image_id": "c.png", "path": "sub/../c.png"},
            {"image_id": "inner.png"}]
    frame = pd.DataFrame([{**r, "label": "Effusion", "age": 40, "sex": "F"} for r in rows])
    validated = validate_cohort(frame, "c", images_dir=folder, verify_images=False)
    reasons = {r.image_id: r.reason for r in validated.rejects}
    assert set(reasons) == {"a.png", "b.png", "../outside.png", "link.png"}
    assert all("lies outside the images folder" in r and "--allow-outside-images" in r for r in reasons.values())
    inside = [str(folder.resolve() / "c.png"), str(folder.resolve() / "inner.png")]
    assert validated.rows["path"].tolist() == inside  # normalised, inside
    allowed = validate_cohort(frame, "c", images_dir=folder, verify_images=False, allow_outside_images=True)
    assert not allowed.rejects and len(allowed.rows) == len(rows)


def test_oversized_cells_are_rejected_rows_and_stored_reasons_are_bounded(store):
    import pandas as pd

    from embedkit.data.cohort import (MAX_FIELD_CHARS, MAX_REASON_CHARS, import_cohort, validate_cohort)

    huge = "Effusion" * 1_000_000  # an 8 MB label
    rows = [{"image_id": "a.png", "label": huge, "age": 40, "sex": "M"},
            {"image_id": "b" * 10_000 + ".png", "label": "Edema", "age": 40, "sex": "M"},
            {"image_id": "c.png", "label": "Edema", "age": "x" * 5000, "sex": "M", "note": "n" * 100},
            {"image_id": "d.png", "label": "Effusion", "age": 40, "sex": "F", "note": "n" * 100_000},
            {"image_id": "e.png", "label": "Edema", "age": 50, "sex": "F"},
            {"image_id": "f.png", "label": "Effusion", "age": 50, "sex": "F"}]
    validated = validate_cohort(pd.DataFrame(rows), "c", classes=("Edema", "Effusion"), verify_images=False)
    reasons = {r.line: r.reason for r in validated.rejects}
    assert sorted(reasons) == [1, 2, 3, 4]
    assert reasons[1].startswith(f"column 'label' holds 8000000 characters, more than the {MAX_FIELD_CHARS}")
    assert reasons[2].startswith("column 'image_id' holds 10004 characters")
    assert reasons[4].startswith("column 'note' holds 100000 characters, more than the 65536")
    assert all(len(r) <= MAX_REASON_CHARS for r in reasons.values()) and reasons[1].endswith("…")
    assert sorted(validated.rows["label"]) == ["Edema", "Effusion"]  # never a class
    import_cohort(store, validated, "c", skip_bad=True)
    stored = store.read("rejects").to_pylist()
    assert max(len(r["reason"]) for r in stored) <= MAX_REASON_CHARS
    assert max(len(r["image_id"]) for r in stored) <= 200


def test_a_missing_cuda_device_is_a_device_error_with_its_message(monkeypatch):
    import torch

    from embedkit.device import has_gpu, resolve_device
    from embedkit.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, whatever runs the test
    with pytest.raises(DeviceError, match=r"^--device cuda asked for, but torch sees no CUDA device here$"):
        resolve_device("cuda:0")
    assert resolve_device("auto").type == "cpu" and resolve_device("cpu").type == "cpu"
    assert (has_gpu("auto"), has_gpu("cpu"), has_gpu("cuda:1")) == (False, False, True)


def _runs_store(path):
    """A store holding one run (written through the library: cheaper than a zero-shot pass)."""
    import pyarrow as pa

    from embedkit.store import schemas
    from embedkit.store.store import Store

    store = Store(path)
    predictions = pa.Table.from_pylist([{"run_id": "r1", "row_id": "c/0", "image_id": "0", "split": "test",
                                         "y_true": 0, "y_pred": 1, "probs": [0.4, 0.6]}], schema=schemas.PREDICTIONS)
    store.write_run({"run_id": "r1", "model": "m", "method": "lp", "config": {"classes": ["A", "B"]}}, predictions)
    return store


def test_an_internal_error_is_one_line_with_its_traceback_in_the_stores_log(tmp_path, monkeypatch):
    import os
    import re

    store = _runs_store(tmp_path / "s")
    tables = store.table_names()
    env = {**os.environ, "EMBEDKIT_FAULT": "bug:1", "EMBEDKIT_DEBUG": ""}
    result = _embedkit("--store", str(store.path), "runs", "delete", "r1", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    match = re.fullmatch(r"error: internal error: RuntimeError: injected bug at fault point 1 — this is a bug; "
                         r"please report it at (.+) with (\S+\.log)\n", result.stderr)
    assert match, result.stderr
    log = match[2]
    assert log.startswith(f"{store.path}/_logs/") and re.search(rf"/\d{{8}}-\d{{6}}-\d+\.log$", log)
    text = open(log).read()
    assert "Traceback (most recent call last)" in text and "RuntimeError: injected bug at fault point 1" in text
    assert "'runs', 'delete', 'r1'" in text  # the command that hit it
    # the log is not store content: no table, no doctor finding, no export
    assert store.table_names() == tables and store.count("runs") == 1
    doctor = _embedkit("--store", str(store.path), "doctor", env={**os.environ, "EMBEDKIT_FAULT": ""})
    assert doctor.returncode == 0 and doctor.stdout.endswith(": no orphans, duplicates or stale copies\n"), doctor
    # EMBEDKIT_DEBUG shows the traceback itself
    debug = _embedkit("--store", str(store.path), "runs", "delete", "r1", env={**env, "EMBEDKIT_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().endswith("RuntimeError: injected bug at fault point 1")
    user_error = _embedkit("--store", str(store.path), "runs", "delete", "r2", env={**env, "EMBEDKIT_DEBUG": "1"})
    assert "Traceback" in user_error.stderr and user_error.stderr.strip().splitlines()[-1].startswith("error: no run")


def test_a_bug_log_without_a_usable_store_goes_to_a_temporary_file(tmp_path, monkeypatch):
    import tempfile

    from embedkit import cli

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setitem(cli._invocation, "store", tmp_path / "no-store")
    try:
        raise KeyError("x")
    except KeyError:
        log = cli._write_bug_log()
    assert log.parent == tmp_path / "tmp" and log.name.startswith("embedkit-") and log.suffix == ".log"
    assert "KeyError: 'x'" in log.read_text() and not (tmp_path / "no-store").exists()


def test_a_read_only_store_answers_readers_and_refuses_writers_in_one_line(tmp_path):
    """A real read-only store: a read-only bind mount where the tests run as root (whom chmod does not stop), the
    write bits removed otherwise."""
    import os

    from embedkit.store.store import Store

    store = _runs_store(tmp_path / "s")
    view = tmp_path / "ro"
    if os.geteuid() == 0:
        view.mkdir()
        mounted = subprocess.run(["mount", "--bind", str(store.path), str(view)], capture_output=True).returncode == 0
        if not mounted or subprocess.run(["mount", "-o", "remount,ro,bind", str(view)],
                                         capture_output=True).returncode != 0:
            subprocess.run(["umount", str(view)], capture_output=True)
            pytest.skip("root, and no read-only bind mount here")
    else:
        view = store.path
        for path in [view, *view.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
    try:
        runs = _embedkit("--store", str(view), "sql", "--format", "csv", "SELECT run_id FROM runs")
        assert runs.returncode == 0 and runs.stdout.split() == ["run_id", "r1"], runs.stderr
        delete = _embedkit("--store", str(view), "runs", "delete", "r1")
        assert delete.returncode == 1 and "Traceback" not in delete.stderr, delete.stderr
        assert len(delete.stderr.strip().splitlines()) == 1, delete.stderr
        assert re.match(r"error: (Read-only file system|Permission denied)", delete.stderr), delete.stderr
        assert "nothing after the last completed step was recorded" in delete.stderr or \
            "this write was not recorded" in delete.stderr
        assert Store(view).count("runs") == 1 and Store(view).count("predictions") == 1
    finally:
        if view != store.path:
            subprocess.run(["umount", str(view)], capture_output=True)
        else:
            for path in [view, *view.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)

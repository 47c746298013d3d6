"""Bad input gets one `error:` line naming the file and the reason, and writes nothing (a start on issue 14's corpus)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "header-only.csv": ("image_id,label,age,sex\n", [], "has a header but no rows"),
    "repeated-column.csv": ("image_id,label,age,sex,sex\na.png,Effusion,40,M,F\n", [],
                            "appear more than once in the header"),
    "map-clash.csv": ("image_id,label,age,Sex,sex\na.png,Effusion,40,M,F\n", ["--map", "Sex=sex"],
                      "--map would give two columns the name"),
}


def _embedkit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_manifest_is_one_line_naming_the_file(tmp_path, name):
    text, extra, reason = CASES[name]
    manifest = tmp_path / name
    manifest.write_text(text)
    store = tmp_path / "store"
    result = _embedkit("--store", str(store), "data", "import", str(manifest), "--images", str(tmp_path),
                       "--cohort", "c", "--no-verify", *extra)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {manifest}: ") and reason in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not store.exists()  # nothing written


def test_a_store_path_that_is_a_file_is_refused(tmp_path):
    import os

    target = tmp_path / "not-a-folder"
    target.write_text("x")
    for args in (["runs"], ["doctor"], ["sql", "SELECT 1"]):
        result = _embedkit(*args, env={**os.environ, "EMBEDKIT_STORE": str(target)})
        assert result.returncode == 1 and "is a file, not a folder" in result.stderr, (args, result.stderr)
    assert target.read_text() == "x"


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

"""Hostile-input cases: weights files that are not checkpoints, damaged fine-tuning checkpoints on `--resume`, and
model names that do not exist (see tests/hostile.py)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from hostile import Case, embedkit, small_manifest

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0f" * 32 + b"\nsize 598641023\n"
CHEXZERO_FILE = "best_64_5e-05_original_22000_0.864.pt"


def _weights(model: str, files: dict[str, bytes]):
    """Files in ``{tmp}/w/<model>/`` (a weights folder as `--weights-dir {tmp}/w` reads it)."""
    def setup(tmp: Path, store: Path) -> None:
        folder = tmp / "w" / model
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)

    return setup


def _truncated_checkpoint() -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, buffer)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _embed(model: str, *extra: str) -> tuple[str, ...]:
    return ("embed", "--model", model, "--cohort", "c", "--device", "cpu", "--quiet", *extra)


# ---- a fine-tuning run stopped after one epoch, built once, copied by each case that damages its last.pt --------


RUN_ID = "lora-stopped"


@functools.cache
def _stopped_run() -> Path:
    """A store with a cohort of train and val rows and LoRA run RUN_ID of tiny-clip stopped after its first epoch
    (the library call: the command line has no option fixing a run's id)."""
    from embedkit.finetune.train import FinetuneConfig, finetune
    from embedkit.store.store import Store

    root = Path(tempfile.mkdtemp(prefix="embedkit-hostile-finetune-"))
    atexit.register(shutil.rmtree, root, True)
    store = root / "store"
    manifest = small_manifest(root / "cohort", n_per_class=3)  # splits train, train, val per class
    result = embedkit(store, ["data", "import", str(manifest), "--images", str(root / "cohort" / "images"),
                              "--cohort", "f"])
    assert result.returncode == 0, result.stderr
    config = FinetuneConfig(model="tiny-clip", method="lora", cohort="f", random_init=True, epochs=2, batch_size=8,
                            device="cpu", workers=0)
    finetune(Store(store), config, progress=False, stop_after=1, run_id=RUN_ID)
    return store


class _Hostile:
    def __reduce__(self):
        return (print, ("this must never run",))


def _damaged_last(damage):
    """The stopped run's store in ``store``, its last.pt replaced by ``damage(bytes of last.pt)``."""
    def setup(tmp: Path, store: Path) -> None:
        shutil.copytree(_stopped_run(), store, symlinks=True)
        last = store / "checkpoints" / RUN_ID / "last.pt"
        last.write_bytes(damage(last.read_bytes()))

    return setup


def _hostile_pickle(good: bytes) -> bytes:
    import io

    import torch

    saved = torch.load(io.BytesIO(good), weights_only=True)
    saved["history"] = _Hostile()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    return buffer.getvalue()


def _resume_case(name: str, damage, reason: str) -> Case:
    return Case(name, ("finetune", "--resume", RUN_ID, "--device", "cpu", "--workers", "0", "--quiet"), reason,
                names=f"{{store}}/checkpoints/{RUN_ID}/last.pt", setup=_damaged_last(damage))


_UNKNOWN = "unknown model 'tiny-clp'; did you mean tiny-clip?"

CASES = [
    # weights that are not checkpoints: named as what they are, before any model is built
    Case("weights-dir-lfs-pointer", _embed("clip", "--weights-dir", "{tmp}/w"), "is a Git LFS pointer",
         names="{tmp}/w/clip/open_clip_model.safetensors", store="cohort",
         setup=_weights("clip", {"open_clip_model.safetensors": LFS_POINTER})),
    Case("weights-file-lfs-pointer", _embed("chexzero", "--weights", f"{{tmp}}/w/chexzero/{CHEXZERO_FILE}"),
         "is a Git LFS pointer", names=f"{{tmp}}/w/chexzero/{CHEXZERO_FILE}", store="cohort",
         setup=_weights("chexzero", {CHEXZERO_FILE: LFS_POINTER})),
    Case("weights-html-page", _embed("chexzero", "--weights-dir", "{tmp}/w"), "is an HTML page, not the file",
         names=f"{{tmp}}/w/chexzero/{CHEXZERO_FILE}", store="cohort",
         setup=_weights("chexzero", {CHEXZERO_FILE: b"<!DOCTYPE html>\n<html><body>Access denied</body></html>"})),
    Case("weights-empty-file", _embed("medclip-vit", "--weights-dir", "{tmp}/w"), "pytorch_model.bin is empty",
         names="{tmp}/w/medclip-vit/", store="cohort",
         setup=_weights("medclip-vit", {"pytorch_model.bin": b"", "vocab.txt": b"[PAD]\n"})),
    Case("weights-text-file", _embed("chexzero", "--weights-dir", "{tmp}/w"),
         "is not a checkpoint (it opens with b'these are not w", names=f"{{tmp}}/w/chexzero/{CHEXZERO_FILE}",
         store="cohort", setup=_weights("chexzero", {CHEXZERO_FILE: b"these are not weights\n"})),
    Case("weights-truncated-checkpoint", _embed("chexzero", "--weights-dir", "{tmp}/w"),
         "is not a readable PyTorch state dict", names=f"{{tmp}}/w/chexzero/{CHEXZERO_FILE}", store="cohort",
         setup=lambda tmp, store: _weights("chexzero", {CHEXZERO_FILE: _truncated_checkpoint()})(tmp, store)),
    # fine-tuning checkpoints changed after the run wrote them
    _resume_case("resume-truncated-last-pt", lambda good: good[: len(good) // 2],
                 "truncated, damaged or not this run's checkpoint"),
    _resume_case("resume-tampered-last-pt", _hostile_pickle,
                 "it holds objects other than tensors and training state, which embedkit never unpickles"),
    _resume_case("resume-last-pt-not-a-checkpoint", lambda good: b"not a checkpoint\n",
                 "last.pt is not a checkpoint (it opens with b'not a checkpoint"),
    Case("resume-unknown-run", ("finetune", "--resume", "lora-nope"), "resumable runs: none",
         names="no checkpoint of run 'lora-nope'", store="cohort"),
    # a misspelt model: the nearest real one, never a hint to run a command with the misspelt name
    Case("unknown-model-probe", ("probe", "--model", "tiny-clp"), _UNKNOWN, store="embedded"),
    Case("unknown-model-zeroshot", ("zeroshot", "--model", "tiny-clp"), _UNKNOWN, store="embedded"),
    Case("unknown-model-sweep", ("sweep", "--model", "tiny-clp", "--quiet"), _UNKNOWN, store="embedded"),
    Case("unknown-model-embed", _embed("tiny-clp", "--random-init"), _UNKNOWN, store="cohort"),
    Case("unknown-model-finetune", ("finetune", "--model", "tiny-clp", "--method", "lora", "--cohort", "c"), _UNKNOWN,
         store="cohort"),
    Case("unknown-model-pull", ("models", "pull", "tiny-clp"), _UNKNOWN),
]

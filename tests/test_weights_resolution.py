"""Where weights come from: --weights, $EMBEDKIT_WEIGHTS/<model>/, the Hugging Face cache; `models pull` fetches.

A Hugging Face cache is written here exactly as huggingface_hub lays it out (blobs, refs/main, snapshot symlinks),
and an HTTP server on 127.0.0.1 stands in for the hub (HF_ENDPOINT) and for an authors' release URL. Nothing here
reaches the internet: every connection is watched.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.parse
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from conftest import main_cli, write_cohort_images
from embedkit import cli
from embedkit.models import registry
from embedkit.models.registry import ReleaseFile, get_spec, instantiate

CLIP_REPO = get_spec("clip").hf_repo
BIOMEDCLIP_REPO = get_spec("biomedclip").hf_repo
COMMIT = "0123456789abcdef0123456789abcdef01234567"
_HEADER = b'{"__metadata__":{}}'
# Opens as a safetensors file does (the lookup reads the first bytes of each file), then stand-in tensor bytes.
CLIP_FILE = len(_HEADER).to_bytes(8, "little") + _HEADER + b"tensor bytes of the clip checkpoint" * 50
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 598641023\n"


def write_hub_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Files of ``repo`` in huggingface_hub's cache layout; returns the snapshot folder."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # relative, as huggingface_hub writes them
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty standard Hugging Face cache, no $EMBEDKIT_WEIGHTS."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads HF_HUB_CACHE when it is imported (long before this test): set what it read.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("EMBEDKIT_WEIGHTS", raising=False)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return cache


@pytest.fixture
def connections(monkeypatch) -> list:
    """Every address a socket connects to; anything but this machine's loopback is refused."""
    seen: list = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        seen.append(address)
        if not (isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1", "localhost")):
            raise OSError(f"test: no connection to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda sock, address: connect(sock, address) or 0)
    return seen


def _listing(monkeypatch, capsys, *args: str) -> dict[str, dict]:
    code, out, err = main_cli(monkeypatch, capsys, "models", "--json", *args)
    assert code == 0, err
    return {item["model"]: item for item in json.loads(out)}


# ---- resolution ------------------------------------------------------------------------------------------------


def test_models_reports_the_cached_snapshot_and_what_is_missing(hf_cache, monkeypatch, capsys, connections):
    snapshot = write_hub_cache(hf_cache, CLIP_REPO, {"open_clip_model.safetensors": CLIP_FILE})
    # BiomedCLIP half downloaded: vocab.txt is not there, so it is not found
    write_hub_cache(hf_cache, BIOMEDCLIP_REPO, {"open_clip_config.json": b"{}", "open_clip_pytorch_model.bin": b"x",
                                                "tokenizer_config.json": b"{}"})
    listing = _listing(monkeypatch, capsys)
    assert (listing["clip"]["found"], listing["clip"]["found_in"]) == (str(snapshot), "hf-cache")
    assert listing["clip"]["get"] is None and listing["clip"]["hf_repo"] == CLIP_REPO
    assert (listing["biomedclip"]["found"], listing["biomedclip"]["found_in"]) == (None, None)
    assert "`embedkit models pull biomedclip`" in listing["biomedclip"]["get"]
    assert listing["gloria"]["found"] is None and not listing["gloria"]["pullable"]
    assert "`embedkit models pull gloria --url URL`" in listing["gloria"]["get"]  # a Drive folder: the user's link
    assert "$EMBEDKIT_WEIGHTS/gloria/" in listing["gloria"]["get"] and listing["medclip-vit"]["pullable"]
    assert listing["tiny-clip"]["found"] is None and listing["tiny-clip"]["hf_repo"] is None

    code, out, _ = main_cli(monkeypatch, capsys, "models")
    assert code == 0
    assert f"found (hf-cache): {snapshot}" in out and "to get them: `embedkit models pull biomedclip`" in out
    assert connections == []


def test_the_weights_folder_comes_before_the_cache_and_a_dangling_link_is_absent(hf_cache, tmp_path, monkeypatch,
                                                                                  capsys):
    snapshot = write_hub_cache(hf_cache, CLIP_REPO, {"open_clip_model.safetensors": CLIP_FILE})
    weights = tmp_path / "weights"
    (weights / "clip").mkdir(parents=True)
    (weights / "clip" / "open_clip_model.safetensors").write_bytes(CLIP_FILE)
    listing = _listing(monkeypatch, capsys, "--weights-dir", str(weights))
    assert (listing["clip"]["found"], listing["clip"]["found_in"]) == (str(weights / "clip"), "weights-dir")
    spec = get_spec("clip")
    assert spec.locate_weights("some/file.pt", weights) == (Path("some/file.pt"), "--weights")
    assert spec.locate_weights(None, tmp_path / "elsewhere") == (snapshot, "hf-cache")
    assert spec.find_weights(tmp_path / "elsewhere") == snapshot
    # a blob removed under its snapshot link (a cleaned cache): the snapshot no longer holds the file
    for blob in (hf_cache / "models--timm--vit_base_patch16_clip_224.openai" / "blobs").iterdir():
        blob.unlink()
    assert spec.locate_weights(None, tmp_path / "elsewhere") == (None, None)


def test_files_that_are_not_checkpoints_are_named_as_what_they_are_not_found(hf_cache, tmp_path, monkeypatch,
                                                                              capsys):
    weights = tmp_path / "weights"
    for model, name, data in [("clip", "open_clip_model.safetensors", LFS_POINTER),
                              ("chexzero", "best_64_5e-05_original_22000_0.864.pt", b"<!DOCTYPE html><html>denied"),
                              ("medclip-vit", "pytorch_model.bin", b"not a checkpoint at all"),
                              ("medclip-vit", "vocab.txt", b"[PAD]\n")]:
        (weights / model).mkdir(parents=True, exist_ok=True)
        (weights / model / name).write_bytes(data)
    write_hub_cache(hf_cache, BIOMEDCLIP_REPO, {name: LFS_POINTER for name in get_spec("biomedclip").weight_files})
    listing = _listing(monkeypatch, capsys, "--weights-dir", str(weights))
    assert [listing[m]["found"] for m in ("clip", "chexzero", "medclip-vit", "biomedclip")] == [None] * 4
    assert listing["clip"]["unusable"] == (f"{weights}/clip/open_clip_model.safetensors is a Git LFS pointer (a small "
                                           "text file standing for the real one, which was never downloaded): fetch "
                                           "the file itself (`git lfs pull` in the clone it came from); `embedkit "
                                           "models pull clip` fetches it")
    assert "is an HTML page" in listing["chexzero"]["unusable"]  # a Drive folder's file: the user's link
    assert "`embedkit models pull chexzero --url LINK` fetches it" in listing["chexzero"]["unusable"]
    assert listing["medclip-vit"]["unusable"].endswith("pytorch_model.bin is not a checkpoint (it opens with "
                                                       "b'not a checkpoint', not a zip, pickle or safetensors header); "
                                                       "`embedkit models pull medclip-vit` fetches it")
    # the cache's copy is looked at too; not found, the listing says where it looked
    assert listing["biomedclip"]["unusable"].startswith(f"{hf_cache}/models--microsoft--BiomedCLIP")
    assert "open_clip_config.json is a Git LFS pointer" in listing["biomedclip"]["unusable"]
    assert listing["biomedclip"]["looked_in"] == [f"{weights}/biomedclip/",
                                                  f"the Hugging Face cache {hf_cache} ({BIOMEDCLIP_REPO})"]
    code, out, _ = main_cli(monkeypatch, capsys, "models", "--weights-dir", str(weights))
    assert code == 0 and "found" not in out.replace("not found", "")
    assert f"not usable: {weights}/clip/open_clip_model.safetensors is a Git LFS pointer" in out
    assert f"not found (looked in {weights}/gloria/)" in out
    # the same files given to a command: one CheckpointError naming the file, before any model is built
    from embedkit.models.base import CheckpointError

    with pytest.raises(CheckpointError, match="open_clip_model.safetensors is a Git LFS pointer"):
        instantiate(get_spec("clip"), weights_dir=weights)
    with pytest.raises(CheckpointError, match="pytorch_model.bin is not a checkpoint"):
        instantiate(get_spec("medclip-vit"), weights=weights / "medclip-vit")


def test_instantiate_loads_the_snapshot_it_found(hf_cache):
    from safetensors.torch import save_file

    tiny = get_spec("tiny-clip")
    source = tiny.build(seed=3)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    file = write_hub_cache(hf_cache, CLIP_REPO, {}) / "open_clip_model.safetensors"
    save_file(state, str(file))  # a plain file in the snapshot works as a link does
    # the tiny architecture standing in for a hub-published model
    spec = replace(tiny, tiny=False, hf_repo=CLIP_REPO)
    model, weights_id, where = instantiate(spec)
    assert where == str(file.parent)
    assert weights_id.startswith("sha256:")
    for key, value in source.model.state_dict().items():
        assert (model.model.state_dict()[key] == value).all(), key


def test_hf_home_names_the_cache_for_a_fresh_process(tmp_path):
    home = tmp_path / "hf-home"
    snapshot = write_hub_cache(home / "hub", CLIP_REPO, {"open_clip_model.safetensors": CLIP_FILE})
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "EMBEDKIT_WEIGHTS", "PYTHONPATH")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(cli.__file__).parents[1]))
    result = subprocess.run([sys.executable, "-m", "embedkit.cli", "models", "--json"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    found = {item["model"]: item["found"] for item in json.loads(result.stdout)}
    assert found["clip"] == str(snapshot) and found["biomedclip"] is None


def test_nothing_connects_without_a_pull(hf_cache, tmp_path, monkeypatch, capsys, connections):
    # Lift offline mode: were anything to try the hub, it would now try to connect (and be seen).
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    listing = _listing(monkeypatch, capsys)
    assert all(item["found"] is None for item in listing.values())
    frame = write_cohort_images(tmp_path / "images", n_per_class=1)
    frame.to_csv(tmp_path / "m.csv", index=False)
    assert main_cli(monkeypatch, capsys, "--store", str(tmp_path / "s"), "data", "import", str(tmp_path / "m.csv"),
                    "--images", str(tmp_path / "images"), "--cohort", "c")[0] == 0
    code, out, err = main_cli(monkeypatch, capsys, "--store", str(tmp_path / "s"), "embed", "--model", "clip",
                           "--cohort", "c")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: No weights for model 'clip'")
    assert "`embedkit models pull clip`" in err and "--random-init" in err
    code, _, err = main_cli(monkeypatch, capsys, "models", "pull", "gloria", "--weights-dir", str(tmp_path / "w"))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "chexpert_resnet50.ckpt of gloria has no fixed download URL" in err and "--url URL" in err
    assert connections == []
    assert not (tmp_path / "s" / "emb_clip.lance").exists()


# ---- the stand-in server -----------------------------------------------------------------------------------------


class _Served:
    """What the stand-in serves (path -> bytes, extra headers) and what it was asked for."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.cut: dict[str, int] = {}  # path -> bytes after which the next response breaks off
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.sent: list[tuple[str, int]] = []  # (path, body bytes sent)

    def hub_file(self, repo: str, name: str, data: bytes, commit: str = COMMIT) -> None:
        # The headers hf_hub_download needs (huggingface_hub 2.4, file_download.get_hf_file_metadata): the commit,
        # an ETag (the blob's name in the cache; the sha256 for LFS files) and the size.
        self.files[f"/{repo}/resolve/main/{name}"] = (data, {"X-Repo-Commit": commit,
                                                            "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})


def _handler(served: _Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            asked = self.headers.get("Range")
            served.requests.append((self.command, path, asked))
            if path not in served.files:
                self.send_error(404)
                return
            data, headers = served.files[path]
            start = int(asked.removeprefix("bytes=").rstrip("-")) if asked else 0
            if start >= len(data) and asked:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if asked else 200)
            for key, value in headers.items():
                self.send_header(key, value)
            if asked:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if body:
                chunk = data[start:start + served.cut.pop(path)] if path in served.cut else data[start:]
                self.wfile.write(chunk)
                served.sent.append((path, len(chunk)))

    return Handler


@pytest.fixture
def server(hf_cache, monkeypatch):
    """(what is served, its base URL); HF_ENDPOINT points at it."""
    served = _Served()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # as tests/conftest.py sets it: pull must lift it
    yield served, base
    httpd.shutdown()
    httpd.server_close()
    thread.join()


# ---- pull ------------------------------------------------------------------------------------------------------


def test_pull_fetches_a_hub_model_into_the_standard_cache(server, hf_cache, monkeypatch, capsys, connections):
    served, base = server
    served.hub_file(CLIP_REPO, "open_clip_model.safetensors", CLIP_FILE)
    code, out, err = main_cli(monkeypatch, capsys, "models", "pull", "clip", "--quiet")
    assert code == 0, err
    root = hf_cache / "models--timm--vit_base_patch16_clip_224.openai"
    snapshot = root / "snapshots" / COMMIT
    assert out.strip() == f"clip: {snapshot}"
    assert (root / "refs" / "main").read_text() == COMMIT
    link = snapshot / "open_clip_model.safetensors"
    assert link.is_symlink() and link.read_bytes() == CLIP_FILE
    assert link.resolve() == (root / "blobs" / hashlib.sha256(CLIP_FILE).hexdigest()).resolve()
    assert [(m, p) for m, p, _ in served.requests] == [("HEAD", f"/{CLIP_REPO}/resolve/main/open_clip_model"
                                                                ".safetensors"),
                                                       ("GET", f"/{CLIP_REPO}/resolve/main/open_clip_model"
                                                               ".safetensors")]
    assert hf_constants.HF_HUB_OFFLINE is True  # lifted for the pull only
    assert connections and all(address[0] == "127.0.0.1" for address in connections)
    # and now the listing finds it, without asking the server again
    before = len(served.requests)
    listing = _listing(monkeypatch, capsys)
    assert (listing["clip"]["found"], listing["clip"]["found_in"]) == (str(snapshot), "hf-cache")
    assert len(served.requests) == before


def test_pull_from_a_hub_that_does_not_answer_is_one_line(server, monkeypatch, capsys):
    served, base = server
    # nothing served: the hub answers 404 for the file
    code, out, err = main_cli(monkeypatch, capsys, "models", "pull", "biomedclip", "--quiet")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: could not fetch open_clip_config.json of {BIOMEDCLIP_REPO} from {base}")


def _release_model(monkeypatch, base: str, files: dict[str, bytes], sha256: dict[str, str] | None = None) -> None:
    """gloria, given a checksummed release of ``files`` at the stand-in server."""
    releases = tuple(ReleaseFile(url=f"{base}/release/{name}", file=name,
                                 sha256=(sha256 or {}).get(name, hashlib.sha256(data).hexdigest()))
                     for name, data in files.items())
    monkeypatch.setitem(registry.MODELS, "gloria", replace(registry.MODELS["gloria"], releases=releases))


def test_pull_of_a_release_resumes_an_interrupted_download_and_verifies_it(server, tmp_path, monkeypatch, capsys):
    served, base = server
    checkpoint = b"PK\x03\x04" + os.urandom(3 * (1 << 20) + 12345)  # opens as torch.save's zip does
    vocab = b"[PAD]\n[UNK]\nlung\n"
    served.files = {"/release/chexpert_resnet50.ckpt": (checkpoint, {}), "/release/vocab.txt": (vocab, {})}
    served.cut["/release/chexpert_resnet50.ckpt"] = (1 << 20) + 7  # the first attempt breaks off
    _release_model(monkeypatch, base, {"chexpert_resnet50.ckpt": checkpoint, "vocab.txt": vocab})
    folder = tmp_path / "weights" / "gloria"
    part = folder / "chexpert_resnet50.ckpt.part"

    code, out, err = main_cli(monkeypatch, capsys, "models", "pull", "gloria", "--weights-dir", str(tmp_path / "weights"),
                           "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"{(1 << 20) + 7} bytes are kept in {part}: run the same command again to resume" in err
    assert part.stat().st_size == (1 << 20) + 7 and not (folder / "chexpert_resnet50.ckpt").exists()

    monkeypatch.setenv("EMBEDKIT_WEIGHTS", str(tmp_path / "weights"))
    code, out, err = main_cli(monkeypatch, capsys, "models", "pull", "gloria")  # with its progress bar (on stderr)
    assert code == 0, err
    assert out.strip() == f"gloria: {folder}"
    assert served.requests[1] == ("GET", "/release/chexpert_resnet50.ckpt", f"bytes={(1 << 20) + 7}-")
    assert served.sent[1] == ("/release/chexpert_resnet50.ckpt", len(checkpoint) - (1 << 20) - 7)  # the rest only
    assert (folder / "chexpert_resnet50.ckpt").read_bytes() == checkpoint
    assert (folder / "vocab.txt").read_bytes() == vocab and not part.exists()
    assert get_spec("gloria").locate_weights() == (folder, "weights-dir")

    # pulled files are not fetched again
    before = len(served.requests)
    assert main_cli(monkeypatch, capsys, "models", "pull", "gloria", "--quiet")[0] == 0
    assert len(served.requests) == before


def test_a_complete_part_is_verified_without_downloading_again(server, tmp_path, monkeypatch, capsys):
    served, base = server
    data = b"a whole checkpoint, stopped before its rename" * 100
    served.files = {"/release/chexpert_resnet50.ckpt": (data, {})}
    _release_model(monkeypatch, base, {"chexpert_resnet50.ckpt": data})
    monkeypatch.setitem(registry.MODELS, "gloria", replace(registry.MODELS["gloria"],
                                                           weight_files=("chexpert_resnet50.ckpt",)))
    folder = tmp_path / "w" / "gloria"
    folder.mkdir(parents=True)
    (folder / "chexpert_resnet50.ckpt.part").write_bytes(data)
    code, _, err = main_cli(monkeypatch, capsys, "models", "pull", "gloria", "--weights-dir", str(tmp_path / "w"),
                         "--quiet")
    assert code == 0, err
    assert served.requests == [("GET", "/release/chexpert_resnet50.ckpt", f"bytes={len(data)}-")]  # answered 416
    assert served.sent == [] and (folder / "chexpert_resnet50.ckpt").read_bytes() == data


def test_a_release_that_fails_its_checksum_is_deleted(server, tmp_path, monkeypatch, capsys):
    served, base = server
    data = b"not the file the release was checksummed from" * 100
    served.files = {"/release/chexpert_resnet50.ckpt": (data, {})}
    _release_model(monkeypatch, base, {"chexpert_resnet50.ckpt": data}, sha256={"chexpert_resnet50.ckpt": "ab" * 32})
    code, out, err = main_cli(monkeypatch, capsys, "models", "pull", "gloria", "--weights-dir", str(tmp_path / "w"),
                           "--quiet")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert f"the download's sha256 is {hashlib.sha256(data).hexdigest()}, not the release's {'ab' * 32}" in err
    assert list((tmp_path / "w" / "gloria").iterdir()) == []  # neither the part nor the file


def _zip(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_medclip_is_pulled_through_its_pointer_unzipped_and_its_digest_recorded(server, tmp_path, monkeypatch,
                                                                                capsys):
    """MedCLIP's own route (medclip/constants.py): a text file holding the zip's URL; the zip holds
    pytorch_model.bin; Bio_ClinicalBERT's vocab.txt comes from the hub. No published checksum: the first pull
    records each digest in SHA256SUMS, and a later download that differs is refused."""
    spec = registry.MODELS["medclip-vit"]
    assert spec.releases[0].url == "https://github.com/RyanWangZf/MedCLIP/raw/main/medclip/medclip_vit_weight.txt"
    assert registry.MODELS["medclip-rn50"].releases[0].url.endswith("/medclip_resnet_weight.txt")
    served, base = server
    weights, vocab = os.urandom(5000), b"[PAD]\n[UNK]\nlung\n"
    archive = _zip({"medclip-vit-pretrained/pytorch_model.bin": weights, "medclip-vit-pretrained/notes.txt": b"x"})
    served.files = {"/medclip_vit_weight.txt": (f"{base}/storage/medclip-vit-pretrained.zip\n".encode(), {}),
                    "/storage/medclip-vit-pretrained.zip": (archive, {}),
                    "/emilyalsentzer/Bio_ClinicalBERT/resolve/main/vocab.txt": (vocab, {})}
    releases = (replace(spec.releases[0], url=f"{base}/medclip_vit_weight.txt"), spec.releases[1])
    monkeypatch.setitem(registry.MODELS, "medclip-vit", replace(spec, releases=releases))
    code, out, err = main_cli(monkeypatch, capsys, "models", "pull", "medclip-vit", "--weights-dir",
                              str(tmp_path / "w"), "--quiet")
    folder = tmp_path / "w" / "medclip-vit"
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS", "pytorch_model.bin", "vocab.txt"]
    assert (folder / "pytorch_model.bin").read_bytes() == weights and (folder / "vocab.txt").read_bytes() == vocab
    sums = (folder / "SHA256SUMS").read_text().splitlines()
    assert sums == [f"{hashlib.sha256(archive).hexdigest()}  pytorch_model.bin.zip",
                    f"{hashlib.sha256(vocab).hexdigest()}  vocab.txt"]
    assert err.count("has no published checksum") == 2
    # The release changes behind the same pointer: refused against the recorded digest, nothing replaced.
    (folder / "pytorch_model.bin").unlink()
    served.files["/storage/medclip-vit-pretrained.zip"] = (_zip({"pytorch_model.bin": b"other"}), {})
    code, out, err = main_cli(monkeypatch, capsys, "models", "pull", "medclip-vit", "--weights-dir",
                              str(tmp_path / "w"), "--quiet")
    assert code == 1 and f"not SHA256SUMS's {hashlib.sha256(archive).hexdigest()}" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS", "vocab.txt"]


@pytest.mark.parametrize("pointer, message", [(b"<html>moved</html>", "does not hold one URL"),
                                              (None, "could not read the release pointer")])
def test_a_broken_pointer_is_one_line(server, tmp_path, monkeypatch, capsys, pointer, message):
    served, base = server
    if pointer is not None:
        served.files = {"/p.txt": (pointer, {})}
    spec = registry.MODELS["medclip-rn50"]
    monkeypatch.setitem(registry.MODELS, "medclip-rn50",
                        replace(spec, releases=(replace(spec.releases[0], url=f"{base}/p.txt"),)))
    code, out, err = main_cli(monkeypatch, capsys, "models", "pull", "medclip-rn50", "--weights-dir",
                              str(tmp_path / "w"), "--quiet")
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_checkpoint_without_a_fixed_url_is_pulled_from_the_link_given(server, tmp_path, monkeypatch, capsys):
    """GLoRIA's checkpoint sits in a Google Drive folder: `--url` gives its link; the vocabulary comes from the
    hub as MedCLIP's does; both digests are recorded."""
    served, base = server
    checkpoint, vocab = os.urandom(4000), b"[PAD]\n[UNK]\nlung\n"
    served.files = {"/drive/ckpt": (checkpoint, {}),
                    "/emilyalsentzer/Bio_ClinicalBERT/resolve/main/vocab.txt": (vocab, {})}
    weights = str(tmp_path / "w")
    code, out, err = main_cli(monkeypatch, capsys, "models", "pull", "gloria", "--weights-dir", weights, "--quiet",
                              "--url", f"{base}/drive/ckpt")
    assert code == 0, err
    folder = tmp_path / "w" / "gloria"
    assert (folder / "chexpert_resnet50.ckpt").read_bytes() == checkpoint
    assert (folder / "vocab.txt").read_bytes() == vocab
    assert len((folder / "SHA256SUMS").read_text().splitlines()) == 2
    code, out, err = main_cli(monkeypatch, capsys, "models", "pull", "medclip-vit", "--weights-dir", weights,
                              "--url", f"{base}/x")
    assert code == 1 and "--url is for a release file without a fixed URL" in err

"""`embedkit models pull NAME`: fetch a model's released files, the one place embedkit reaches the network.

Nothing else downloads: building, loading and `embed` only read what :meth:`ModelSpec.locate_weights` finds.

- Models published on the Hugging Face hub (``spec.hf_repo``): huggingface_hub's ``hf_hub_download`` of each
  weight file into the standard cache (HF_HUB_CACHE / HF_HOME; HF_ENDPOINT names the hub), where
  ``locate_weights`` then finds the snapshot.
- Authors' release files (``spec.releases``): streamed over HTTP into ``<file>.part`` in the model's weights
  folder, resumed with a Range request after an interruption, checked against the release's sha256 and only
  then renamed into place; a mismatch deletes the part. A release may be reached through a pointer (a text file
  holding the URL: MedCLIP's) and may be a zip archive, of which the one member embedkit loads is extracted.
  Where the authors publish no checksum, the first pull records the digest in the folder's ``SHA256SUMS``
  (sha256sum's format) and says so; later pulls must match it, and a digest written there beforehand is checked
  from the first pull on.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from embedkit.errors import EmbedkitError
from embedkit.models.registry import ModelSpec, ReleaseFile

CHUNK_BYTES = 1 << 20
SUMS_FILE = "SHA256SUMS"  # digests of release files without a published checksum, recorded by the first pull
POINTER_BYTES = 4096  # a pointer file is one URL
HUB = "https://huggingface.co"
TIMEOUT_S = 60.0  # per socket operation: a stalled server ends the pull (resumable) instead of hanging it


class PullError(EmbedkitError):
    """A model's files could not be fetched (nothing fetchable, the network, a checksum)."""


def pull(spec: ModelSpec, weights_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Fetch ``spec``'s released files; returns the folder :meth:`ModelSpec.locate_weights` now finds.

    Hub models go to the Hugging Face cache; release files to ``weights_dir`` (or $EMBEDKIT_WEIGHTS)
    ``/<model>/``. A model with neither is an error saying how to get its files by hand.
    """
    if spec.tiny:
        raise PullError(f"'{spec.name}' is a test configuration with no released weights: use --random-init")
    if spec.hf_repo:
        return _pull_from_hub(spec.hf_repo, spec.weight_files, progress)
    if not spec.releases:
        raise PullError(f"model '{spec.name}' has no fetchable release: {spec.how_to_get()}")
    folder = spec.weights_folder(weights_dir)
    if folder is None:
        raise PullError(f"`models pull {spec.name}` writes to $EMBEDKIT_WEIGHTS/{spec.name}/: set "
                        "$EMBEDKIT_WEIGHTS or pass --weights-dir DIR")
    for release in spec.releases:
        fetch_release_file(release, folder / release.file, progress)
    missing = [f for f in spec.weight_files if not (folder / f).exists()]
    if missing:
        raise PullError(f"fetched {spec.name}'s release into {folder}, but it still needs {', '.join(missing)}: "
                        f"get them from {spec.weight_source}")
    return folder


# --------------------------------------------------------------------------------------------------------------
# The Hugging Face hub


@contextmanager
def _hub_online() -> Iterator[None]:
    """Lift HF_HUB_OFFLINE for the pull's own requests, then restore it.

    Users (and embedkit's tests) set HF_HUB_OFFLINE so that no library reaches the hub behind their back; a pull
    is the one request made on purpose, so it alone goes through. huggingface_hub reads the flag per request.
    """
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _pull_from_hub(repo: str, files: tuple[str, ...], progress: bool) -> Path:
    """``files`` of hub repository ``repo`` into the standard cache; returns their snapshot folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import disable_progress_bars

    # The HTTP library's base error (httpx or httpx2, whichever this huggingface_hub uses): a connection that
    # fails mid-transfer surfaces as one of these rather than as huggingface_hub's own errors.
    http_error = next(c for c in HfHubHTTPError.__mro__ if c.__name__ == "HTTPError")
    # HF_ENDPOINT is read now, not when huggingface_hub was imported.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    paths = []
    with _hub_online(), nullcontext() if progress else disable_progress_bars():
        for name in files:
            try:
                paths.append(Path(hf_hub_download(repo, name, endpoint=endpoint)))
            except (OSError, ValueError, http_error) as exc:
                where = endpoint or "https://huggingface.co"
                detail = " ".join(str(exc).split()) or type(exc).__name__
                raise PullError(f"could not fetch {name} of {repo} from {where}: {detail}") from None
    return paths[0].parents[len(Path(files[0]).parts) - 1]


# --------------------------------------------------------------------------------------------------------------
# Release files: streamed, resumable, checksummed


def fetch_release_file(release: ReleaseFile, target: Path, progress: bool = True) -> Path:
    """Download ``release`` to ``target`` unless it is there already (it was verified before it was renamed).

    Bytes go to ``<download>.part`` (the download is ``target`` itself, or ``<target>.zip`` for an archive); an
    interrupted download keeps them and the next call asks only for the rest (HTTP Range; a server that ignores
    the Range sends the whole file again, which replaces the part). The complete part must match the release's
    sha256 (or the one recorded in SHA256SUMS) before it becomes ``target``; otherwise it is deleted.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    download = target.with_name(target.name + ".zip") if release.member else target
    part = download.with_name(download.name + ".part")
    url = _release_url(release)
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"} if have else {"Accept-Encoding": "identity"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as response:
            have, total = _resume_point(url, response, have)
            _stream(response, part, have, total, download.name, progress)
    except urllib.error.HTTPError as exc:
        # 416: the part already holds every byte (an earlier pull stopped between download and rename).
        if not (exc.code == 416 and have):
            raise PullError(f"could not download {url}: HTTP {exc.code} {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        kept = part.stat().st_size if part.exists() else 0
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise PullError(f"could not download {url}: {detail}; {kept} bytes are kept in {part}: run the same "
                        "command again to resume") from None
    _verify(release, url, part, download.name, target)
    if release.member:
        _extract(part, release.member, target)
        part.unlink()
    else:
        part.replace(target)
    return target


def _release_url(release: ReleaseFile) -> str:
    """The URL to download: ``{hf}`` filled in, and a pointer followed (one GET of a one-line text file)."""
    url = release.url.replace("{hf}", (os.environ.get("HF_ENDPOINT") or HUB).rstrip("/"))
    if not release.pointer:
        return url
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            text = response.read(POINTER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise PullError(f"could not read the release pointer {url}: HTTP {exc.code} {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise PullError(f"could not read the release pointer {url}: {detail}") from None
    target = text.decode("utf-8", errors="replace").strip()
    if len(text) > POINTER_BYTES or not target.startswith(("https://", "http://")) or any(c.isspace() for c in target):
        raise PullError(f"the release pointer {url} does not hold one URL (it starts {target[:60]!r}): the authors "
                        "may have moved their release; download it by hand")
    return target


def _recorded_sums(folder: Path) -> dict[str, str]:
    sums = folder / SUMS_FILE
    if not sums.exists():
        return {}
    out = {}
    for line in sums.read_text(errors="replace").splitlines():
        digest, _, name = line.strip().partition(" ")
        if digest and name.strip():
            out[name.strip().lstrip("*")] = digest.lower()
    return out


def _verify(release: ReleaseFile, url: str, part: Path, name: str, target: Path) -> None:
    """The part's sha256 against the release's, else against SHA256SUMS, else recorded there (and said)."""
    digest = _sha256(part)
    recorded = _recorded_sums(part.parent).get(name)
    expected, whose = (release.sha256.lower(), "the release's") if release.sha256 else (recorded, SUMS_FILE + "'s")
    if expected is None:
        with (part.parent / SUMS_FILE).open("a") as sums:
            sums.write(f"{digest}  {name}\n")
        print(f"note: {url} has no published checksum; its sha256 {digest} is recorded in "
              f"{part.parent / SUMS_FILE}, and later pulls must match it", file=sys.stderr)
    elif digest != expected:
        part.unlink()
        raise PullError(f"{url}: the download's sha256 is {digest}, not {whose} {expected}; it was deleted (a "
                        f"changed or corrupted release: nothing was written to {target})")


def _extract(archive: Path, member: str, target: Path) -> None:
    """The archive's one member named ``member`` (at any depth) into ``target``, through a temporary name."""
    try:
        with zipfile.ZipFile(archive) as zf:
            found = [i for i in zf.infolist() if not i.is_dir() and Path(i.filename).name == member]
            if len(found) != 1:
                names = ", ".join(i.filename for i in zf.infolist()[:10])
                raise PullError(f"{archive}: the release archive holds {len(found)} files named {member} (it holds "
                                f"{names}); download and unzip it by hand")
            partial = target.with_name(target.name + ".unzipping")
            with zf.open(found[0]) as source, partial.open("wb") as out:
                while block := source.read(CHUNK_BYTES):
                    out.write(block)
    except (zipfile.BadZipFile, EOFError) as exc:
        archive.unlink()
        raise PullError(f"{archive}: the release is not a readable zip archive ({exc}); it was deleted, run the "
                        "same command again to download it anew") from None
    partial.replace(target)


def _resume_point(url: str, response: http.client.HTTPResponse, have: int) -> tuple[int, int | None]:
    """(bytes of the part to keep, the file's total size if the server says): 206 continues the part, 200 restarts."""
    length = response.headers.get("Content-Length")
    if response.status == 206:
        # Content-Range: bytes START-END/TOTAL; only a continuation of exactly our part can be appended.
        span, _, size = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
        start = span.partition("-")[0]
        if not start.isdigit() or int(start) != have:
            raise PullError(f"{url}: asked for bytes from {have}, the server sent "
                            f"'{response.headers.get('Content-Range')}'; delete the .part file to start over")
        return have, int(size) if size.isdigit() else (have + int(length) if length else None)
    return 0, int(length) if length else None


def _stream(response: http.client.HTTPResponse, part: Path, have: int, total: int | None, label: str,
            progress: bool) -> None:
    """Append the response body to ``part`` (or write it anew when ``have`` is 0), with a download bar."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with part.open("ab" if have else "wb") as out, \
            Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task(label, total=total, completed=have)
        while chunk := response.read(CHUNK_BYTES):
            out.write(chunk)
            bar.advance(task, len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        # The connection closed early without an error from http.client: keep the part for the next pull.
        raise ConnectionError(f"the connection closed after {size} of {total} bytes")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()

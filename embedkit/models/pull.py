"""`embedkit models pull NAME`: fetch a model's released files, the one place embedkit reaches the network.

Nothing else downloads: building, loading and `embed` only read what :meth:`ModelSpec.locate_weights` finds.

- Models published on the Hugging Face hub (``spec.hf_repo``): huggingface_hub's ``hf_hub_download`` of each
  weight file into the standard cache (HF_HUB_CACHE / HF_HOME; HF_ENDPOINT names the hub), where
  ``locate_weights`` then finds the snapshot.
- Authors' release files (``spec.releases``): streamed over HTTP into ``<file>.part`` in the model's weights
  folder, resumed with a Range request after an interruption, checked against the release's sha256 and only
  then renamed into place; a mismatch deletes the part.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from embedkit.errors import EmbedkitError
from embedkit.models.registry import ModelSpec, ReleaseFile

CHUNK_BYTES = 1 << 20
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

    Bytes go to ``target.part``; an interrupted download keeps them and the next call asks only for the rest
    (HTTP Range; a server that ignores the Range sends the whole file again, which replaces the part). The
    complete part must match ``release.sha256`` before it becomes ``target``; otherwise it is deleted.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"} if have else {"Accept-Encoding": "identity"}
    try:
        with urllib.request.urlopen(urllib.request.Request(release.url, headers=headers),
                                    timeout=TIMEOUT_S) as response:
            have, total = _resume_point(release, response, have)
            _stream(response, part, have, total, target.name, progress)
    except urllib.error.HTTPError as exc:
        # 416: the part already holds every byte (an earlier pull stopped between download and rename).
        if not (exc.code == 416 and have):
            raise PullError(f"could not download {release.url}: HTTP {exc.code} {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        kept = part.stat().st_size if part.exists() else 0
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise PullError(f"could not download {release.url}: {detail}; {kept} bytes are kept in {part}: run the same "
                        "command again to resume") from None
    digest = _sha256(part)
    if digest != release.sha256.lower():
        part.unlink()
        raise PullError(f"{release.url}: the download's sha256 is {digest}, not the release's {release.sha256}; "
                        f"it was deleted (a changed or corrupted release: nothing was written to {target})")
    part.replace(target)
    return target


def _resume_point(release: ReleaseFile, response: http.client.HTTPResponse, have: int) -> tuple[int, int | None]:
    """(bytes of the part to keep, the file's total size if the server says): 206 continues the part, 200 restarts."""
    length = response.headers.get("Content-Length")
    if response.status == 206:
        # Content-Range: bytes START-END/TOTAL; only a continuation of exactly our part can be appended.
        span, _, size = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
        start = span.partition("-")[0]
        if not start.isdigit() or int(start) != have:
            raise PullError(f"{release.url}: asked for bytes from {have}, the server sent "
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

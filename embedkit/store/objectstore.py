"""The store on object storage (``--store s3://bucket/path``): what a local folder gives for free, made explicit.

Tables are Lance datasets under the prefix, read and written by LanceDB/Lance through their own object-store
support; storage options come from the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for an S3-compatible server;
an ``http://`` endpoint turns on ``allow_http``). Each Lance commit is atomic on S3: a new table version becomes
visible with one conditional put of its manifest, and a writer that loses that race rebases or fails.

What a folder gave through the operating system is done here with S3 conditional writes (``If-None-Match: *``,
``If-Match: <etag>``; AWS S3 since 2024, MinIO, moto): the store's locks (``_locks/<name>.lock``) are *leases*, an
object created only if absent, naming its holder (host, pid, what it does) and an expiry. A lease is released by a
delete conditional on its etag. A holder that died leaves its lease behind: it is taken over (a put conditional on
the dead lease's etag, so two waiters cannot both take it) once it has expired, or at once when its holder ran on
this host and its pid is gone. The run journal (``_journal/<id>.json``) is plain objects. boto3 does the
conditional requests; it is imported only for an ``s3://`` store (``pip install 'embedkit[s3]'``).
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone

from embedkit.errors import EmbedkitError

SCHEMES = ("s3://",)
LEASE_S = 300.0  # a lock lease: run commits take seconds; a holder that needs longer must not hold a lease


def is_object_store(location) -> bool:
    return isinstance(location, str) and location.startswith(SCHEMES)


class StoreURI(str):
    """A store's location on object storage (``s3://bucket/prefix``), with the few path operations messages and
    sub-locations need. It is no local path: nothing local exists under it (``exists`` and friends are False)."""

    def __new__(cls, uri: str):
        return super().__new__(cls, uri.rstrip("/"))

    def __truediv__(self, other) -> "StoreURI":
        return StoreURI(f"{self}/{other}")

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "StoreURI":
        return StoreURI(self.rsplit("/", 1)[0])

    def exists(self) -> bool:
        return False

    is_dir = is_file = exists

    def resolve(self) -> "StoreURI":
        return self

    @property
    def bucket(self) -> str:
        return self.split("://", 1)[1].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        rest = self.split("://", 1)[1]
        return rest.split("/", 1)[1] if "/" in rest else ""


def storage_options() -> dict[str, str]:
    """Lance's storage options: its defaults read the AWS environment; an http:// endpoint needs allow_http."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    options: dict[str, str] = {}
    if endpoint:
        options["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["allow_http"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["aws_region"] = region
    return options


class ObjectStoreError(EmbedkitError):
    pass


class Objects:
    """The few object operations the store needs besides Lance's: conditional put, get, delete, list."""

    def __init__(self, uri: StoreURI):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ObjectStoreError(f"a store on object storage ({uri}) needs boto3 for its locks and journal: "
                                   "`pip install 'embedkit[s3]'`") from None
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or None
        self.uri = uri
        self.bucket = uri.bucket
        self.base = uri.prefix
        self.client = boto3.client("s3", endpoint_url=endpoint,
                                   config=Config(retries={"max_attempts": 3}, connect_timeout=5, read_timeout=30))

    def key(self, relative: str) -> str:
        return f"{self.base}/{relative}" if self.base else relative

    @staticmethod
    def _code(exc) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    def put(self, relative: str, body: bytes, if_none_match: bool = False, if_match: str | None = None) -> str | None:
        """Write an object; the etag, or None when the condition did not hold (present / changed meanwhile)."""
        from botocore.exceptions import ClientError

        extra = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key(relative), Body=body, **extra)["ETag"]
        except ClientError as exc:
            if self._code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return None
            raise self.error(exc) from None

    def get(self, relative: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key(relative))
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise self.error(exc) from None
        return reply["Body"].read(), reply["ETag"]

    def delete(self, relative: str, if_match: str | None = None) -> bool:
        from botocore.exceptions import ClientError

        extra = {"IfMatch": if_match} if if_match else {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(relative), **extra)
            return True
        except ClientError as exc:
            if self._code(exc) in ("PreconditionFailed", "NoSuchKey", "404", "412"):
                return False
            raise self.error(exc) from None

    def list(self, relative_prefix: str) -> list[str]:
        """Keys (relative to the store) under a prefix."""
        from botocore.exceptions import ClientError

        out, token = [], None
        strip = len(self.key(""))
        try:
            while True:
                extra = {"ContinuationToken": token} if token else {}
                reply = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(relative_prefix), **extra)
                out += [o["Key"][strip:] for o in reply.get("Contents", [])]
                token = reply.get("NextContinuationToken")
                if not token:
                    return out
        except ClientError as exc:
            raise self.error(exc) from None

    def error(self, exc) -> ObjectStoreError:
        return ObjectStoreError(f"the object store refused a request on {self.uri}: {self._code(exc) or exc} "
                                f"({' '.join(str(exc).split())[:200]}); check the bucket and the AWS_* settings")

    # ---- leases ---------------------------------------------------------------------------------------------------

    @contextmanager
    def lease(self, name: str, wait_s: float, holder: str, busy):
        """Hold the lease ``_locks/<name>.lock`` for the block (see the module's docstring); ``busy(message)`` is the
        exception raised when it stays held past ``wait_s``."""
        relative = f"_locks/{name}.lock"
        deadline = time.monotonic() + wait_s
        while True:
            now = time.time()
            body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "holder": holder,
                               "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "expires": now + LEASE_S}).encode()
            etag = self.put(relative, body, if_none_match=True)
            if etag is None:
                current = self.get(relative)
                if current is None:
                    continue  # released between our put and our get
                text, stale_etag = current
                if _abandoned(text, now):
                    etag = self.put(relative, body, if_match=stale_etag)  # one waiter wins the takeover
            if etag is not None:
                break
            if time.monotonic() >= deadline:
                raise busy(f"{_describe(current[0] if current else b'')} holds the lease {self.uri}/{relative}; "
                           f"wait for it to finish (a dead holder's lease lapses after {LEASE_S:.0f} s, at once "
                           f"from its own host)")
            time.sleep(0.1)
        try:
            yield
        finally:
            self.delete(relative, if_match=etag)


def _abandoned(text: bytes, now: float) -> bool:
    """A lease whose holder is gone: expired, or held by a pid that no longer runs on this host."""
    try:
        lease = json.loads(text)
    except ValueError:
        return True  # not ours to read: only a torn or foreign object, never a live holder's lease
    if float(lease.get("expires", 0)) < now:
        return True
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
    return False


def _describe(text: bytes) -> str:
    try:
        lease = json.loads(text)
        return f"pid {lease['pid']} on {lease['host']} ({lease['holder']}, since {lease['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"

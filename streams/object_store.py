"""Shards on object storage (`s3://bucket/prefix/`) through fsspec: a prefix listed like a lake directory, an
object streamed like a file.

An object store has no rename and needs none: a PUT (or a multipart upload's completion) makes an object visible
whole or not at all, so every listed `*.tar` object is a finished shard. Temp names are skipped by the same rule as
a directory's (`tar_shards.is_shard_name`), so a writer that uploads `x.tar.tmp` first loses nothing either.
An object is read with ranged GETs through a read-ahead block (`BLOCK_BYTES`), never downloaded whole; s3fs pins
every range to the ETag it saw at open, so an object replaced while it is read fails (a dead letter) instead of
mixing two versions.

Endpoint and credentials: the standard AWS chain (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, …);
`endpoint` overrides the endpoint URL. fsspec and s3fs are the `s3` extra's, imported only when a URL names them.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlparse

# botocore logs where it found credentials and the endpoint at INFO, on every client: not the run's news.
for _chatty in ("botocore", "aiobotocore"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)

SCHEMES = ("s3",)
BLOCK_BYTES = 8 << 20  # one ranged GET per 8 MiB of a shard: few requests, bounded memory
# Fail fast at start on a wrong endpoint; s3fs retries transient errors itself on top of this.
_CLIENT = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}}


def is_object_url(spec: str) -> bool:
    """Whether `spec` names object storage that this module reads (s3://…)."""
    return urlparse(spec).scheme in SCHEMES


def is_object_prefix(spec: str) -> bool:
    """An object-storage lake to list (`s3://bucket/prefix/`), not one object or a brace pattern of objects."""
    return is_object_url(spec) and "{" not in spec and not spec.endswith(".tar")


class ObjectStoreError(OSError):
    """A listing, upload or download that failed for a reason other than "nothing there"; `reason` is short (NoSuchBucket)."""

    def __init__(self, action: str, url: str, reason: str) -> None:
        super().__init__(f"cannot {action} {url} ({reason})")
        self.url, self.reason = url, reason


def reason_of(err: BaseException) -> str:
    """A short reason for a storage error: the service's error code when it sent one, else the error's class."""
    for cause in (err, err.__cause__, err.__context__):
        code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
        if code:
            return str(code)
    return type(err).__name__


class ObjectStore:
    """One object-storage filesystem (fsspec), its client made on first use."""

    def __init__(self, endpoint: str = "") -> None:
        self.endpoint = endpoint
        self._fs: Any = None

    def filesystem(self) -> Any:
        if self._fs is None:
            import fsspec

            client: dict[str, Any] = {"endpoint_url": self.endpoint} if self.endpoint else {}
            self._fs = fsspec.filesystem("s3", config_kwargs=_CLIENT, client_kwargs=client, skip_instance_cache=True)
        return self._fs

    @staticmethod
    def _path(url: str) -> str:
        return url.split("://", 1)[1].rstrip("/")

    def list_names(self, prefix: str) -> list[str]:
        """The names of the objects directly under `prefix` (no sub-prefixes), fresh from the store each call.

        An existing bucket with nothing under the prefix lists as empty (a lake not written yet); anything else that
        fails (no such bucket, no credentials, an unreachable endpoint) raises ObjectStoreError."""
        try:
            entries = self.filesystem().ls(self._path(prefix), detail=True, refresh=True)
        except FileNotFoundError as err:
            if reason_of(err) == "FileNotFoundError":  # the bucket answered: no object under the prefix yet
                return []
            raise ObjectStoreError("list", prefix, reason_of(err)) from None
        except Exception as err:  # botocore's errors are not OSErrors: credentials, endpoint, access
            raise ObjectStoreError("list", prefix, reason_of(err)) from None
        return sorted(entry["name"].rsplit("/", 1)[-1] for entry in entries if entry.get("type") == "file")

    def open(self, url: str) -> _ObjectStream:
        """A read stream of one object; FileNotFoundError when it is gone, OSError when it cannot be opened."""
        try:
            return _ObjectStream(self.filesystem().open(self._path(url), "rb", block_size=BLOCK_BYTES,
                                                        cache_type="readahead"))
        except OSError:
            raise
        except Exception as err:
            raise OSError(f"cannot open {url} ({reason_of(err)})") from None

    def put_file(self, local: str, url: str) -> None:
        """Uploads one local file to `url`; ObjectStoreError on failure."""
        try:
            self.filesystem().put_file(local, self._path(url))
        except Exception as err:
            raise ObjectStoreError("upload to", url, reason_of(err)) from None

    def put_text(self, url: str, text: str) -> None:
        try:
            self.filesystem().pipe_file(self._path(url), text.encode())
        except Exception as err:
            raise ObjectStoreError("upload to", url, reason_of(err)) from None

    def read_text(self, url: str) -> str:
        try:
            return bytes(self.filesystem().cat_file(self._path(url))).decode()
        except Exception as err:
            raise ObjectStoreError("read", url, reason_of(err)) from None

    def get_file(self, url: str, local: str) -> None:
        try:
            self.filesystem().get_file(self._path(url), local)
        except Exception as err:
            raise ObjectStoreError("download", url, reason_of(err)) from None


class _ObjectStream:
    """An fsspec file whose failures while reading are OSErrors, as a local file's are (tar_shards judges those)."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def read(self, size: int = -1) -> bytes:
        try:
            return bytes(self._file.read(size))
        except OSError:
            raise
        except Exception as err:  # botocore / aiohttp errors mid-object: the shard is cut short here
            raise OSError(reason_of(err)) from None

    def close(self) -> None:
        try:
            self._file.close()
        except Exception as err:
            raise OSError(reason_of(err)) from None

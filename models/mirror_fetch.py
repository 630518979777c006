"""A consumer's side of a publish mirror (`publish.mirror=s3://bucket/prefix/`): the version its `LATEST` names,
downloaded to a local cache and loaded with `load_encoder`, so every check a local folder passes applies unchanged.

The mirror writes a version's files before `LATEST`, so the version read here is complete. A version is downloaded
into a hidden temp folder and renamed into place: a cached `vNNNNNN` folder is whole, and is reused. What the
mirror says is untrusted input: `LATEST` must be a version name, and only plain file names are downloaded. Endpoint
and credentials come from the standard AWS variables (`AWS_ENDPOINT_URL`, …) or `endpoint`; needs the `s3` extra.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from streamssl.models.encoder_folder import EncoderLoadError
from streamssl.models.encoder_io import load_encoder
from streamssl.models.published import PublishedEncoder, PublishedSeriesEncoder

_VERSION = re.compile(r"^v\d{6}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _filesystem(endpoint: str) -> Any:
    try:
        import fsspec
        import s3fs  # noqa: F401  (fsspec finds it by the s3 protocol; imported here to name the missing extra)
    except ModuleNotFoundError:
        raise EncoderLoadError("s3:// needs 'pip install streamssl[s3]'") from None
    client = {"endpoint_url": endpoint} if endpoint else {}
    return fsspec.filesystem("s3", client_kwargs=client, skip_instance_cache=True)


def fetch_latest(mirror: str, cache: str | Path, endpoint: str = "",
                 device: str = "cpu") -> PublishedEncoder | PublishedSeriesEncoder:
    """The encoder the mirror's `LATEST` names, loaded from `cache/vNNNNNN` (downloaded first if not cached).

    Raises EncoderLoadError for a mirror that cannot be read, a `LATEST` that is not a version name, or a
    downloaded folder that `load_encoder` refuses."""
    fs, prefix = _filesystem(endpoint), mirror.split("://", 1)[-1].rstrip("/")
    try:
        name = bytes(fs.cat_file(f"{prefix}/LATEST")).decode().strip()
    except Exception as error:  # botocore's errors are not OSErrors
        raise EncoderLoadError(f"{mirror}: cannot read LATEST ({type(error).__name__}: {error})") from None
    if not _VERSION.match(name):
        raise EncoderLoadError(f"s3://{prefix}/LATEST: names {name[:40]!r}, not a version folder (vNNNNNN)")
    folder = Path(cache).expanduser() / name
    if not folder.is_dir():
        _download(fs, f"{prefix}/{name}", folder)
    return load_encoder(folder, device=device)


def _download(fs: Any, prefix: str, folder: Path) -> None:
    temp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        for entry in fs.ls(prefix, detail=True, refresh=True):
            file = str(entry["name"]).rsplit("/", 1)[-1]
            if entry.get("type") != "file" or not _FILE.match(file):
                raise EncoderLoadError(f"s3://{prefix}/: holds {file[:40]!r}, not a published file name")
            fs.get_file(entry["name"], str(temp / file))
        os.replace(temp, folder)
    except EncoderLoadError:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    except Exception as error:
        shutil.rmtree(temp, ignore_errors=True)
        raise EncoderLoadError(f"s3://{prefix}/: cannot download it ({type(error).__name__}: {error})") from None

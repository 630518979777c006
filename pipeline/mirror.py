"""`publish.mirror=s3://bucket/prefix/`: every published version copied to object storage, `LATEST` last.

After each local publish, `mirror_published` uploads each local version the mirror does not hold yet
(`PREFIX/vNNNNNN/<every file>`), oldest first, and only then writes the `LATEST` object (its text: the name of the
version `published/latest` points at). Object stores have no rename, so this order is what keeps consumers from a
half-uploaded version: a version is complete on the mirror once `LATEST` names it or a later one. What the mirror
holds is read back from its `LATEST` each time, so a failed upload (counted in
`streamssl_publish_mirror_failures_total`, logged) is simply redone, whole, at the next publish; it never stops
the run. A consumer reads the mirror with `streamssl.models.mirror_fetch.fetch_latest`.

Uploads run in the trainer's thread at publish time (minutes apart); the client's timeouts bound a dead endpoint
to a few seconds per publish.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from prometheus_client import Counter

from streamssl.pipeline.config import ConfigError
from streamssl.pipeline.extras import require
from streamssl.pipeline.sections import PublishConfig
from streamssl.streams.object_store import ObjectStore, ObjectStoreError, is_object_url

log = logging.getLogger(__name__)

LATEST = "LATEST"
_VERSION = re.compile(r"^v(\d{6})$")


def check_mirror(cfg: PublishConfig) -> None:
    """At start: ConfigError for a mirror that is not an s3:// URL, or one whose extra is not installed."""
    if not cfg.mirror:
        return
    if not is_object_url(cfg.mirror):
        raise ConfigError(f"publish.mirror must be an s3://bucket/prefix/ URL, got {cfg.mirror!r}")
    require("s3fs", "s3", "s3://")


def _version_number(name: str) -> int:
    match = _VERSION.match(name)
    return int(match.group(1)) if match else 0


def mirror_published(cfg: PublishConfig, published: Path, failures: Counter) -> None:
    """Brings the mirror up to `published/latest` (no-op without `publish.mirror`); a failure is logged and counted."""
    if not cfg.mirror:
        return
    latest = (published / "latest").resolve()
    if not _version_number(latest.name):
        return
    store, prefix = ObjectStore(cfg.mirror_endpoint), cfg.mirror.rstrip("/")
    try:
        mirrored = _mirrored_version(store, prefix)
        versions = sorted((folder for folder in published.iterdir() if folder.is_dir() and not folder.is_symlink()
                           and mirrored < _version_number(folder.name) <= _version_number(latest.name)),
                          key=lambda folder: _version_number(folder.name))
        for folder in versions:
            for file in sorted(folder.iterdir()):
                store.put_file(str(file), f"{prefix}/{folder.name}/{file.name}")
        if versions:
            store.put_text(f"{prefix}/{LATEST}", latest.name)  # last: only now may a consumer see the new version
            log.info("mirrored %s to %s", ", ".join(folder.name for folder in versions), cfg.mirror)
    except (ObjectStoreError, OSError) as err:
        failures.inc()
        log.warning("publish mirror: %s; retried at the next publish (the run goes on)", err)


def _mirrored_version(store: ObjectStore, prefix: str) -> int:
    """The version number the mirror's LATEST names; 0 when it has none yet."""
    if LATEST not in store.list_names(prefix):
        return 0
    return _version_number(store.read_text(f"{prefix}/{LATEST}").strip())

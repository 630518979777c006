"""A real S3 endpoint for tests: one local moto server per session (`python -m moto.server`, tests/kafka_broker.py's
MotoServer), and a fresh bucket per test with the standard AWS variables pointing at it.

Loaded as a pytest plugin from tests/conftest.py: a test asks for `s3` and gets an `S3Bucket`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.kafka_broker import MotoServer

_buckets = itertools.count()


@dataclass
class S3Bucket:
    server: MotoServer
    bucket: str
    fs: Any  # an fsspec S3 filesystem on the server

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def upload(self, folder: Path, prefix: str, names: list[str] | None = None) -> None:
        """Uploads the folder's files (or `names` of them) under `prefix`: one PUT each, visible whole."""
        for path in sorted(folder.iterdir()):
            if names is None or path.name in names:
                self.fs.put_file(str(path), f"{self.bucket}/{prefix}{path.name}")

    def names(self, prefix: str) -> list[str]:
        return sorted(path.rsplit("/", 1)[-1] for path in self.fs.find(f"{self.bucket}/{prefix}", refresh=True))


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer("streamssl-tests", tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new, empty bucket; AWS_ENDPOINT_URL and test credentials set for this process and the ones it starts."""
    import fsspec

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": moto_server.endpoint}.items():
        monkeypatch.setenv(name, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    bucket = f"lake-{next(_buckets)}"
    fs.mkdir(bucket)
    return S3Bucket(moto_server, bucket, fs)

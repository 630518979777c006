"""LatestEncoder: serves while new versions are published (real Publisher, real encoders), switches to each new
verified one, skips one that does not verify and keeps serving the old."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from streamssl.models import load_encoder
from streamssl.models.backbones import build_backbone
from streamssl.models.encoder_folder import EncoderLoadError
from streamssl.models.encoder_io import Manifest
from streamssl.models.follow_latest import LatestEncoder
from streamssl.pipeline.publishing import Publisher

INPUT = {"channels": 1, "height": 28, "width": 28, "mean": [0.286], "std": [0.353]}


def publish(publisher: Publisher, seed: int, step: int) -> Path:
    torch.manual_seed(seed)
    backbone, dim = build_backbone("convnet", 1)
    return publisher.publish(backbone, Manifest(backbone="convnet", input=INPUT, embedding_dim=dim, step=step))[1]


def corrupt(folder: Path) -> None:
    """Flips one byte of the weights: the manifest's sha256 no longer matches."""
    weights = folder / "encoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def wait_for(condition: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_embed_serves_through_hot_swaps_and_skips_a_corrupt_version(tmp_path: Path, one_thread: None) -> None:
    publisher, x = Publisher(tmp_path), torch.rand(4, 1, 28, 28)
    publish(publisher, seed=1, step=1)
    expected = {"v000001": load_encoder(tmp_path / "v000001")(x)}
    outputs: list[tuple[str, torch.Tensor]] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    with LatestEncoder(tmp_path, poll_seconds=0.05) as follower:
        assert follower.version == "v000001"

        def serve() -> None:  # a request loop: every call must answer with one version's exact embeddings
            while not stop.is_set():
                try:
                    outputs.append((follower.version, follower.embed(x)))
                except BaseException as err:  # any failure is what this test looks for
                    errors.append(err)

        server = threading.Thread(target=serve)
        server.start()
        try:
            wait_for(lambda: len(outputs) >= 3)
            folder = publish(publisher, seed=2, step=2)
            expected["v000002"] = load_encoder(folder)(x)
            wait_for(lambda: follower.version == "v000002")
            # a version that does not verify becomes `latest`: skipped, v000002 goes on serving
            bad = publish(publisher, seed=3, step=3)
            corrupt(bad)
            wait_for(lambda: "v000003" in follower.skipped)
            served = len(outputs)
            wait_for(lambda: len(outputs) > served + 3)
            assert follower.version == "v000002"
            folder = publish(publisher, seed=4, step=4)
            expected["v000004"] = load_encoder(folder)(x)
            wait_for(lambda: follower.version == "v000004" and outputs[-1][0] == "v000004")
        finally:
            stop.set()
            server.join()
    assert not errors
    seen = [version for version, _ in outputs]
    assert seen[0] == "v000001" and seen[-1] == "v000004" and "v000003" not in seen
    assert seen == sorted(seen)  # never back to an older version
    for version, output in outputs:
        # exactly one version's embeddings, never a mix: the one read just before the call, or the next one when
        # the swap came in between
        matches = [name for name, value in expected.items() if torch.allclose(output, value, atol=1e-6)]
        assert len(matches) == 1 and matches[0] >= version
    assert {name for name, _ in outputs} == {"v000001", "v000002", "v000004"}
    assert not torch.allclose(expected["v000001"], expected["v000002"])


def test_it_reads_latest_from_the_text_file_and_refuses_unsigned_ones_under_a_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publisher = Publisher(tmp_path)
    publish(publisher, seed=1, step=1)
    (tmp_path / "latest").unlink()  # an object store: no symlink, only LATEST
    follower = LatestEncoder(tmp_path, poll_seconds=0)
    assert follower.version == "v000001" and follower.manifest["step"] == 1
    monkeypatch.setenv("STREAMSSL_ENCODER_KEY", "a shared secret")
    publish(publisher, seed=2, step=2)  # signed
    assert follower.refresh() and follower.version == "v000002"
    monkeypatch.delenv("STREAMSSL_ENCODER_KEY")
    publish(publisher, seed=3, step=3)  # unsigned
    monkeypatch.setenv("STREAMSSL_ENCODER_KEY", "a shared secret")
    assert not follower.refresh() and follower.version == "v000002" and "v000003" in follower.skipped
    (tmp_path / "LATEST").write_text("../elsewhere\n")  # not a version name: ignored
    assert not follower.refresh() and follower.version == "v000002"


def test_nothing_published_yet_is_one_clear_error(tmp_path: Path) -> None:
    follower = LatestEncoder(tmp_path, poll_seconds=0)
    with pytest.raises(EncoderLoadError, match="no verified encoder yet"):
        follower.embed(torch.rand(1, 1, 28, 28))

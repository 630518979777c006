"""The loader process is crash-only: a decoder that segfaults, or the process killed mid-message, costs a
restart at the last position handed out, never a hung or dead run, and no record is lost or handed out twice."""

from __future__ import annotations

import faulthandler
import io
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_png

from streamssl.pipeline.loading import decode
from streamssl.pipeline.loading.decode import decode_record
from streamssl.pipeline.loading.loader import BatchLoader
from streamssl.pipeline.loading.messages import Batch, End, Failure, Message, Reject
from streamssl.streams.lake import write_shard
from streamssl.streams.records import Record
from streamssl.streams.webdataset_source import WebDatasetSource
from tests.conftest import drain

CRASHER = Path(__file__).parents[1] / "fixtures" / "corpus" / "png-crashes-libpng-decoder.png"


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((28, 28), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _lake(tmp_path: Path, records: list[tuple[str, dict[str, bytes]]]) -> Path:
    lake = tmp_path / "lake"
    lake.mkdir()
    write_shard(lake / "shard-000000.tar", records)
    return lake



def _keys(messages: list[Message]) -> list[str]:
    return [key for message in messages if isinstance(message, Batch) for key in message.keys]


def _libpng_decode(record: Record, image_field: str, channels: int, size: int, max_bytes: int = 0,
                   full_side: int = 0) -> np.ndarray:
    """torchvision's libpng binding, which the issue's author saw segfault on the corpus file: a real native crash."""
    faulthandler.disable()  # pytest's crash report of the loader process would only be noise here
    data = torch.frombuffer(bytearray(record.fields["png"]), dtype=torch.uint8)
    decode_png(data, ImageReadMode.GRAY)
    return decode_record(record, image_field, channels, size, max_bytes, full_side)


def test_the_png_that_segfaults_libpng_is_a_corrupt_image_for_our_decoder() -> None:
    with pytest.raises(ValueError, match=r"^corrupt_image: "):
        decode_record(Record("crash", {"png": CRASHER.read_bytes()}, "s", 0), "png", 1, 28)


def test_a_decoder_that_segfaults_costs_one_restart_and_a_decoder_crash_dead_letter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = [(f"g{i:03d}", {"png": _png(i)}) for i in range(100)]
    lake = _lake(tmp_path, [*good[:50], ("crash", {"png": CRASHER.read_bytes()}), *good[50:]])
    # The loader process is forked, so it decodes with the crashing decoder too (the fault is real, its choice is ours).
    monkeypatch.setattr(decode, "decode_record", _libpng_decode)
    loader = BatchLoader(partial(WebDatasetSource, str(lake), mode="once"), None, 16, "png", 1, 28)
    messages = drain(loader, 30)
    assert isinstance(messages[-1], End)
    assert loader.restarts == 1
    rejects = [m for m in messages if isinstance(m, Reject)]
    assert [(r.key, r.reason) for r in rejects] == [("crash", "decoder_crash")]
    assert rejects[0].payload == CRASHER.read_bytes()
    assert _keys(messages) == [key for key, _ in good][:96]  # every whole batch, in order, once


def test_the_loader_killed_mid_message_is_restarted_and_nothing_is_lost_or_repeated(tmp_path: Path) -> None:
    good = [(f"g{i:04d}", {"png": _png(i % 250)}) for i in range(1024)]
    lake = _lake(tmp_path, good)
    # 128 images of 28x28 are 100 kB a batch, more than a pipe holds: while nobody reads, the process is blocked
    # in the middle of sending one, and that is where it dies.
    loader = BatchLoader(partial(WebDatasetSource, str(lake), mode="once"), None, 128, "png", 1, 28, prefetch=1)
    first = loader.next(timeout=30)
    time.sleep(1.0)
    os.kill(loader._process.pid, signal.SIGKILL)
    messages = [first, *drain(loader, 30)]
    assert isinstance(messages[-1], End)
    assert loader.restarts == 1
    assert _keys(messages) == [key for key, _ in good]


def test_a_loader_that_keeps_dying_at_one_position_ends_with_one_line() -> None:
    def doomed(**_: object) -> WebDatasetSource:
        os.kill(os.getpid(), signal.SIGKILL)  # dies before it reads anything, every time
        raise AssertionError

    messages = drain(BatchLoader(doomed, None, 16, "png", 1, 28), 30)
    assert isinstance(messages[-1], Failure)
    assert "died 3 times in a row" in messages[-1].message and "\n" not in messages[-1].message


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def _audited(run_dir: Path) -> list[str]:
    audit = run_dir / "trained-keys.jsonl"
    lines = audit.read_text().splitlines() if audit.exists() else []
    return [key for line in lines for key in json.loads(line)["keys"]]


def test_cli_run_survives_its_loader_killed_and_stops_cleanly_soon_after_sigterm(small_lake: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sets = ["train.batch_size=32", "model.bn_splits=4", "moco.queue_size=128", "checkpoint.every_steps=4",
            "checkpoint.every_seconds=0", "eval.dataset=none", "train.log_every_seconds=1000", "train.audit_keys=true",
            "data.shuffle_buffer=0", "data.poll_seconds=0.2", "data.mode=follow"]
    process = subprocess.Popen([sys.executable, "-m", "streamssl.pipeline.cli", "run", "--data", str(small_lake),
                                "--run-dir", str(run_dir), "--max-minutes", "0", "--metrics-port", "0",
                                *[f"--set={s}" for s in sets]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_audited(run_dir)) < 64:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        (loader,) = _children(process.pid)
        os.kill(loader, signal.SIGKILL)
        # The lake (640 records) is read to its end by a new loader process, then follow mode waits for more.
        while len(_audited(run_dir)) < 640:
            assert time.monotonic() < deadline and process.poll() is None, process.stderr.read() if process.poll() else ""
            time.sleep(0.1)
        assert _children(process.pid) != [loader]
        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        stopped = time.monotonic() - asked
    finally:
        process.kill()
    assert process.returncode == 0, err[-2000:]
    assert stopped < 15, f"SIGTERM to exit took {stopped:.1f} s"
    assert "loader process exited with code -9" in err and "done: stop requested; step 20" in out
    assert sorted(_audited(run_dir)) == sorted(set(_audited(run_dir)))  # nothing trained twice
    assert (run_dir / "checkpoints" / "ckpt-000000020.pt").is_file()
    assert json.loads((run_dir / "published" / "latest" / "manifest.json").read_text())["step"] == 20

"""Faults of a real lake and run dir, through `streamssl run` in subprocesses: a symlink loop in a followed lake, a
shard that lands under an earlier name while the trainer is down, another lake under the same run dir, a tampered
checkpoint position, tar member names that are not UTF-8."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from streamssl.pipeline.checkpointing import Checkpointer
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import build_lake, png_bytes

TINY = ["--set", "train.batch_size=32", "--set", "model.bn_splits=4", "--set", "moco.queue_size=128",
        "--set", "eval.dataset=none", "--set", "data.shuffle_buffer=0", "--set", "data.poll_seconds=0.1",
        "--metrics-port", "0"]


def _run(folder: Path, *args: str, lake: str = "lake") -> subprocess.CompletedProcess[str]:
    """`streamssl run --data LAKE --run-dir run` in `folder`: relative paths, so that a copy of the folder resumes."""
    return subprocess.run([sys.executable, "-m", "streamssl.pipeline.cli", "run", "--data", lake, "--run-dir", "run",
                           *TINY, *args], cwd=folder, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _letters(run_dir: Path) -> list[dict]:
    path = run_dir / "dead-letter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def followed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A lake of shards 0, 1 and 3 (32 images each; shard 2 held back in `incoming`) with a symlink loop, followed
    for 3 steps; the folder holds lake/, incoming/ and run/."""
    root = tmp_path_factory.mktemp("followed")
    images, labels = load_fashion_mnist("train")
    build_lake(root / "lake", images[:128], labels[:128], shard_size=32)
    (root / "incoming").mkdir()
    (root / "lake" / "shard-000002.tar").rename(root / "incoming" / "shard-000002.tar")
    (root / "lake" / "shard-000001x.tar").symlink_to("shard-000001x.tar")  # points at itself
    return root, _run(root, "--max-steps", "3")


def _copy(root: Path, to: Path) -> Path:
    shutil.copytree(root, to, symlinks=True)
    return to


def test_a_symlink_loop_in_a_followed_lake_is_dead_lettered_once_and_the_rest_trains(
        followed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, result = followed
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "done: reached max_steps 3; step 3, 96 samples" in result.stdout
    assert [(Path(x["source"]).name, x["reason"], x["detail"]) for x in _letters(root / "run")] == [
        ("shard-000001x.tar", "unreadable_shard", "Too many levels of symbolic links")]


def test_a_shard_that_lands_under_an_earlier_name_while_the_trainer_is_down_is_trained(
        followed: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    root = _copy(followed[0], tmp_path / "copy")
    (root / "incoming" / "shard-000002.tar").rename(root / "lake" / "shard-000002.tar")
    # Shards 0, 1, 3 are read: only shard 2 can fill step 4. Before the fix it waited out --max-minutes instead.
    result = _run(root, "--max-steps", "4", "--max-minutes", "0.5")
    assert result.returncode == 0, result.stderr
    assert "resumed from ckpt-000000003.pt" in result.stderr
    assert "done: reached max_steps 4; step 4, 128 samples" in result.stdout
    assert [x["reason"] for x in _letters(root / "run")] == ["unreadable_shard"]  # the loop, not reported again
    state, _ = Checkpointer(root / "run" / "checkpoints").load_latest()
    assert state["source"]["shard"] == "lake/shard-000002.tar"
    assert state["source"]["sample_index"] == 32 and set(state["source"]["finished"]) == {  # 2: still being read
        ("shard-", "000000", "000001", ".tar"), ("shard-", "000003", "000003", ".tar"),
        ("shard-", "000001", "000001", "x.tar")}


def test_a_tampered_checkpoint_position_runs_no_command_on_resume(
        followed: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    root = _copy(followed[0], tmp_path / "copy")
    latest = Checkpointer(root / "run" / "checkpoints").paths()[-1]
    state = torch.load(latest, weights_only=True)
    marker = tmp_path / "command-ran"
    state["source"]["shard"] = f"pipe:touch {marker}; cat lake/shard-000000.tar"
    torch.save(state, latest)  # a checkpoint anyone with write access to the run dir could have written
    tampered = _run(root, "--max-steps", "4")
    assert tampered.returncode == 2 and not marker.exists()
    assert tampered.stderr.strip().splitlines()[-1] == (
        f"streamssl: error: the run dir's stream position names shard 'pipe:touch {marker}; cat lake/shard-000000.tar',"
        " which --data lake does not; resume with the data the run started on, or use a new --run-dir")
    assert "Traceback" not in tampered.stderr


def test_another_lake_under_the_same_run_dir_is_refused(
        followed: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    root = _copy(followed[0], tmp_path / "copy")
    shutil.copytree(root / "lake", root / "other-lake", symlinks=True)  # the same shard names, another lake
    moved = _run(root, "--max-steps", "4", lake="other-lake")
    assert moved.returncode == 2, moved.stderr
    assert moved.stderr.strip().splitlines()[-1] == (
        "streamssl: error: the run dir's stream position names shard 'lake/shard-000003.tar', which --data other-lake"
        " does not; resume with the data the run started on, or use a new --run-dir")


def test_tar_member_names_that_are_not_utf8_train(tmp_path: Path) -> None:
    images, labels = load_fashion_mnist("train")
    lake = tmp_path / "lake"
    build_lake(lake, images[:32], labels[:32], shard_size=32)
    # Written the way a tool on a Latin-1 system writes them: raw bytes, no pax header saying UTF-8.
    with tarfile.open(lake / "shard-000001.tar", "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as archive:
        for index in range(32):
            data = png_bytes(images[32 + index])
            info = tarfile.TarInfo(f"caf\udce9-{index:03d}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    result = _run(tmp_path, "--set", "data.mode=once", "--max-steps", "10")
    assert result.returncode == 0, result.stderr
    assert "done: stream ended; step 2, 64 samples" in result.stdout and _letters(tmp_path / "run") == []

"""Exact resume: N steps straight == N/2 steps, restart, N/2 steps (bit-exact on CPU, same samples)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from streamssl.pipeline.checkpointing import Checkpointer
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.messages import Batch
from tests.conftest import tiny_config

STEPS = 8  # 256 samples of a 640-sample lake with a 64-record shuffle buffer


class RecordingTrainer(Trainer):
    """Remembers the keys of every batch it trains on; can be stopped (as by SIGTERM) after a given step."""

    def __init__(self, *args, stop_after: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keys: list[str] = []
        self.stop_after = stop_after
        step = self.task.step

        def recording_step(batch: Batch):
            self.keys.extend(batch.keys)
            result = step(batch)
            if self.state.step + 1 == self.stop_after:
                self.stop.set()
            return result

        self.task.step = recording_step


def _train(run_dir: Path, lake: Path, max_steps: int, stop_after: int = 0) -> RecordingTrainer:
    # The cosine LR horizon is max_steps, so both halves run with the same max_steps; the first one is
    # stopped half-way the way a preemption would stop it.
    trainer = RecordingTrainer(tiny_config(run_dir, lake, f"train.max_steps={max_steps}"), stop_after=stop_after)
    trainer.run()
    return trainer


def test_resume_is_bit_exact_and_consumes_the_same_samples(tmp_path: Path, small_lake: Path) -> None:
    straight = _train(tmp_path / "straight", small_lake, STEPS)
    first_half = _train(tmp_path / "split", small_lake, STEPS, stop_after=STEPS // 2)
    second_half = _train(tmp_path / "split", small_lake, STEPS)
    assert first_half.state.step == STEPS // 2
    assert straight.state.step == second_half.state.step == STEPS
    assert len(straight.keys) == STEPS * 32
    assert first_half.keys + second_half.keys == straight.keys
    assert second_half.state.samples_seen == straight.state.samples_seen
    assert straight.state.position == second_half.state.position
    expected, resumed = straight.method.state_dict(), second_half.method.state_dict()
    assert expected.keys() == resumed.keys()
    differing = [name for name in expected if not torch.equal(expected[name], resumed[name])]
    assert differing == []
    # The queue really moved (this is not a comparison of two untouched models).
    assert not torch.equal(expected["queue"], RecordingTrainer(tiny_config(tmp_path / "fresh", small_lake))
                           .method.state_dict()["queue"])


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path: Path, small_lake: Path, caplog) -> None:
    _train(tmp_path / "run", small_lake, 4)  # checkpoints at steps 2 and 4
    checkpoints = Checkpointer(tmp_path / "run" / "checkpoints")
    names = [p.name for p in checkpoints.paths()]
    assert names == ["ckpt-000000002.pt", "ckpt-000000004.pt"]
    latest = checkpoints.paths()[-1]
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a crash mid-copy

    with caplog.at_level(logging.WARNING):
        resumed = RecordingTrainer(tiny_config(tmp_path / "run", small_lake, "train.max_steps=4"))
        assert resumed.resume()
    assert resumed.state.step == 2
    assert any("ckpt-000000004.pt is unreadable" in r.getMessage() for r in caplog.records)


def test_checkpointer_keeps_only_the_last_k(tmp_path: Path) -> None:
    checkpoints = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpoints.save({"step": step, "weights": torch.full((3,), float(step))}, step)
    assert [p.name for p in checkpoints.paths()] == ["ckpt-000000002.pt", "ckpt-000000003.pt"]
    assert not list(tmp_path.glob(".*tmp"))
    state, path = checkpoints.load_latest()
    assert state["step"] == 3 and path.name == "ckpt-000000003.pt"
    assert torch.equal(state["weights"], torch.full((3,), 3.0))


IMAGE_CHECKPOINT = Path(__file__).parents[1] / "fixtures" / "image-rotation-v1-ckpt-000000002.pt"


def _fixture_config(run_dir: Path, max_steps: int) -> Any:
    """The settings IMAGE_CHECKPOINT was written with: 2 steps of rotation on the test lake, named "lake"."""
    return tiny_config(run_dir, Path("lake"), f"train.max_steps={max_steps}", "method=rotation", "optim.momentum=0")


def test_an_image_checkpoint_written_before_typed_positions_resumes_where_a_straight_run_is(
        tmp_path: Path, small_lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # IMAGE_CHECKPOINT was written by the image trainer at commit fd5f077 (positions and manifests as plain dicts).
    # Its lake was given as the relative path "lake", so the shard paths in its position resolve here too.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lake").symlink_to(small_lake)
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    shutil.copy(IMAGE_CHECKPOINT, tmp_path / "old" / "checkpoints" / IMAGE_CHECKPOINT.name.split("-v1-")[1])
    resumed = RecordingTrainer(_fixture_config(tmp_path / "old", 4))
    assert resumed.resume() and (resumed.state.step, resumed.state.samples_seen) == (2, 64)
    resumed.run()
    straight = RecordingTrainer(_fixture_config(tmp_path / "straight", 4))
    straight.run()
    assert resumed.keys == straight.keys[2 * 32:]  # the same records, from exactly where the old run stopped
    assert resumed.state.position == straight.state.position
    expected, got = straight.method.state_dict(), resumed.method.state_dict()
    # Bit for bit only on a CPU whose kernels round as the fixture's did (written on AVX2). On AVX-512, measured
    # after 4 steps: up to 7.5e-5 in the conv weights, 6e-4 relative in the BN running variances; a state the
    # resume lost would be off by orders of magnitude more. Integer state stays exact.
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=2e-3, atol=2e-4, msg=name)


def test_resume_with_a_full_minred_buffer_and_a_snapshot_is_bit_exact(tmp_path: Path, small_lake: Path) -> None:
    # 16 arriving + 16 replayed records per step; the 48-record buffer is full after 3 steps and evicting by
    # redundancy after that; the distillation snapshot is taken at steps 3 and 6 (the restart is at step 5)
    sets = ["train.max_steps=10", "replay.capacity=48", "replay.policy=minred", "replay.share=0.5",
            "distill.weight=0.5", "distill.every_steps=3", "checkpoint.every_steps=5"]

    def train(run_dir: Path, stop_after: int = 0) -> RecordingTrainer:
        trainer = RecordingTrainer(tiny_config(run_dir, small_lake, *sets), stop_after=stop_after)
        trainer.run()
        return trainer

    straight = train(tmp_path / "straight")
    train(tmp_path / "split", stop_after=5)
    resumed = train(tmp_path / "split")
    assert resumed.state.step == straight.state.step == 10 and straight.state.samples_seen == 160
    buffers = straight.task.replay, resumed.task.replay
    assert buffers[0].size == 48 and buffers[0].evicted + buffers[0].dropped == 160 - 48
    for name in ("images", "ids", "features", "nn_sim", "nn_index"):
        assert torch.equal(getattr(buffers[0], name), getattr(buffers[1], name)), name
    for a, b in ((straight.method, resumed.method), (straight.task.distiller, resumed.task.distiller)):
        expected, got = a.state_dict(), b.state_dict()
        assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    assert int(straight.task.distiller.snapshot_step) == 9

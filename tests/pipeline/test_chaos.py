"""Crash safety, the short version of bench/chaos.py: kill -9 at aimed points of a real `streamssl run`, restart on
the same run dir, let it finish, then nothing acknowledged is lost and nothing is left stuck or half-written.

Five kills on a growing WebDataset lake (follow mode), three on a Kafka topic of a durable Tansu broker (one of
them the broker itself), in a fixed order with seeded moments. The checks themselves are tested first, on run
dirs built to fail them.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from bench.chaos import Outcome, kafka_source, plan_kills, run_session, shards_source, table
from bench.chaos_checks import check_checkpoints, check_exits, check_published, check_records, check_temp_files
from tests.kafka_broker import durable_broker

SHARDS_PLAN = ["trainer:checkpoint-write", "loader", "trainer:publish", "trainer:random", "trainer:checkpoint-renamed"]
KAFKA_PLAN = ["trainer:checkpoint-renamed", "broker", "loader"]
STEPS_PER_KILL = 3
# Stale temp files: a kill -9 inside atomic_write (streams/files.py, used by pipeline/checkpointing.py) leaves its
# `.ckpt-*.pt.*.tmp`, and no later start removes it: each such kill leaves up to a checkpoint's size on disk.


# --- the checks catch what they are for -----------------------------------------------------------------------
def test_a_missing_record_and_too_many_duplicates_fail(tmp_path: Path) -> None:
    checks = {c.name: c for c in check_records(["a", "b", "c"], Counter({"a": 3, "b": 1}), 0, 1, "1")}
    assert not checks["trained ≥ 1"].ok and "missing: c" in checks["trained ≥ 1"].measured
    assert not checks["duplicates"].ok and checks["duplicates"].measured.startswith("2 ")
    assert all(c.ok for c in check_records(["a", "b"], Counter({"a": 2, "b": 1}), 0, 1, "1"))


def test_a_truncated_checkpoint_a_dangling_latest_and_a_stale_temp_file_fail(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    torch.save({"step": 2}, tmp_path / "checkpoints" / "ckpt-000000002.pt")
    data = (tmp_path / "checkpoints" / "ckpt-000000002.pt").read_bytes()
    (tmp_path / "checkpoints" / "ckpt-000000004.pt").write_bytes(data[:len(data) // 2])
    checkpoints, newest = check_checkpoints(tmp_path)
    assert not checkpoints.ok and "ckpt-000000004.pt" in checkpoints.measured and newest == 4
    (tmp_path / "published").mkdir()
    (tmp_path / "published" / "latest").symlink_to("v000001")
    assert not check_published(tmp_path, 4)[0].ok
    (tmp_path / "checkpoints" / ".ckpt-000000006.pt.x.tmp").write_bytes(b"")
    assert not check_temp_files(tmp_path, last_start=float("inf"), left_by={}).ok
    assert check_temp_files(tmp_path, last_start=0.0, left_by={}).ok  # written after the last start: not stale


def test_an_exit_that_was_not_our_kill_fails() -> None:
    assert all(c.ok for c in check_exits([(-9, True), (0, False)], []))
    assert not check_exits([(-9, True), (1, False), (0, False)], [])[0].ok
    assert not check_exits([(-9, True)], [])[0].ok  # the last start must finish with 0
    assert not check_exits([(0, False)], [4242])[1].ok  # a loader outlived its trainer


def test_the_plan_takes_every_kind_once_per_round() -> None:
    kinds = ("trainer:random", "loader", "broker")
    plan = plan_kills(kinds, 7, random.Random(0))
    assert len(plan) == 7 and sorted(plan[:3]) == sorted(kinds) and sorted(plan[3:6]) == sorted(kinds)


# --- kill -9, restart, finish ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    work = tmp_path_factory.mktemp("chaos-shards")
    return run_session(shards_source(work, len(SHARDS_PLAN), STEPS_PER_KILL), len(SHARDS_PLAN),
                       random.Random("ci:shards"), SHARDS_PLAN)


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    work = tmp_path_factory.mktemp("chaos-kafka")
    with durable_broker(work) as broker:
        return run_session(kafka_source(work, len(KAFKA_PLAN), STEPS_PER_KILL, broker), len(KAFKA_PLAN),
                           random.Random("ci:kafka"), KAFKA_PLAN)


def _report(outcome: Outcome) -> str:
    return table(outcome) + "\n" + "\n".join(json.dumps(kill.__dict__) for kill in outcome.kills)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["shards", "kafka"])
def test_after_kill_9s_nothing_acknowledged_is_lost_and_nothing_is_stuck(name: str, request: pytest.FixtureRequest) -> None:
    outcome: Outcome = request.getfixturevalue(name)
    print(_report(outcome))
    failed = [c for c in outcome.checks if not c.ok]
    assert not failed, _report(outcome)
    assert not outcome.notes, outcome.notes


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["shards", "kafka"])
def test_no_temp_file_from_before_the_last_start_is_left(name: str, request: pytest.FixtureRequest) -> None:
    outcome: Outcome = request.getfixturevalue(name)
    stale = next(c for c in outcome.checks if c.name == "stale temp files")
    assert stale.ok, stale.measured

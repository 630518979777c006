"""Training from Kafka end to end, on a real Kafka-protocol broker (Tansu): nothing acknowledged is lost.

Every run writes its lineage (`train.audit_keys`: the record keys of each trained step), so the tests
count exactly which produced records were trained, how often, and what the group committed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from streamssl.pipeline.images import Trainer
from streamssl.streams.kafka_produce import create_topic, lake_records, produce
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # minutes on 2 cores: `pytest -m 'not slow'` skips it in an inner loop

RECORDS = 320  # 10 steps of 32
BATCH = 32
CHECKPOINT_EVERY = 2
KAFKA_SETS = ("kafka.session_timeout_ms=6000", "train.audit_keys=true", "data.prefetch_batches=2")


def _fill(broker, topic: str, lake: Path, count: int = RECORDS, partitions: int = 4, garbage: int = 0) -> list[str]:
    """Creates the topic and produces `garbage` undecodable values, then `count` lake images; returns the good keys."""
    create_topic(broker.bootstrap, topic, partitions=partitions)
    records = list(lake_records(str(lake)))[:count]
    bad = [(f"garbage-{i}", b"definitely not an image", []) for i in range(garbage)]
    assert produce(broker.bootstrap, topic, bad + records) == garbage + count
    return [key for key, _, _ in records]


def _trained(run_dir: Path) -> Counter[str]:
    lines = (run_dir / "trained-keys.jsonl").read_text().splitlines()
    return Counter(key for line in lines for key in json.loads(line)["keys"])


def _committed(broker, topic: str, group: str, partitions: int = 4) -> int:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions))
    finally:
        consumer.close()


def _cli(run_dir: Path, url: str, group: str, steps: int) -> list[str]:
    sets = [f"--set={s}" for s in (*KAFKA_SETS, f"kafka.group={group}", f"train.batch_size={BATCH}",
                                    "model.bn_splits=4", "moco.queue_size=128", f"checkpoint.every_steps={CHECKPOINT_EVERY}",
                                    "checkpoint.every_seconds=0", "eval.dataset=none", "eval.every_steps=0",
                                    "train.deterministic=true", "train.log_every_seconds=1000", "optim.warmup_steps=2")]
    return [sys.executable, "-m", "streamssl.pipeline.cli", "run", "--data", url, "--run-dir", str(run_dir),
            "--max-steps", str(steps), "--max-minutes", "0", "--metrics-port", "0", *sets]


def _wait_for_steps(run_dir: Path, steps: int, process: subprocess.Popen, timeout: float = 120) -> None:
    audit = run_dir / "trained-keys.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if audit.exists() and len(audit.read_text().splitlines()) >= steps:
            return
        assert process.poll() is None, f"trainer exited early with {process.returncode}"
        time.sleep(0.05)
    raise AssertionError(f"no {steps} trained steps within {timeout} s")


def test_resume_from_committed_offsets_loses_nothing(kafka_broker, small_lake: Path, tmp_path: Path) -> None:
    topic, group = "resume-committed", "g-resume"
    keys = _fill(kafka_broker, topic, small_lake)
    sets = (*KAFKA_SETS, f"kafka.group={group}")
    trainer = Trainer(tiny_config(tmp_path / "a", kafka_broker.url(topic), *sets, "train.max_steps=4"))
    first = trainer.run()
    assert first.step == 4
    # joining the group and the first fetch are start-up, counted apart from the loop's training time
    assert 0 < trainer.startup_seconds < trainer.loop_seconds
    assert _committed(kafka_broker, topic, group) == 4 * BATCH  # committed after the final durable checkpoint
    # A new run dir has no checkpoint: it starts from what the group committed.
    Trainer(tiny_config(tmp_path / "b", kafka_broker.url(topic), *sets, "train.max_steps=6")).run()
    first_keys, second_keys = _trained(tmp_path / "a"), _trained(tmp_path / "b")
    assert not set(first_keys) & set(second_keys)  # nothing trained twice
    assert sorted(first_keys + second_keys) == sorted(keys)  # and nothing lost
    assert _committed(kafka_broker, topic, group) == RECORDS


def test_a_corrupt_newest_checkpoint_trains_its_interval_again(kafka_broker, small_lake: Path, tmp_path: Path) -> None:
    topic, group, run_dir = "corrupt-newest", "g-corrupt", tmp_path / "run"
    keys = _fill(kafka_broker, topic, small_lake)
    sets = (*KAFKA_SETS, f"kafka.group={group}")
    Trainer(tiny_config(run_dir, kafka_broker.url(topic), *sets, "train.max_steps=6")).run()
    assert _committed(kafka_broker, topic, group) == 6 * BATCH  # the group is at ckpt-6's offsets
    newest = run_dir / "checkpoints" / "ckpt-000000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated: the resume falls back to ckpt-4
    first = [json.loads(line) for line in (run_dir / "trained-keys.jsonl").read_text().splitlines()]
    lost = {key for line in first if line["step"] > 4 for key in line["keys"]}
    assert len(lost) == 2 * BATCH
    # From ckpt-4 to the end of the topic is 6 steps; starting at the group's (ckpt-6's) offsets there would be 4,
    # and the run would stop at its time budget instead.
    last = Trainer(tiny_config(run_dir, kafka_broker.url(topic), *sets, "train.max_steps=10", "train.max_minutes=1"))
    assert last.run().step == 10
    second = [json.loads(line) for line in (run_dir / "trained-keys.jsonl").read_text().splitlines()][len(first):]
    assert [line["step"] for line in second] == [5, 6, 7, 8, 9, 10]
    trained = _trained(run_dir)
    assert set(trained) == set(keys)  # nothing skipped
    assert {key for key, count in trained.items() if count == 2} == lost  # the lost interval, trained again
    assert max(trained.values()) == 2
    assert _committed(kafka_broker, topic, group) == RECORDS


def test_kill_9_at_a_random_step_then_restart(kafka_broker, small_lake: Path, tmp_path: Path) -> None:
    topic, group = "kill-trainer", "g-kill"
    keys = _fill(kafka_broker, topic, small_lake)
    run_dir = tmp_path / "run"
    kill_after = random.Random(os.getpid()).randint(3, 8)  # at a random step, logged for reproduction
    process = subprocess.Popen(_cli(run_dir, kafka_broker.url(topic), group, 10), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        _wait_for_steps(run_dir, kill_after, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    print(f"killed after {kill_after} steps")
    # The orphaned loader process notices its parent is gone and leaves, so its partitions are free again.
    finished = subprocess.run(_cli(run_dir, kafka_broker.url(topic), group, 10), capture_output=True, text=True,
                              timeout=180)
    assert finished.returncode == 0, finished.stderr[-2000:]
    trained = _trained(run_dir)
    assert set(trained) == set(keys)  # every produced record was trained at least once
    duplicates = sum(count - 1 for count in trained.values())
    assert duplicates <= CHECKPOINT_EVERY * BATCH  # at most what was trained after the last checkpoint
    assert _committed(kafka_broker, topic, group) == RECORDS


def test_garbage_values_are_dead_lettered(kafka_broker, small_lake: Path, tmp_path: Path) -> None:
    topic, dlq, group = "with-garbage", "with-garbage-dlq", "g-garbage"
    create_topic(kafka_broker.bootstrap, dlq, partitions=1)
    keys = _fill(kafka_broker, topic, small_lake, count=BATCH, partitions=1, garbage=5)
    trainer = Trainer(tiny_config(tmp_path, kafka_broker.url(topic), *KAFKA_SETS, f"kafka.group={group}",
                                  f"kafka.dead_letter_topic={dlq}", "train.max_steps=1"))
    trainer.run()
    assert sorted(_trained(tmp_path)) == sorted(keys)
    letters = [json.loads(line) for line in (tmp_path / "dead-letter.jsonl").read_text().splitlines()]
    assert [(e["key"], e["reason"]) for e in letters] == [(f"garbage-{i}", "corrupt_image") for i in range(5)]
    assert trainer.metrics.registry.get_sample_value("streamssl_records_rejected_total", {"reason": "corrupt_image"}) == 5
    consumer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, consumer_timeout_ms=5000)
    consumer.assign([TopicPartition(dlq, 0)])
    consumer.seek_to_beginning()
    dead = list(consumer)
    consumer.close()
    assert [m.value for m in dead] == [b"definitely not an image"] * 5
    assert all(dict(m.headers)["reason"] == b"corrupt_image" for m in dead)


def test_two_workers_in_one_group_split_the_partitions(kafka_broker, small_lake: Path, tmp_path: Path) -> None:
    topic, group = "two-workers", "g-two"
    create_topic(kafka_broker.bootstrap, topic, partitions=4)
    url = kafka_broker.url(topic)
    workers = [subprocess.Popen(_cli(tmp_path / f"w{i}", url, group, 0), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE) for i in range(2)]
    audits = [tmp_path / f"w{i}" / "trained-keys.jsonl" for i in range(2)]
    try:
        time.sleep(12)  # both join the group (Tansu: about half the session timeout each) before data arrives
        keys = _fill(kafka_broker, topic, small_lake)
        # Keys hash to partitions unevenly, and each worker trains only whole batches of its own partitions:
        # wait until all but the two workers' incomplete last batches (under BATCH records each) are trained.
        deadline = time.monotonic() + 120
        while sum(len(a.read_text().splitlines()) if a.exists() else 0 for a in audits) * BATCH <= RECORDS - 2 * BATCH:
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
            time.sleep(0.1)
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            assert worker.wait(timeout=60) == 0, worker.stderr.read().decode()[-2000:]
    finally:
        for worker in workers:
            worker.kill()
    first, second = _trained(tmp_path / "w0"), _trained(tmp_path / "w1")
    assert first and second  # both got partitions
    assert not set(first) & set(second)  # each partition went to one worker: no record trained by both
    assert max((first + second).values()) == 1
    assert set(first) | set(second) <= set(keys)
    assert len(first) + len(second) > RECORDS - 2 * BATCH


@pytest.mark.timeout(300)
def test_broker_killed_and_restarted_mid_run(durable_kafka_broker, small_lake: Path, tmp_path: Path) -> None:
    broker, topic, group = durable_kafka_broker, "broker-restart", "g-restart"
    keys = _fill(broker, topic, small_lake)
    run_dir = tmp_path / "run"
    process = subprocess.Popen(_cli(run_dir, broker.url(topic), group, 10), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        _wait_for_steps(run_dir, 2, process)
        broker.kill()
        time.sleep(3)
        broker.restart()
        assert process.wait(timeout=240) == 0, process.stderr.read().decode()[-2000:]
    finally:
        process.kill()
    trained = _trained(run_dir)
    assert set(trained) == set(keys)
    assert sum(trained.values()) == 10 * BATCH


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait(condition, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_dead_letters_during_a_broker_outage_neither_stop_nor_slow_training(durable_kafka_broker, small_lake: Path,
                                                                            tmp_path: Path) -> None:
    broker, topic, dlq, group = durable_kafka_broker, "outage-in", "outage-dlq", "g-outage"
    create_topic(broker.bootstrap, topic, partitions=1)
    good = list(lake_records(str(small_lake)))[:10 * BATCH]
    garbage = [(f"garbage-{index}", b"definitely not an image", []) for index in range(5)]
    # The consumer's first fetch takes all of these (a partition's fetch is up to 1 MiB): the trainer has data for
    # 8 steps while the broker is down, and meets the garbage after step 5.
    assert produce(broker.bootstrap, topic, good[:5 * BATCH] + garbage + good[5 * BATCH:8 * BATCH]) == 8 * BATCH + 5
    run_dir = tmp_path / "run"
    broker.kill()
    started = time.monotonic()
    trainer = Trainer(tiny_config(run_dir, broker.url(topic), *KAFKA_SETS, f"kafka.group={group}",
                                  f"kafka.dead_letter_topic={dlq}", "train.max_steps=10"))
    assert time.monotonic() - started < 10  # it starts with the broker down (it used to fail: "cannot reach Kafka")
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    audit, letters = run_dir / "trained-keys.jsonl", run_dir / "dead-letter.jsonl"
    try:
        broker.restart()
        # Created after the run started, the dead-letter topic is one the run's producer has no metadata for when the
        # broker goes down, like a topic whose metadata expired (after 5 min): the old one blocked 60 s per dead letter.
        create_topic(broker.bootstrap, dlq, partitions=1)
        _wait(lambda: _lines(audit) >= 1, 60, "the first step")
        broker.kill()
        killed = time.time()
        _wait(lambda: _lines(audit) >= 8, 60, "steps 2-8 with the broker down")  # was 60 s per dead letter
        entries = [json.loads(line) for line in letters.read_text().splitlines()]
        assert [entry["key"] for entry in entries] == [key for key, _, _ in garbage]
        assert all(entry["time"] > killed for entry in entries)  # rejected while the broker was down
        broker.restart()
        assert produce(broker.bootstrap, topic, good[8 * BATCH:]) == 2 * BATCH
        thread.join(timeout=180)
        assert not thread.is_alive()
    finally:
        trainer.stop.set()
        thread.join(timeout=30)
    assert trainer.state.step == 10
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, consumer_timeout_ms=5000)
    consumer.assign([TopicPartition(dlq, 0)])
    consumer.seek_to_beginning()
    dead = list(consumer)
    consumer.close()
    assert [(m.key.decode(), m.value, dict(m.headers)["reason"]) for m in dead] == [
        (key, value, b"corrupt_image") for key, value, _ in garbage]

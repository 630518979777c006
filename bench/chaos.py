"""Chaos: `streamssl run` under kill -9 at random and aimed points, restarted on the same run dir each time.

Per source — (a) a WebDataset lake in follow mode that grows while the run trains, (b) a Kafka topic on a real
Tansu broker with durable (S3 on moto) storage, (c) a series topic trained by CPC — a real `streamssl run`
subprocess (batch 32, a checkpoint and a publish every 2 steps, the audit trail on) takes `--kills` kill -9s:
the trainer at a random moment, during start-up, while a checkpoint is written, right after its rename
(before the directory fsync, the Kafka commit and the publish), or during a publish (bench/chaos_kills.py);
its loader child (images), which the trainer must replace itself; the broker (Kafka), restarted on the same
port and storage. After the last kill the run is left to reach its step target, which it can reach only if
no record was skipped. Then the run dir and the broker are checked (bench/chaos_checks.py) and one table
per source prints each measured value next to its goal. Exit status 1 if any check failed.

    .venv/bin/python bench/chaos.py [--seed 0] [--kills 20] [--sources shards,kafka,series]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.kafka_broker: the Tansu the tests start
from bench.chaos_checks import (
    Check,
    check_checkpoints,
    check_committed,
    check_exits,
    check_final_step,
    check_published,
    check_records,
    check_temp_files,
    checkpoint_value,
    trained_keys,
)
from bench.chaos_kills import (
    INSIDE,
    LOADER_REPLACED,
    TRAINER_AIMS,
    Kill,
    Target,
    aim_and_kill,
    kill_broker,
    kill_loader,
    newest_step,
    wait_for_progress,
)
from bench.runs import machine
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.kafka_produce import create_topic, lake_records, produce
from streamssl.streams.lake import build_lake
from tests.kafka_broker import Tansu, durable_broker

BATCH = 32
CHECKPOINT_EVERY = 2
SHARD_SIZE = 128  # 4 steps per shard
SERIES_WARMUP, SERIES_POINTS_PER_STEP = 64, 4
FINAL_SECONDS = 600.0  # the last start must reach the step target within this
SOURCES = ("shards", "kafka", "series")
COMMON_SETS = (f"checkpoint.every_steps={CHECKPOINT_EVERY}", "checkpoint.every_seconds=0",
               "checkpoint.publish_every=1", "train.log_every_seconds=1000")
IMAGE_SETS = (f"train.batch_size={BATCH}", "model.bn_splits=4", "moco.queue_size=128", "eval.dataset=none",
              "eval.every_steps=0", "train.audit_keys=true", "optim.warmup_steps=2", "data.shuffle_buffer=64",
              "data.prefetch_batches=2")
KAFKA_SETS = ("kafka.session_timeout_ms=6000", "kafka.group=chaos")
TRAINER_KILLS = tuple(f"trainer:{aim}" for aim in TRAINER_AIMS)


@dataclass
class Source:
    """One source under test: the command to kill, what was acknowledged, and the checks only it has."""

    name: str
    what: str
    run_dir: Path
    data: str
    steps: int
    records: int
    kinds: tuple[str, ...]  # kill kinds it takes
    sets: tuple[str, ...]
    method: str = "moco"
    broker: Tansu | None = None
    acknowledged: Callable[[], list[str]] = list  # record keys, asked after the run (a lake may still be growing)
    records_per_step: int = BATCH  # records one step takes: a checkpoint interval is CHECKPOINT_EVERY of them
    replayed_first: int = 0  # records a start before the first checkpoint takes again besides that (series warm-up)
    extra_checks: Callable[[], list[Check]] = list
    # started with the session (the lake's feeder); returns what stops it after
    during: Callable[[Target], Callable[[], None]] | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "streamssl.pipeline.cli", "run", "--method", self.method, "--data", self.data,
                "--run-dir", str(self.run_dir), "--max-steps", str(self.steps), "--max-minutes", "0",
                "--metrics-port", "0", *(f"--set={item}" for item in self.sets)]


@dataclass
class Outcome:
    source: str
    what: str
    kills: list[Kill]
    restarts: int
    records: int
    checks: list[Check]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


def plan_kills(kinds: tuple[str, ...], kills: int, rng: random.Random) -> list[str]:
    """`kills` kinds, every kind once per round (in a seeded order), so that each appears about equally often."""
    plan: list[str] = []
    while len(plan) < kills:
        round_ = list(kinds)
        rng.shuffle(round_)
        plan += round_
    return plan[:kills]


# --- the sources ----------------------------------------------------------------------------------------------
def steps_for(kills: int, steps_per_kill: int) -> int:
    """A step target that the kills end well before: each start trains a few steps before its kill."""
    return kills * steps_per_kill + 20


class LakeFeeder(threading.Thread):
    """Lands staged shards in the lake (rename: whole or not at all) while the run trains, keeping it `ahead`
    records ahead of the newest trained step, so that the follow-mode run always has more to read."""

    def __init__(self, staged: list[Path], lake: Path, target: Target, ahead: int) -> None:
        super().__init__(daemon=True)
        self.staged, self.lake, self.target, self.ahead = list(staged), lake, target, ahead
        self.landed = 0
        self.done = threading.Event()
        while self.staged and self.landed * SHARD_SIZE < ahead:
            self._land()

    def _land(self) -> None:
        shard = self.staged.pop(0)
        shard.rename(self.lake / shard.name)
        self.landed += 1

    def run(self) -> None:
        while self.staged and not self.done.wait(0.2):
            if self.landed * SHARD_SIZE < newest_step(self.target.run_dir) * BATCH + self.ahead:
                self._land()


def shards_source(work: Path, kills: int, steps_per_kill: int) -> Source:
    steps = steps_for(kills, steps_per_kill)
    records = -(-steps * BATCH // SHARD_SIZE) * SHARD_SIZE
    steps = records // BATCH
    images, labels = load_fashion_mnist("train")
    staging, lake = work / "staging", work / "lake"
    build_lake(staging, images[:records], labels[:records], shard_size=SHARD_SIZE)
    lake.mkdir()
    staged = sorted(staging.glob("shard-*.tar"))

    def start_feeder(target: Target) -> Callable[[], None]:
        feeder = LakeFeeder(staged, lake, target, ahead=3 * SHARD_SIZE)
        feeder.start()

        def stop() -> None:
            feeder.done.set()
            feeder.join()
        return stop

    def acknowledged() -> list[str]:  # every record of every shard in the lake
        return [key for key, _, _ in lake_records(str(lake))]

    what = f"WebDataset lake in follow mode, {records // SHARD_SIZE} shards of {SHARD_SIZE} landing while it trains"
    return Source("shards", what, work / "run", str(lake), steps, records, (*TRAINER_KILLS, "loader"),
                  (*COMMON_SETS, *IMAGE_SETS, "data.mode=follow", "data.poll_seconds=0.2"),
                  acknowledged=acknowledged, during=start_feeder)


def committed(broker: Tansu, topic: str, group: str, partitions: int) -> int:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions))
    finally:
        consumer.close()


def kafka_source(work: Path, kills: int, steps_per_kill: int, broker: Tansu) -> Source:
    steps = steps_for(kills, steps_per_kill)
    records, topic = steps * BATCH, "chaos-images"
    images, labels = load_fashion_mnist("train")
    build_lake(work / "lake", images[:records], labels[:records], shard_size=1000)
    create_topic(broker.bootstrap, topic, partitions=4)
    produced = list(lake_records(str(work / "lake")))
    assert produce(broker.bootstrap, topic, produced) == records, "the broker did not acknowledge every record"
    keys = [key for key, _, _ in produced]
    return Source("kafka", f"Kafka topic, 4 partitions, {records} records, Tansu on S3 (moto) storage", work / "run",
                  broker.url(topic), steps, records, (*TRAINER_KILLS, "loader", "broker"),
                  (*COMMON_SETS, *IMAGE_SETS, *KAFKA_SETS), broker=broker, acknowledged=lambda: keys,
                  extra_checks=lambda: [check_committed(committed(broker, topic, "chaos", 4), records)])


def series_source(work: Path, kills: int, steps_per_kill: int, broker: Tansu) -> Source:
    """CPC on one series read from a 1-partition topic: `steps` steps need exactly every produced point."""
    import numpy as np

    steps, topic = steps_for(kills, steps_per_kill * 3), "chaos-series"  # a CPC step is 4 points: far quicker
    points = SERIES_WARMUP - 1 + SERIES_POINTS_PER_STEP * steps
    t = np.arange(points)
    values = 5.0 + 2.0 * np.sin(t / 6.0) + 0.1 * np.random.default_rng(0).normal(size=points)
    create_topic(broker.bootstrap, topic, partitions=1)  # one partition: the points' order is the series'
    messages: list[tuple[str, bytes, list[Any]]] = [
        (f"p{i}", json.dumps({"series_id": "m1", "timestamp": i, "value": float(v)}).encode(), [])
        for i, v in enumerate(values)]
    assert produce(broker.bootstrap, topic, messages) == points, "the broker did not acknowledge every point"
    run_dir = work / "run"

    def extra_checks() -> list[Check]:
        newest = max((int(p.name[5:14]) for p in (run_dir / "checkpoints").glob("ckpt-*.pt")), default=-1)
        seen = checkpoint_value(run_dir, newest, "points_seen") if newest >= 0 else None
        return [Check("points in the final checkpoint", str(seen), f"= {points} (every produced point, once)",
                      seen == points),
                check_committed(committed(broker, topic, "chaos", 1), points)]

    sets = (*COMMON_SETS, *KAFKA_SETS, f"series.warmup_points={SERIES_WARMUP}", "series.window=64",
            "series.history=96", "series.batch_size=8", f"series.points_per_step={SERIES_POINTS_PER_STEP}",
            "series.processes=1", "cpc.context_dim=16", "train.audit_keys=true")
    return Source("series", f"CPC on a series topic, 1 partition, {points} points, the same broker", run_dir,
                  broker.url(topic), steps, points, (*TRAINER_KILLS, "broker"), sets,
                  method="cpc", broker=broker, extra_checks=extra_checks,
                  acknowledged=lambda: [f"m1@{float(i)!r}" for i in range(points)],  # the series job's audit keys
                  records_per_step=SERIES_POINTS_PER_STEP, replayed_first=SERIES_WARMUP)


def build_source(name: str, work: Path, kills: int, steps_per_kill: int, broker: Tansu | None) -> Source:
    if name == "shards":
        return shards_source(work, kills, steps_per_kill)
    assert broker is not None, "a topic needs the broker"
    return (kafka_source if name == "kafka" else series_source)(work, kills, steps_per_kill, broker)


# --- one session ------------------------------------------------------------------------------------------------
def run_session(source: Source, kills: int, rng: random.Random, plan: list[str] | None = None,
                log: Callable[[str], None] = print) -> Outcome:
    """Kills (`plan`: their kinds in order; default `plan_kills`), restarts, then the run left to finish; the run
    dir and the broker checked after."""
    target = Target(source.command(), source.run_dir, source.run_dir.parent / "trainer.log")
    plan = plan or plan_kills(source.kinds, kills, rng)
    started = time.monotonic()
    stop_during = source.during(target) if source.during else None
    delivered: list[Kill] = []
    notes: list[str] = []
    restarts = -1  # the first start is not a restart

    def running() -> bool:
        """Starts the trainer again if it is not running; False once it finished (exit 0)."""
        nonlocal restarts
        if target.process is None:
            if target.exits and target.exits[-1] == (0, False):
                return False
            target.start()
            restarts += 1
        return True

    try:
        running()
        # The first start's time to its first step: the window a start-up kill is drawn from.
        startup_estimate = 5.0
        if wait_for_progress(target, timeout=180):
            startup_estimate = time.monotonic() - started
        elif target.process is None:  # a bad command: no point in killing it
            plan = []
            notes.append(f"the first start failed: {target.log_path.read_text().strip().splitlines()[-1]}")
        for number, kind in enumerate(plan, 1):
            if not running():
                notes.append(f"the run reached its step target after {number - 1} kills")
                break
            if kind.startswith("trainer:"):
                hit = aim_and_kill(target, kind.partition(":")[2], rng, startup_estimate)
            elif kind == "loader":
                hit = kill_loader(target, rng)
            else:
                hit = kill_broker(source.broker, target, rng)
            step = newest_step(source.run_dir)
            delivered.append(Kill(number, kind, step, round(time.monotonic() - started, 1), hit))
            log(f"  kill {number:2d} {kind:26s} at step {step:4d}: {hit}")
        if running() and target.wait(FINAL_SECONDS) is None:
            notes.append(f"the last start did not finish within {FINAL_SECONDS:.0f} s (killed at step "
                         f"{newest_step(source.run_dir)})")
    finally:
        if target.process is not None:
            target.kill()
        if stop_during is not None:
            stop_during()
    seconds = time.monotonic() - started
    return Outcome(source.name, source.what, delivered, restarts, source.records,
                   verdict(source, target, delivered, kills), seconds, notes)


def verdict(source: Source, target: Target, kills: list[Kill], asked: int) -> list[Check]:
    run_dir = source.run_dir
    delivered = sum(kill.delivered for kill in kills)
    checks = [Check("kills delivered", str(delivered), f"≥ {asked}", delivered >= asked)]
    trained, torn = trained_keys(run_dir)  # image records, or series points as `id@timestamp`
    per_kill = CHECKPOINT_EVERY * source.records_per_step + source.replayed_first
    checks += check_records(source.acknowledged(), trained, torn, delivered * per_kill,
                            f"{delivered} kills × ({CHECKPOINT_EVERY} steps × {source.records_per_step}"
                            + (f" + {source.replayed_first} warm-up" if source.replayed_first else "") + ")")
    letters = run_dir / "dead-letter.jsonl"
    reasons = Counter(json.loads(line)["reason"] for line in letters.read_text().splitlines()) if letters.exists() else {}
    checks.append(Check("dead letters", str(sum(reasons.values())) + (f" {dict(reasons)}" if reasons else ""),
                        "0 (every record is good)", not reasons))
    if "loader" in source.kinds:  # the trainer's own log line for each loader it replaced
        replaced = target.log_path.read_text(errors="replace").count(LOADER_REPLACED)
        wanted = sum(1 for kill in kills if kill.kind == "loader" and kill.hit.startswith("loader pid"))
        checks.append(Check("loaders replaced by the trainer", str(replaced), f"= {wanted} loader kills", replaced == wanted))
    checkpoints, newest = check_checkpoints(run_dir)
    left_by = {kill.hit.split()[0]: f"kill {kill.number} ({kill.kind})" for kill in kills if kill.hit.endswith(INSIDE)}
    checks += [checkpoints, check_final_step(newest, source.steps), *check_published(run_dir, newest),
               check_temp_files(run_dir, target.started_at, left_by), *check_exits(target.exits, target.orphans),
               *source.extra_checks()]
    return checks


# --- the report -------------------------------------------------------------------------------------------------
def table(outcome: Outcome) -> str:
    kinds = Counter(kill.kind for kill in outcome.kills)
    trainer = sum(count for kind, count in kinds.items() if kind.startswith("trainer:"))
    aims = ", ".join(f"{kind.partition(':')[2]} {kinds[kind]}" for kind in sorted(kinds) if kind.startswith("trainer:"))
    others = "".join(f", {kind} {kinds[kind]}" for kind in ("loader", "broker") if kinds[kind])
    inside = Counter(kill.kind.partition(":")[2] for kill in outcome.kills if kill.hit.endswith(INSIDE))
    rows = [f"### {outcome.source}: {outcome.what}", "", "| | measured | goal | |", "|---|---|---|---|",
            f"| kills by kind | trainer {trainer} ({aims}){others} | | |",
            f"| aimed kills that landed inside the write (its temp file still there after) | "
            f"{', '.join(f'{aim} {count}' for aim, count in sorted(inside.items())) or 0} | | |",
            f"| restarts | {outcome.restarts} | | |", f"| records | {outcome.records} | | |"]
    rows += [f"| {c.name} | {c.measured} | {c.goal} | {'ok' if c.ok else '**FAIL**'} |" for c in outcome.checks]
    rows.append(f"| wall time | {outcome.seconds:.0f} s | | |")
    return "\n".join(rows + [f"\n{note}" for note in outcome.notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill plan, the aims and the delays")
    parser.add_argument("--kills", type=int, default=20, help="kill -9s per source")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    parser.add_argument("--steps-per-kill", type=int, default=8, help="sizes the data: steps per kill, plus 20")
    parser.add_argument("--work-dir", default="", help="keep run dirs and logs here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    sources = [name for name in args.sources.split(",") if name]
    if unknown := set(sources) - set(SOURCES):
        parser.error(f"unknown sources {sorted(unknown)}; valid: {', '.join(SOURCES)}")
    print(f"machine: {json.dumps(machine())}; load average {os.getloadavg()[0]:.1f} at the start; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="streamssl-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    outcomes = []
    try:
        with ExitStack() as stack:
            broker = None
            if set(sources) - {"shards"}:  # one durable broker for both topics
                broker = stack.enter_context(durable_broker(work))
            for name in sources:
                (work / name).mkdir(parents=True, exist_ok=True)
                print(f"{name}: seed {args.seed}, {args.kills} kills", flush=True)
                source = build_source(name, work / name, args.kills, args.steps_per_kill, broker)
                outcome = run_session(source, args.kills, random.Random(f"{args.seed}:{name}"))
                outcomes.append(outcome)
                (work / name / "outcome.json").write_text(json.dumps(asdict(outcome), indent=1))
                print(table(outcome) + "\n", flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    return 0 if all(outcome.ok for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Kafka ingest and Kafka-fed training, each measured side by side with its baseline in one run.

On a Tansu broker started here (memory storage, as the tests use), the embedded Fashion-MNIST lake is
produced once to a topic of `--partitions` partitions. Then, in alternating rounds so that machine noise
hits both sides:
* ingest: decoded samples/s that reach the trainer (KafkaSource → loader process → PNG decode → batches,
  `BatchLoader.next`) vs a raw kafka-python `KafkaConsumer.poll` loop over the same records (bytes only,
  nothing decoded). Goal: ratio ≥ 0.8.
* training: `Trainer.run` on `kafka://…` (the real loop: consumer, decode, checkpoint-aligned commits) vs
  the image task's `step` on the same number of batches already decoded in memory. Goal: ratio ≥ 0.95. Reported twice:
  with the Kafka side's start-up (creating the consumer, joining the group, the first fetch: a few seconds
  per round, once per run in production) and from its first batch on (steady state). A few untimed steps
  before round 1 warm up the process (thread pools, kernels) so that neither side pays for that alone.
Prints one JSON line per round and a summary line.

    .venv/bin/python bench/kafka_throughput.py [--records 20000] [--rounds 3] [--steps 100] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it, before torch loads OpenMP

import torch
from kafka import KafkaConsumer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.kafka_broker: the same Tansu the tests start
from streamssl.pipeline.config import load_config
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.loader import BatchLoader
from streamssl.pipeline.loading.messages import Batch
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.kafka_produce import create_topic, lake_records, produce
from streamssl.streams.kafka_source import KafkaSource
from streamssl.streams.lake import default_lake
from tests.kafka_broker import Tansu

LAKE_RECORDS = 60000  # the embedded Fashion-MNIST lake


def raw_fetch(bootstrap: str, topic: str, records: int) -> float:
    """Records/s of a plain consumer reading `records` values from the start of the topic."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None)
    started, seen = 0.0, 0
    try:
        while seen < records:
            for batch in consumer.poll(timeout_ms=200).values():
                if not started:  # from the first record: connecting is not throughput
                    started, seen = time.monotonic(), -len(batch)
                seen += sum(len(message.value) > 0 for message in batch)
        return seen / (time.monotonic() - started)
    finally:
        consumer.close()


def decoded_ingest(url: str, group: str, records: int, batch_size: int) -> float:
    """Decoded samples/s handed to the trainer by the loader reading the topic with a new consumer group."""
    loader = BatchLoader(partial(KafkaSource, url, group=group), None, batch_size, "png", 1, 28)
    started, seen = 0.0, 0
    try:
        while seen < records:
            batch = loader.next(timeout=30)
            if not isinstance(batch, Batch):  # the end or a failure: the lake's records all decode
                break
            if not started:  # from the first batch: the group join is start-up, not throughput
                started, seen = time.monotonic(), -len(batch.images)
            seen += len(batch.images)
        return seen / (time.monotonic() - started)
    finally:
        loader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000, help="records per ingest measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="training steps per side per round")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the broker

    work = Path(tempfile.mkdtemp(prefix="streamssl-kafka-bench-"))
    broker = Tansu("memory://tansu/", work / "tansu.log").start()
    topic = "images"
    try:
        create_topic([broker.bootstrap], topic, args.partitions)
        # enough for every round's training (the lake again as needed, the keys repeat) and for the ingest reads
        cfg = load_config(sets=args.set)
        needed = max(args.rounds * args.steps * cfg.train.batch_size, args.records)
        lake = str(default_lake())
        passes = itertools.chain.from_iterable(lake_records(lake) for _ in range(math.ceil(needed / LAKE_RECORDS)))
        started = time.monotonic()
        produced = produce([broker.bootstrap], topic, passes, limit=needed)
        produce_rate = produced / (time.monotonic() - started)
        print(json.dumps({"produced": produced, "produce_records_per_s": round(produce_rate)}), flush=True)

        run_dir = work / "run"
        sets = [f"run_dir={run_dir}", f"data.source={broker.url(topic)}?group=bench-train", "eval.dataset=none",
                "metrics.port=0", "train.max_minutes=0", "checkpoint.every_steps=0", "checkpoint.every_seconds=0",
                "train.log_every_seconds=1000", *args.set]
        images, _ = load_fashion_mnist("train")
        warm = Trainer(load_config(sets=[*sets, f"run_dir={work / 'warm-up'}"]))
        size = warm.cfg.train.batch_size
        for _ in range(5):
            warm.task.step(Batch(torch.from_numpy(images[:size]).unsqueeze(1), [], {}, {}, torch.arange(size)))
        del warm
        totals = {name: [0.0, 0.0] for name in ("raw", "decoded", "stream", "steady", "memory")}
        for round_index in range(args.rounds):
            raw = raw_fetch(broker.bootstrap, topic, args.records)
            decoded = decoded_ingest(broker.url(topic), f"bench-ingest-{round_index}", args.records, 256)
            for name, rate in (("raw", raw), ("decoded", decoded)):
                totals[name][0] += args.records
                totals[name][1] += args.records / rate

            cfg = load_config(sets=[*sets, f"train.max_steps={(round_index + 1) * args.steps}"])
            batch_size = cfg.train.batch_size
            trainer = Trainer(cfg)
            trainer.run()  # resumes the previous round's checkpoint and its offsets, trains `steps` more
            stream = args.steps * batch_size / trainer.loop_seconds
            steady = args.steps * batch_size / (trainer.loop_seconds - trainer.startup_seconds)
            pixels = torch.from_numpy(images[: args.steps * batch_size]).unsqueeze(1)
            batches = [Batch(pixels[i * batch_size:(i + 1) * batch_size], [], {}, {},
                             torch.arange(i * batch_size, (i + 1) * batch_size)) for i in range(args.steps)]
            started = time.monotonic()
            for batch in batches:
                trainer.task.step(batch)
            memory = args.steps * batch_size / (time.monotonic() - started)
            for name, rate in (("stream", stream), ("steady", steady), ("memory", memory)):
                totals[name][0] += args.steps * batch_size
                totals[name][1] += args.steps * batch_size / rate
            print(json.dumps({"round": round_index + 1, "raw_fetch_records_per_s": round(raw),
                              "decoded_samples_per_s": round(decoded), "kafka_training_samples_per_s": round(stream),
                              "kafka_startup_s": round(trainer.startup_seconds, 2),
                              "kafka_steady_samples_per_s": round(steady),
                              "memory_training_samples_per_s": round(memory)}), flush=True)
        rate = {name: samples / seconds for name, (samples, seconds) in totals.items()}
        print(json.dumps({
            "raw_fetch_records_per_s": round(rate["raw"]), "decoded_samples_per_s": round(rate["decoded"]),
            "ingest_ratio": round(rate["decoded"] / rate["raw"], 3),
            "kafka_training_samples_per_s": round(rate["stream"], 1),
            "memory_training_samples_per_s": round(rate["memory"], 1),
            "training_ratio": round(rate["stream"] / rate["memory"], 3),
            "kafka_steady_samples_per_s": round(rate["steady"], 1),
            "steady_training_ratio": round(rate["steady"] / rate["memory"], 3),
            "batch_size": cfg.train.batch_size, "backbone": cfg.model.backbone, "partitions": args.partitions,
            "threads": torch.get_num_threads(),
        }), flush=True)
    finally:
        broker.stop()


if __name__ == "__main__":
    main()

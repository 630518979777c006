"""One bad-input corpus (tests/fixtures/corpus/) through every source kind: a lake of tar shards and a Kafka topic
(a real Tansu broker). Each corpus file sits between good records; for each, the run goes on and the file is either
dead-lettered with a reason or trained, the same in both sources, and the good records around it are trained.

Ray Data is left out here: its start-up alone is tens of seconds on 2 cores, and a zero-byte image there is a
`missing_image` (Ray's reader does not tell an empty column from a missing one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kafka import KafkaProducer

from streamssl.pipeline.config import load_config
from streamssl.pipeline.images import Trainer
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.kafka_produce import create_topic
from streamssl.streams.lake import png_bytes, write_shard
from streamssl.streams.records import readable
from tests.conftest import tiny_sets

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "corpus"
NOT_UTF8 = "caf\udce9-key"  # a key whose bytes are not UTF-8 (b"caf\xe9-key"), as Python reads such a tar name
# What becomes of each corpus file, in every source: its dead letter's reason, or "trained".
EXPECTED = {
    "truncated": "corrupt_image", "sixteen-bit": "trained", "zero-bytes": "empty_value",
    "not-an-image": "corrupt_image", "bomb-header": "image_too_large", "png-crashes-libpng-decoder": "corrupt_image",
    readable(NOT_UTF8): "trained",
}
GOOD_BETWEEN, GOOD_AFTER = 6, 32  # good records before each corpus file, and after the last: 74 good in all
TRAINED_GOOD = 2 * 32 - 2  # two batches of 32 hold the two corpus files that train and 62 good records


def _records() -> list[tuple[str, bytes]]:
    """(key, PNG bytes): good images with the corpus files between them, the good image keyed NOT_UTF8 first; every
    corpus file comes before the second batch is full, so a run of two steps reads them all."""
    images, _ = load_fashion_mnist("train")
    bad = [(NOT_UTF8, png_bytes(images[999]))] + [(path.stem, path.read_bytes()) for path in sorted(CORPUS.glob("*.png"))]
    assert {readable(key) for key, _ in bad} == set(EXPECTED)
    records: list[tuple[str, bytes]] = []
    for key, data in [*bad, ("", b"")]:
        for _ in range(GOOD_BETWEEN if key else GOOD_AFTER):
            records.append((f"good-{len(records):03d}", png_bytes(images[len(records)])))
        if key:
            records.append((key, data))
    return records


def _outcomes(run_dir: Path) -> tuple[dict[str, str], set[str]]:
    """Each corpus key's fate, and the good keys trained."""
    lines = (run_dir / "dead-letter.jsonl").read_text().splitlines()
    letters = {letter["key"]: letter["reason"] for letter in map(json.loads, lines)}
    trained = {key for line in (run_dir / "trained-keys.jsonl").read_text().splitlines() for key in json.loads(line)["keys"]}
    fates = {key: letters.get(key, "trained" if key in trained else "lost") for key in EXPECTED}
    return fates, {key for key in trained if key.startswith("good-")}


def _train(run_dir: Path, source: str, *sets: str) -> None:
    trainer = Trainer(load_config(sets=tiny_sets(run_dir, source, "data.shuffle_buffer=0", "train.audit_keys=true", *sets)))
    trainer.run()
    assert trainer.state.step == 2


@pytest.fixture(scope="module")
def records() -> list[tuple[str, bytes]]:
    return _records()


def test_the_corpus_through_a_lake_of_tar_shards(tmp_path: Path, records: list[tuple[str, bytes]]) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    write_shard(lake / "shard-000000.tar", [(key, {"png": data}) for key, data in records])
    _train(tmp_path / "run", str(lake), "data.mode=once")
    fates, good = _outcomes(tmp_path / "run")
    assert fates == EXPECTED
    assert len(good) == TRAINED_GOOD


def test_the_corpus_through_a_kafka_topic(kafka_broker, tmp_path: Path, records: list[tuple[str, bytes]]) -> None:
    topic = "corpus"
    create_topic(kafka_broker.bootstrap, topic, partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    for key, data in records:  # keys as raw bytes: the not-UTF-8 one as a Latin-1 producer sends it
        producer.send(topic, key=key.encode("utf-8", "surrogateescape"), value=data)
    producer.flush()
    producer.close()
    _train(tmp_path / "run", kafka_broker.url(topic), "kafka.group=corpus", "train.max_steps=2",
           "kafka.session_timeout_ms=6000")
    fates, good = _outcomes(tmp_path / "run")
    assert fates == EXPECTED
    assert len(good) == TRAINED_GOOD

"""Turns the `data` config into a stream source, and the `eval` config into a labelled kNN set.

`data.source` is parsed once into a `SourceSpec`: which kind of source it names and what that kind needs;
everything that depends on the kind asks the spec.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from streamssl.pipeline.config import DataConfig, EvalConfig, KafkaConfig
from streamssl.pipeline.evaluation.knn import subset
from streamssl.pipeline.extras import require
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.kafka_produce import parse_kafka_url
from streamssl.streams.lake import default_lake
from streamssl.streams.object_store import is_object_prefix, is_object_url
from streamssl.streams.ray_source import parse_ray_spec
from streamssl.streams.webdataset_source import WebDatasetSource

log = logging.getLogger(__name__)

SourceKind = Literal["embedded", "lake", "kafka", "ray"]


@dataclass(frozen=True)
class SourceSpec:
    """What `data.source` names.

    kind: "embedded" ("": the built-in lake, or the demo series of a series job), "lake" (a directory of
        shards or table files, a brace pattern or a URL), "kafka" (`kafka://HOST:PORT[,…]/TOPIC[?group=G]`)
        or "ray" (`ray+FORMAT://PATH`, read by Ray Data).
    text: `data.source` as given: what the source classes are built from.
    path: lake: the path or pattern; ray: the dataset path (absolute if local).
    ray_format: ray: webdataset, parquet or images.
    bootstrap, topic, group: kafka: the servers, the topic and the spec's `?group=` ("" = `kafka.group`).
    """

    kind: SourceKind
    text: str = ""
    path: str = ""
    ray_format: str = ""
    bootstrap: tuple[str, ...] = ()
    topic: str = ""
    group: str = ""

    @property
    def is_local(self) -> bool:
        """A lake named by a path on this machine (a directory, a file, a brace pattern), not by a URL."""
        return self.kind == "lake" and "://" not in self.path

    @property
    def is_local_directory(self) -> bool:
        """A lake directory on this machine: one that can grow while it is read."""
        return self.is_local and Path(self.path).is_dir()

    @property
    def is_object_prefix(self) -> bool:
        """A lake named by an object-storage prefix (`s3://bucket/prefix/`): listed, and followed, like a directory."""
        return self.kind == "lake" and is_object_prefix(self.path)


def parse_source(text: str) -> SourceSpec:
    """`data.source` as a `SourceSpec`; SourceError for a malformed Kafka or Ray spec or a missing local Ray path."""
    if not text:
        return SourceSpec("embedded")
    if text.startswith("kafka://"):
        bootstrap, topic, params = parse_kafka_url(text)
        return SourceSpec("kafka", text, bootstrap=tuple(bootstrap), topic=topic, group=params.get("group", ""))
    if text.startswith("ray+"):
        ray_format, path = parse_ray_spec(text)
        return SourceSpec("ray", text, path=path, ray_format=ray_format)
    return SourceSpec("lake", text, path=text)


def source_spec(data: DataConfig) -> SourceSpec:
    """The `data` section's source, parsed."""
    return parse_source(data.source)


def resolve_mode(spec: SourceSpec, mode: str) -> str:
    """`auto`: a directory or an s3 prefix is a lake that keeps growing (follow); a fixed list or the demo lake cycles."""
    if mode != "auto":
        return mode
    return "follow" if spec.is_local_directory or spec.is_object_prefix else "cycle"


def source_factory(cfg: DataConfig, seed: int, kafka: KafkaConfig | None = None) -> partial[Any]:
    """A picklable `make_source(on_reject=…)` for the loader process; builds one here first to validate the spec.

    A partial, so that a Ray worker can read the spec back (`.args[0]`) and take its own share of the shards."""
    spec = source_spec(cfg)
    if spec.kind == "kafka":
        require("kafka", "kafka", "kafka://")  # kafka-python loads only for Kafka runs
        from streamssl.streams.kafka_source import KafkaSource

        kafka = kafka or KafkaConfig()
        make_source: partial[Any] = partial(
            KafkaSource, spec.text, group=kafka.group, client_options=kafka.client_options(),
            session_timeout_ms=kafka.session_timeout_ms, auto_offset_reset=kafka.auto_offset_reset)
        return make_source
    if spec.kind == "embedded":
        log.info("no --data: using the embedded Fashion-MNIST lake (written once, on first use)")
    # A ray+ spec, taken as a URL here, is never read by this source: Ray Data reads it (pipeline/ray/feed.py).
    path = str(default_lake()) if spec.kind == "embedded" else spec.text
    if spec.kind == "lake" and is_object_url(spec.path):
        require("s3fs", "s3", "s3://")  # fsspec's S3 filesystem loads only for s3 lakes
    make_source = partial(WebDatasetSource, path, mode=resolve_mode(spec, cfg.mode),
                          shuffle_buffer=cfg.shuffle_buffer, seed=seed, poll_seconds=cfg.poll_seconds,
                          s3_endpoint=cfg.s3_endpoint, max_record_bytes=cfg.max_record_bytes)
    make_source().close()  # a missing path or bad mode fails now, with a readable SourceError
    return make_source


def dead_letter_topic(cfg: DataConfig, kafka: KafkaConfig, run_dir: Path, rank: int = 0) -> Any:
    """The Kafka dead-letter topic for a Kafka run with `kafka.dead_letter_topic` set, else None: worker `rank`'s,
    forwarding through its outbox in `run_dir` (a broker that is down delays the forwarding, never the run)."""
    spec = source_spec(cfg)
    if not (kafka.dead_letter_topic and spec.kind == "kafka"):
        return None
    from streamssl.streams.kafka_dead_letters import DeadLetterTopic, outbox_path

    return DeadLetterTopic(list(spec.bootstrap), kafka.dead_letter_topic, outbox_path(run_dir, rank),
                           kafka.client_options())


def knn_sets(cfg: EvalConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(bank images, bank labels, test images, test labels): fixed subsets, the same for every run."""
    train_images, train_labels = load_fashion_mnist("train")  # $STREAMSSL_FASHION_MNIST, Debian's, or downloaded
    test_images, test_labels = load_fashion_mnist("test")
    bank_images, bank_labels = subset(train_images, train_labels, cfg.bank_size, seed=0)
    query_images, query_labels = subset(test_images, test_labels, cfg.test_size, seed=1)
    return bank_images, bank_labels, query_images, query_labels

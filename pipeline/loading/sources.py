"""Turns the `data` config into a stream source, and the `eval` config into a labelled kNN set."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor

from streamssl.pipeline.config import DataConfig, EvalConfig, KafkaConfig
from streamssl.pipeline.evaluation.knn import subset
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import default_lake
from streamssl.streams.webdataset_source import WebDatasetSource

log = logging.getLogger(__name__)


def resolve_mode(source: str, mode: str) -> str:
    """`auto`: a directory is a lake that keeps growing (follow); a fixed list or the demo lake cycles."""
    if mode != "auto":
        return mode
    return "follow" if source and "://" not in source and Path(source).is_dir() else "cycle"


def source_factory(cfg: DataConfig, seed: int, kafka: KafkaConfig | None = None) -> Callable[..., Any]:
    """A picklable `make_source(on_reject=…)` for the loader process; builds one here first to validate the spec."""
    if cfg.source.startswith("kafka://"):
        from streamssl.streams.kafka_source import KafkaSource  # kafka-python loads only for Kafka runs

        kafka = kafka or KafkaConfig()
        make_source: Callable[..., Any] = partial(
            KafkaSource, cfg.source, group=kafka.group, client_options=kafka.client_options(),
            session_timeout_ms=kafka.session_timeout_ms, auto_offset_reset=kafka.auto_offset_reset)
        return make_source
    if not cfg.source:
        log.info("no --data: using the embedded Fashion-MNIST lake (written once, on first use)")
    spec = cfg.source or str(default_lake())
    make_source = partial(WebDatasetSource, spec, mode=resolve_mode(cfg.source, cfg.mode),
                          shuffle_buffer=cfg.shuffle_buffer, seed=seed, poll_seconds=cfg.poll_seconds)
    make_source().close()  # a missing path or bad mode fails now, with a readable SourceError
    return make_source


def dead_letter_topic(cfg: DataConfig, kafka: KafkaConfig) -> Any:
    """The Kafka dead-letter topic for a Kafka run with `kafka.dead_letter_topic` set, else None."""
    if not (kafka.dead_letter_topic and cfg.source.startswith("kafka://")):
        return None
    from streamssl.streams.kafka_produce import DeadLetterTopic, parse_kafka_url

    bootstrap, _, _ = parse_kafka_url(cfg.source)
    return DeadLetterTopic(bootstrap, kafka.dead_letter_topic, kafka.client_options())


def knn_sets(cfg: EvalConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(bank images, bank labels, test images, test labels): fixed subsets, the same for every run."""
    train_images, train_labels = load_fashion_mnist("train")  # $STREAMSSL_FASHION_MNIST, Debian's, or downloaded
    test_images, test_labels = load_fashion_mnist("test")
    bank_images, bank_labels = subset(train_images, train_labels, cfg.bank_size, seed=0)
    query_images, query_labels = subset(test_images, test_labels, cfg.test_size, seed=1)
    return bank_images, bank_labels, query_images, query_labels

"""Writing to Kafka: the `kafka://` spec parser, topic creation, a rate-limited producer, and retry backoff.

`streamssl produce` publishes a WebDataset lake to a topic with these (`produce(bootstrap, topic,
lake_records(lake))`); tests and demos use them to fill topics (the dead-letter topic's producer is
streams/kafka_dead_letters.py). Every client is a kafka-python one built with acks="all" and the
caller's `client_options` (security_protocol, sasl_*, ssl_*, client_id, ...) passed through.
"""

from __future__ import annotations

import json
import logging
import random
import re
import socket
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

from streamssl.streams.records import SourceError
from streamssl.streams.webdataset_source import WebDatasetSource

log = logging.getLogger(__name__)

Message = tuple[str, bytes, list[tuple[str, bytes]]]  # key, value, headers

SPEC_PARAMS = ("group",)
# Kafka's own rule for topic names (also what keeps a topic usable as a metric label and a file name).
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")


def kafka_module() -> Any:
    """kafka-python, imported on first use (only Kafka runs pay for it) without its import-time DeprecationWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import kafka  # also loads kafka.admin (NewTopic, the admin client)
    return kafka


def parse_kafka_url(spec: str) -> tuple[list[str], str, dict[str, str]]:
    """Splits `kafka://HOST:PORT[,HOST:PORT...]/TOPIC[?group=G]` into (bootstrap servers, topic, query params).

    Raises:
        SourceError: Not a kafka:// URL, no or malformed HOST:PORT, a bad topic name, or an unknown parameter.
    """
    parts = urlsplit(spec)
    if parts.scheme != "kafka":
        raise SourceError(f"not a Kafka spec (want kafka://HOST:PORT[,HOST:PORT]/TOPIC[?group=G]): {spec}")
    servers = [server.strip() for server in parts.netloc.split(",") if server.strip()]
    if not servers:
        raise SourceError(f"Kafka spec names no HOST:PORT: {spec}")
    for server in servers:
        match = _HOST_PORT.fullmatch(server)
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise SourceError(f"Kafka spec has a malformed HOST:PORT '{server}': {spec}")
    topic = parts.path.removeprefix("/")
    if not _TOPIC.fullmatch(topic) or topic in (".", ".."):
        raise SourceError(f"Kafka spec needs one topic name of letters, digits, '.', '_', '-' after the host: {spec}")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise SourceError(f"Kafka spec has a malformed query: {spec}") from None
    unknown = sorted(set(query) - set(SPEC_PARAMS))
    if unknown or any(len(values) != 1 or not values[0] for values in query.values()):
        raise SourceError(f"Kafka spec parameters must be one non-empty value each of {', '.join(SPEC_PARAMS)}; "
                          f"got {parts.query}")
    if parts.fragment:
        raise SourceError(f"Kafka spec has a fragment ('#{parts.fragment}'): {spec}")
    return servers, topic, {name: values[0] for name, values in query.items()}


def jittered(delay: float) -> float:
    """A backoff `delay` drawn from [delay/2, delay]: clients that failed together don't all retry together."""
    return delay * random.uniform(0.5, 1.0)


def _servers(bootstrap: list[str] | str) -> list[str]:
    return [bootstrap] if isinstance(bootstrap, str) else list(bootstrap)


def check_resolvable(bootstrap: list[str] | str) -> None:
    """Raises SourceError when no bootstrap host name exists: a spec that can never work, unlike a broker that is down.

    kafka-python would retry such a name until its bootstrap timeout (30 s) and then report a timeout.
    """
    servers = _servers(bootstrap)
    for server in servers:
        host = server.rsplit(":", 1)[0].strip("[]")
        try:
            socket.getaddrinfo(host, None)
            return
        except socket.gaierror as err:
            if err.errno not in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                return  # a DNS server that is down or slow: transient, the client will retry
    raise SourceError(f"no Kafka bootstrap host name resolves: {','.join(servers)}")


def _kafka_error(action: str, bootstrap: list[str] | str, err: Exception) -> SourceError:
    """A client failure as one readable line."""
    name = type(err).__name__
    message = (str(err).splitlines() or [""])[0].removeprefix(f"{name}: ")  # kafka-python repeats the class name
    return SourceError(f"{action} at {','.join(_servers(bootstrap))}: {name}: {message[:300]}")


def create_topic(bootstrap: list[str] | str, topic: str, partitions: int = 4,
                 client_options: dict[str, Any] | None = None) -> bool:
    """Creates `topic` with `partitions` partitions and the cluster's default replication; an existing topic is fine.

    Returns:
        True if it was created, False if it already existed.

    Raises:
        SourceError: The broker cannot be reached or refuses (e.g. not authorised).
    """
    check_resolvable(bootstrap)
    kafka = kafka_module()
    try:
        admin = kafka.KafkaAdminClient(bootstrap_servers=bootstrap, **(client_options or {}))
    except kafka.errors.KafkaError as err:
        raise _kafka_error("cannot reach Kafka", bootstrap, err) from None
    try:
        # replication_factor -1: the cluster's default.replication.factor, not a single copy on a real cluster.
        admin.create_topics([kafka.admin.NewTopic(topic, num_partitions=partitions, replication_factor=-1)])
        return True
    except kafka.errors.TopicAlreadyExistsError:
        return False
    except kafka.errors.KafkaError as err:
        raise _kafka_error(f"cannot create topic {topic}", bootstrap, err) from None
    finally:
        admin.close()


class _Acknowledgements:
    """Counts the producer's acknowledgements and failures (callbacks run on kafka-python's I/O thread)."""

    def __init__(self) -> None:
        self.failed = 0
        self.first_error = ""

    def failure(self, err: Exception) -> None:
        self.failed += 1
        if not self.first_error:
            self.first_error = f"{type(err).__name__}: {err}"


def produce(bootstrap: list[str] | str, topic: str, records: Iterable[Message], *, rate: float = 0, limit: int = 0,
            client_options: dict[str, Any] | None = None) -> int:
    """Sends (key, value, headers) messages to `topic`, waits until all are acknowledged, returns how many were sent.

    Args:
        bootstrap: Bootstrap servers, e.g. the first item of `parse_kafka_url(spec)`.
        topic: Topic to write to (create it first: Tansu would auto-create it with 4 partitions).
        records: Messages; the key picks the partition (kafka-python's murmur2 partitioner, as Java's).
        rate: At most this many records per second on average (0: as fast as the producer goes).
        limit: Stop after this many records (0: all of them).
        client_options: Passed to KafkaProducer.

    Raises:
        SourceError: The broker cannot be reached, or some records were not acknowledged (none is lost silently).
    """
    if rate < 0 or limit < 0:
        raise SourceError(f"produce needs rate >= 0 and limit >= 0, got {rate}, {limit}")
    check_resolvable(bootstrap)
    kafka = kafka_module()
    try:
        # Bulk defaults: 256 KiB batches lingering 5 ms sent 3 KB records ~3x faster here than kafka-python's 16 KiB.
        options = {"batch_size": 262144, "linger_ms": 5, **(client_options or {})}
        producer = kafka.KafkaProducer(bootstrap_servers=bootstrap, acks="all", **options)
    except kafka.errors.KafkaError as err:
        raise _kafka_error("cannot reach Kafka", bootstrap, err) from None
    acks = _Acknowledgements()
    sent = 0
    started = time.monotonic()
    try:
        for key, value, headers in records:
            if limit and sent >= limit:
                break
            if rate:
                # Pace against the start time, not the previous send: sleep overshoot does not accumulate.
                wait = started + sent / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            producer.send(topic, key=key.encode(), value=value, headers=list(headers)).add_errback(acks.failure)
            sent += 1
        producer.flush()
    except kafka.errors.KafkaError as err:
        raise _kafka_error(f"producing to {topic} failed after {sent} records", bootstrap, err) from None
    finally:
        producer.close(timeout=10)
    if acks.failed:
        raise SourceError(f"{acks.failed} of {sent} records to {topic} were not acknowledged by "
                          f"{','.join(_servers(bootstrap))}: {acks.first_error.splitlines()[0][:300]}")
    return sent


def _label(fields: dict[str, bytes]) -> bytes | None:
    """A lake record's label as ASCII digits: its json's "label", else its `cls` field."""
    if "json" in fields:
        try:
            label = json.loads(fields["json"]).get("label")
        except (ValueError, AttributeError):
            label = None
        if isinstance(label, int):
            return str(label).encode()
    return fields["cls"].strip() if "cls" in fields else None


def lake_records(path_or_spec: str) -> Iterator[Message]:
    """(key, image bytes, headers) of every record of a WebDataset lake, read once in order.

    The header "label" carries the record's label (json "label" or `cls`) when it has one: labels travel
    beside the image for evaluation, training never reads them. Records without an image are skipped
    with a warning, like unreadable shards.
    """
    for record in WebDatasetSource(path_or_spec, mode="once"):
        image = next((record.fields[name] for name in IMAGE_FIELDS if name in record.fields), None)
        if image is None:
            log.warning("skipped %s %s: no image field (has %s)", record.source, record.key, sorted(record.fields))
            continue
        label = _label(record.fields)
        yield record.key, image, [] if label is None else [("label", label)]

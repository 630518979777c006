"""The kNN monitor's labelled set from the user's own shards (`eval.data`), or Fashion-MNIST when none is given.

`eval.data` is one local directory of WebDataset tar shards, as `streamssl lake` writes them: each record holds an
image (`data.image_field`) and a label (`eval.label_field`). It is split by key hash, not by folder: a record
whose key's `record_id` is divisible by 5 is a query (a fifth of the records), every other record is in the bank.
The split depends on the key alone, so it is the same in every run and process, a record written twice lands on
the same side both times, and records added to a growing lake never move the old ones across. `eval.bank_size` and
`eval.test_size` cap each side at its records with the lowest key hashes: a fixed pseudo-random subset whatever the
order of the shards (a lake written class by class still gives every class its share), found in one pass that holds
at most the capped records. Records are decoded the way training decodes them (pipeline/loading/decode.py); one
that does not decode or has no usable label is skipped and counted, never fatal.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from streamssl.pipeline.config import Config, ConfigError, EvalConfig
from streamssl.pipeline.loading.decode import decode_record, record_id
from streamssl.pipeline.loading.sources import knn_sets
from streamssl.streams.records import Record
from streamssl.streams.tar_shards import list_complete_shards, read_shard

log = logging.getLogger(__name__)

QUERY_SHARE = 5  # one record in this many (by key hash) is a query


def parse_label_field(text: str) -> tuple[str, str]:
    """`json:label` → ("json", "label"): the `label` key of the record's JSON member; `cls` → ("cls", ""): the
    whole text of a plain-text member. ConfigError for an empty member or key."""
    member, _, key = text.partition(":")
    if not member or (":" in text and not key):
        raise ConfigError(f"eval.label_field: expected MEMBER (e.g. cls) or MEMBER:KEY (e.g. json:label), got {text!r}")
    return member, key


def read_label(fields: dict[str, bytes], member: str, key: str) -> str:
    """A record's label as text; raises ValueError('missing_label' / 'bad_label')."""
    if member not in fields:
        raise ValueError("missing_label")
    if not key:
        text = fields[member].decode("utf-8", "replace").strip()
        if not text:
            raise ValueError("bad_label")
        return text
    try:
        document = json.loads(fields[member])
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ValueError("bad_label") from None
    if not isinstance(document, dict) or key not in document:
        raise ValueError("missing_label")
    value = document[key]
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise ValueError("bad_label")
    return str(value)


def _class_order(label: str) -> tuple[int, int, str]:
    """Integer labels in numeric order, before text labels in text order."""
    try:
        return 0, int(label), ""
    except ValueError:
        return 1, 0, label


@dataclass
class EvalShards:
    """A labelled bank and query set read from `eval.data`: uint8 [N,C,H,W] images, class indices into `classes`."""

    bank_images: Tensor
    bank_labels: Tensor
    query_images: Tensor
    query_labels: Tensor
    classes: list[str]
    bank_keys: list[str] = field(default_factory=list)
    query_keys: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason → records (or shards) skipped

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.bank_images, self.bank_labels, self.query_images, self.query_labels


_Kept = tuple[int, int, np.ndarray, str, str]  # (-key hash, arrival, pixels, label, key): a max-heap on the key hash


def _keep(heap: list[_Kept], cap: int, item: _Kept) -> None:
    if cap and len(heap) >= cap:
        heapq.heappushpop(heap, item)
    else:
        heapq.heappush(heap, item)


def read_eval_shards(directory: str, label_field: str, bank_size: int, test_size: int, image_field: str,
                     channels: int, size: int, max_record_bytes: int = 0) -> EvalShards:
    """The bank and queries of a lake directory (see the module docstring); caps of 0 keep every record.

    Raises ConfigError, one line: no such directory, no shards in it, or no usable record on a side (saying
    whether the label field was missing from every record)."""
    member, key = parse_label_field(label_field)
    if not Path(directory).is_dir():
        raise ConfigError(f"eval.data: directory not found: {directory}")
    shards = list_complete_shards(directory)
    if not shards:
        raise ConfigError(f"eval.data: no .tar shards in {directory}")
    skipped: Counter[str] = Counter()
    members_seen: set[str] = set()
    sides: dict[bool, list[_Kept]] = {False: [], True: []}  # is a query → kept records
    caps = {False: bank_size, True: test_size}
    read = 0

    def reject(source: str, key: str, reason: str, detail: str = "", payload: bytes = b"") -> None:
        skipped[reason] += 1

    for shard in shards:
        for sample_key, fields, index in read_shard(shard, 0, reject):
            read += 1
            members_seen.update(fields)
            hashed = record_id(sample_key)
            query = hashed % QUERY_SHARE == 0
            heap, cap = sides[query], caps[query]
            if cap and len(heap) >= cap and hashed >= -heap[0][0]:
                continue  # would not be kept: neither decoded nor judged
            try:
                label = read_label(fields, member, key)
                pixels = decode_record(Record(sample_key, fields, shard, index), image_field, channels, size,
                                       max_record_bytes)
            except ValueError as err:
                skipped[str(err).partition(":")[0]] += 1
                continue
            _keep(heap, cap, (-hashed, read, pixels, label, sample_key))
    if not sides[False] or not sides[True]:
        if not sides[False] and read and skipped["missing_label"] == read:
            raise ConfigError(f"eval.label_field {label_field}: no record in {directory} has it ({read} records read; "
                              f"their members: {', '.join(sorted(members_seen))})")
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items())) or "none skipped"
        raise ConfigError(f"eval.data {directory}: no usable {'query' if sides[False] else 'bank'} record "
                          f"({read} records read; {reasons}); a fifth of the records (by key hash) are queries")
    classes = sorted({item[3] for heap in sides.values() for item in heap}, key=_class_order)
    index_of = {label: number for number, label in enumerate(classes)}

    def stacked(heap: list[_Kept]) -> tuple[Tensor, Tensor, list[str]]:
        ordered = sorted(heap, reverse=True)  # lowest key hash first: the same order in every run
        images = torch.from_numpy(np.stack([item[2] for item in ordered]))
        labels = torch.tensor([index_of[item[3]] for item in ordered], dtype=torch.int64)
        return images, labels, [item[4] for item in ordered]

    bank_images, bank_labels, bank_keys = stacked(sides[False])
    query_images, query_labels, query_keys = stacked(sides[True])
    result = EvalShards(bank_images, bank_labels, query_images, query_labels, classes, bank_keys, query_keys,
                        dict(skipped))
    log.info("eval.data %s: %d bank + %d query records, %d classes (%d read; skipped: %s)", directory,
             len(bank_labels), len(query_labels), len(classes), read,
             ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items())) or "none")
    return result


def labelled_sets(cfg: Config) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kNN monitor's (bank images, bank labels, query images, query labels): `eval.data`'s, decoded with the
    run's `data` settings, else Fashion-MNIST's fixed subsets."""
    if not cfg.eval.data:
        return knn_sets(cfg.eval)
    return shards_of(cfg.eval, cfg.data.image_field, cfg.data.channels, cfg.data.size,
                     cfg.data.max_record_bytes).tensors()


def shards_of(cfg: EvalConfig, image_field: str, channels: int, size: int, max_record_bytes: int = 0) -> EvalShards:
    """`read_eval_shards` of the `eval` section's directory, label field and caps."""
    return read_eval_shards(cfg.data, cfg.label_field, cfg.bank_size, cfg.test_size, image_field, channels, size,
                            max_record_bytes)


def sets_digest(tensors: tuple[Tensor, ...]) -> str:
    """A short digest of a labelled set's contents: cached baselines of another set's are not reused."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()

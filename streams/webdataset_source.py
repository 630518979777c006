"""A WebDataset shard stream with a resumable position: cycle over a lake, read it once, or follow it.

webdataset has no mid-epoch resume of its own, so this source keeps its position itself: the pass
number and that pass's shard order, the shard being read and how many of its samples were taken,
and the records waiting in the shuffle buffer with the buffer's RNG state. `state_dict()` is that
position after the last record yielded; a new source given it continues with exactly the records a
run that never stopped would have seen. Opening shards and splitting tar members into samples is
webdataset's (`gopen`, `tar_file_expander`, `group_by_keys`); judging whether a shard ended whole
is done here, because tarfile's stream mode does not tell.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import random
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from braceexpand import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from streamssl.streams.records import Record, RejectFn, SourceError

MODES = ("cycle", "once", "follow")
log = logging.getLogger(__name__)

# A record as plain data, (key, fields, source, index): the shuffle buffer holds these because it is
# saved in checkpoints, and plain tuples make `state_dict()` a list copy instead of a conversion.
_Item = tuple[str, dict[str, bytes], str, int]

# What a damaged, vanished or unreachable shard raises while it is read; anything else is a bug.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
# Streams tarfile decompresses itself (gzip, bzip2, xz): their tail is compressed data, not zero blocks.
_COMPRESSED_MAGIC = (b"\x1f\x8b\x08", b"BZh", b"\x5d\x00\x00\x80", b"\xfd7zXZ")
_BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class ShardPosition:
    """Where a `WebDatasetSource` is, right after the last record it yielded; plain data all through, so a
    checkpoint holding `to_dict()` loads with weights_only.

    Fields: mode; cycle (pass number); order (this pass's shard order, empty in follow mode); shard_index
    (index in order; follow: shards started before the current one); shard (path of the shard being read,
    None before the first); sample_index (samples taken from that shard); buffer (the shuffle buffer's
    records); rng (the buffer RNG's `getstate()`). Shallow: records and the order are shared, never copied.
    """

    mode: str
    cycle: int = 0
    order: tuple[str, ...] = ()
    shard_index: int = 0
    shard: str | None = None
    sample_index: int = 0
    buffer: tuple[_Item, ...] = ()
    rng: tuple[Any, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "cycle": self.cycle, "order": self.order, "shard_index": self.shard_index,
                "shard": self.shard, "sample_index": self.sample_index, "buffer": list(self.buffer), "rng": self.rng}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ShardPosition:
        try:
            version, internal, gauss = state["rng"]
            return cls(str(state["mode"]), int(state["cycle"]), tuple(state["order"]), int(state["shard_index"]),
                       state["shard"], int(state["sample_index"]), tuple(tuple(item) for item in state["buffer"]),
                       (version, tuple(internal), gauss))
        except (KeyError, TypeError, ValueError) as err:
            raise SourceError(f"saved stream position is not a WebDatasetSource position: {err!r}") from None


def list_complete_shards(directory: str) -> list[str]:
    """Paths of a lake directory's shards in name order.

    A writer publishes a shard by renaming it to `*.tar`, so temp names (`x.tar.tmp`, `.x.tar`) are not
    shards yet. A missing directory lists as empty so that follow mode keeps polling while a lake is
    being recreated or remounted.
    """
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if e.name.endswith(".tar") and not e.name.startswith(".") and e.is_file()]
    except FileNotFoundError:
        return []
    return [os.path.join(directory, name) for name in sorted(names)]


def _local_path(url: str) -> str | None:
    """The file system path of a local spec (plain path or `file:`), None for http:, pipe: and the like."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return url if parsed.scheme == "" else None


class _ArchiveReader:
    """Passes a shard stream's reads through to tarfile, keeping its first and last block.

    tarfile's stream mode ends quietly when a member header is missing or cut short, so a shard cut
    at a header looks complete to it. A whole archive ends with zero blocks and is padded with zeros
    to a whole record, which is what `ended_cleanly` checks once tarfile has stopped.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._head = b""
        self._tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if len(self._head) < _BLOCK:
            self._head += data[: _BLOCK - len(self._head)]
        self._tail = data[-_BLOCK:] if len(data) >= _BLOCK else (self._tail + data)[-_BLOCK:]
        return data

    def starts_like_tar(self) -> bool:
        """Whether the first block is a valid tar header: a damaged tar rather than something else."""
        try:
            tarfile.TarInfo.frombuf(self._head, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            return False
        return True

    def ended_cleanly(self) -> bool:
        """After tarfile stopped: whether the stream ends in zero blocks with only zeros past that point."""
        if self._head.startswith(_COMPRESSED_MAGIC):
            return True  # decompressed inside tarfile, out of our sight: its own errors are all we get
        while chunk := self.read(1 << 16):
            if chunk.strip(b"\x00"):  # data after where tarfile stopped: a damaged header, not the end
                return False
        return self._tail == bytes(_BLOCK)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a pipe: command's exit status; the data is already judged
            self._stream.close()


def read_shard(shard: str, skip: int, reject: Callable[[str, str, str], None]) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """(key, fields, index) of a shard's complete samples from index `skip` on.

    A shard that cannot be read whole is reported once through `reject` after its complete samples:
    "shard_vanished" (gone before it was opened), "unreadable_shard" (not a tar at all, or a malformed
    one) or "truncated_shard" (ends early; the key given is the last complete sample's, or "").
    """
    try:
        stream = _ArchiveReader(gopen(shard))
    except FileNotFoundError:
        reject(shard, "", "shard_vanished")
        return
    except (OSError, ValueError):  # ValueError: gopen has no handler for the URL's scheme
        reject(shard, "", "unreadable_shard")
        return
    held: tuple[str, dict[str, bytes]] | None = None  # newest sample: whole only once the next one begins
    index, last_key, damage = 0, "", ""
    try:
        for sample in group_by_keys(tar_file_expander([{"url": shard, "stream": stream}], eof_value=None)):
            if held is not None:
                if index >= skip:
                    yield held[0], held[1], index
                index, last_key = index + 1, held[0]
            held = (sample["__key__"], {name: data for name, data in sample.items() if not name.startswith("__")})
        if not stream.ended_cleanly():
            held, damage = None, "truncated_shard"  # the newest sample may be missing files: drop it
    except ValueError:  # group_by_keys: two files with the same extension in one sample
        damage = "unreadable_shard"
    except _READ_ERRORS:
        # Raised before group_by_keys hands over its sample in progress, so `held` had a successor: whole.
        damage = "truncated_shard"
    finally:
        stream.close()
    if held is not None:
        if index >= skip:
            yield held[0], held[1], index
        last_key = held[0]
    if damage == "truncated_shard" and not last_key and not stream.starts_like_tar():
        damage = "unreadable_shard"
    if damage:
        reject(shard, last_key, damage)


class WebDatasetSource:
    """Yields `Record`s from tar shards and knows its position.

    Args:
        spec: A directory of shards (`*.tar`, name order), a brace pattern
            (`lake/shard-{000000..000099}.tar`) or a URL / `pipe:` command that webdataset's gopen opens.
        mode: "cycle" (endless passes, shard order reshuffled each pass from (seed, pass); a directory
            is re-listed at the start of every pass), "once" (one pass in name / pattern order) or
            "follow" (a directory read in name order, then polled for shards that land later).
        shuffle_buffer: Records held back and handed out in seeded random order, across shards;
            0 keeps stream order.
        seed: Seeds every pass's shard order and the shuffle buffer.
        poll_seconds: Follow mode's wait between directory listings when nothing new is there.
        on_reject: Called with (shard, key, reason) for input that is skipped; logged when None.

    Raises:
        SourceError: A bad mode or setting, a missing data path, or follow mode without a directory.

    One consumer at a time: iterate in one thread; `state_dict`, `stats` and `close` may be called
    from others (`close` makes a waiting follow iteration return promptly).
    """

    def __init__(self, spec: str, *, mode: str = "cycle", shuffle_buffer: int = 0, seed: int = 0,
                 poll_seconds: float = 2.0, on_reject: RejectFn | None = None) -> None:
        if mode not in MODES:
            raise SourceError(f"unknown data mode '{mode}'; valid: {', '.join(MODES)}")
        if shuffle_buffer < 0 or poll_seconds <= 0:
            raise SourceError(f"need shuffle_buffer >= 0 and poll_seconds > 0, got {shuffle_buffer}, {poll_seconds}")
        self._spec = spec
        self._mode = mode
        self._shuffle_buffer = shuffle_buffer
        self._seed = seed
        self._poll_seconds = poll_seconds
        self._on_reject = on_reject
        self._directory, self._urls = self._resolve(spec)
        if mode == "follow" and self._directory is None:
            raise SourceError(f"follow mode needs a local directory of shards, got {spec}")
        self._closed = threading.Event()
        # follow: shard names listed so far, to tell a late shard named before the position (None until
        # the first listing, which takes everything up to the position as already read).
        self._known: set[str] | None = None
        self._listing: list[str] = []  # follow: names of the latest listing, for stats()
        # The position; see ShardPosition.
        self._cycle = 0
        self._order: tuple[str, ...] = () if mode == "follow" else self._pass_order(0)
        self._shard_index = 0
        self._shard: str | None = None
        self._sample_index = 0
        self._buffer: list[_Item] = []
        self._rng = random.Random(f"shuffle-buffer:{seed}")

    @staticmethod
    def _resolve(spec: str) -> tuple[str | None, list[str]]:
        """(directory, None) for a local directory, else (None, the pattern's expansion)."""
        local = _local_path(spec)
        if local is not None and os.path.isdir(local):
            return local, []
        urls = list(braceexpand(spec))
        local_paths = [path for path in map(_local_path, urls) if path]
        if len(local_paths) == len(urls) and not any(os.path.isfile(path) for path in local_paths):  # all local
            raise SourceError(f"data path not found: {spec}")
        return None, urls

    # --- position --------------------------------------------------------------------------------
    def position(self) -> ShardPosition:
        """The position after the last record yielded (taken every batch: a list copy, no record copied)."""
        return ShardPosition(self._mode, self._cycle, self._order, self._shard_index, self._shard, self._sample_index,
                             tuple(self._buffer), self._rng.getstate())

    def state_dict(self) -> dict[str, Any]:
        """`position()` as plain data (see `ShardPosition`)."""
        return self.position().to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the position `state` describes; an empty dict (no batch taken yet) is a no-op."""
        if not state:
            return
        if state.get("mode") != self._mode:
            raise SourceError(f"saved stream position is from data mode '{state.get('mode')}', not '{self._mode}'")
        position = ShardPosition.from_dict(state)
        self._rng.setstate(position.rng)
        self._cycle, self._order = position.cycle, position.order
        self._shard_index, self._shard, self._sample_index = position.shard_index, position.shard, position.sample_index
        self._buffer = list(position.buffer)
        self._known = None

    def stats(self) -> dict[str, float]:
        """Position and lag gauges: cycle, shard_index, sample_index, shards_pending, shuffle_buffer (fill)."""
        if self._mode == "follow":
            names = self._listing
            current = os.path.basename(self._shard) if self._shard is not None else None
            pending = len(names) - (bisect.bisect_right(names, current) if current is not None else 0)
        else:
            pending = max(len(self._order) - self._shard_index - 1, 0)
        return {"cycle": float(self._cycle), "shard_index": float(self._shard_index),
                "sample_index": float(self._sample_index), "shards_pending": float(pending),
                "shuffle_buffer": float(len(self._buffer))}

    def close(self) -> None:
        """Ends iteration at the next record, and a follow-mode wait for new shards at once."""
        self._closed.set()

    # --- reading ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Record]:
        """Records from the current position on (the shard being read is re-opened and skipped into)."""
        items = self._follow() if self._mode == "follow" else self._passes()
        for item in items:
            if item is None:  # no more input for now: hand out what the buffer holds instead of sitting on it
                while self._buffer and not self._closed.is_set():
                    yield self._pop()
                continue
            self._buffer.append(item)
            while len(self._buffer) > self._shuffle_buffer:
                yield self._pop()

    def _pop(self) -> Record:
        """A uniformly random buffered record (swap it with the last, then pop: O(1))."""
        last = len(self._buffer) - 1
        pick = self._rng.randrange(last + 1) if last else 0  # shuffle_buffer=0: stream order, RNG untouched
        self._buffer[pick], self._buffer[last] = self._buffer[last], self._buffer[pick]
        return Record(*self._buffer.pop())

    def _reject(self, source: str, key: str, reason: str) -> None:
        if self._on_reject is not None:
            self._on_reject(source, key, reason)
        else:
            log.warning("skipped %s (last good key %r): %s", source, key, reason)

    def _pass_order(self, cycle: int) -> tuple[str, ...]:
        shards = list_complete_shards(self._directory) if self._directory is not None else list(self._urls)
        if self._mode == "cycle":
            random.Random(f"shard-order:{self._seed}:{cycle}").shuffle(shards)
        return tuple(shards)

    def _shard_items(self, shard: str) -> Iterator[_Item]:
        """The shard's samples from the position's sample index on, advancing it as they are taken."""
        for key, fields, index in read_shard(shard, self._sample_index, self._reject):
            self._sample_index = index + 1
            yield key, fields, shard, index
            if self._closed.is_set():
                return

    def _passes(self) -> Iterator[_Item | None]:
        """cycle / once: passes over the shard order from the position on; None when "once" is done."""
        while True:
            whole_pass = self._shard_index == 0 and self._sample_index == 0
            taken = 0
            while self._shard_index < len(self._order):
                self._shard = self._order[self._shard_index]
                for item in self._shard_items(self._shard):
                    taken += 1
                    yield item
                if self._closed.is_set():
                    return
                self._shard_index, self._sample_index = self._shard_index + 1, 0
            if self._mode == "once":
                yield None
                return
            if whole_pass and taken == 0:  # every pass would be the same: fail instead of spinning
                raise SourceError(f"no readable samples in {self._spec}")
            self._cycle += 1
            self._order = self._pass_order(self._cycle)
            self._shard_index, self._sample_index = 0, 0

    def _follow(self) -> Iterator[_Item | None]:
        """follow: the rest of the current shard, then newer shards in name order; None while waiting."""
        if self._shard is not None:
            yield from self._shard_items(self._shard)
        while not self._closed.is_set():
            newer = self._relist()
            if not newer:
                yield None
                self._closed.wait(self._poll_seconds)
                continue
            if self._shard is not None:
                self._shard_index += 1
            self._shard, self._sample_index = newer[0], 0
            yield from self._shard_items(self._shard)

    def _relist(self) -> list[str]:
        """Lists the lake; reports new shards named at or before the position; returns the ones after it."""
        assert self._directory is not None
        paths = list_complete_shards(self._directory)
        current = os.path.basename(self._shard) if self._shard is not None else None
        baseline = self._known is None
        known = self._known if self._known is not None else set()
        for path in paths:
            name = os.path.basename(path)
            if name in known:
                continue
            known.add(name)
            # Name order is the read order, so a shard that sorts before the position can't be placed.
            if not baseline and current is not None and name <= current:
                self._reject(path, "", "out_of_order_shard")
        self._known = known
        self._listing = [os.path.basename(path) for path in paths]
        return [path for path in paths if current is None or os.path.basename(path) > current]

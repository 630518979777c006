"""A WebDataset shard stream with a resumable position: cycle over a lake, read it once, or follow it.

webdataset has no mid-epoch resume of its own, so this source keeps its position itself: the pass
number and that pass's shard order, the shard being read and how many of its samples were taken,
and the records waiting in the shuffle buffer with the buffer's RNG state. `state_dict()` is that
position after the last record yielded; a new source given it continues with exactly the records a
run that never stopped would have seen. In follow mode the position also holds the names of the
shards finished so far (streams/shard_names.py), so that a shard landing late under an earlier name,
while the run goes on or while it is down, is read instead of lost. Reading one shard is
streams/tar_shards.py's.

A saved position is not trusted to say what is opened: a resumed one may name only shards of the
current spec (its directory's, or its own URLs), so a tampered checkpoint cannot make gopen run a
`pipe:` command, and a run dir given another lake says so instead of mixing the two.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from braceexpand import braceexpand
from webdataset.gopen import gopen

from streamssl.streams.object_store import ObjectStore, ObjectStoreError, is_object_prefix, is_object_url
from streamssl.streams.records import Record, RejectFn, SourceError
from streamssl.streams.shard_names import Entry, ShardNames
from streamssl.streams.tar_shards import is_shard_name, list_complete_shards, local_path, read_samples
from streamssl.streams.waiting import WaitingNotice

MODES = ("cycle", "once", "follow")
log = logging.getLogger(__name__)

# A record as plain data, (key, fields, source, index): the shuffle buffer holds these because it is
# saved in checkpoints, and plain tuples make `state_dict()` a list copy instead of a conversion.
_Item = tuple[str, dict[str, bytes], str, int]


@dataclass(frozen=True)
class ShardPosition:
    """Where a `WebDatasetSource` is, right after the last record it yielded; plain data all through, so a
    checkpoint holding `to_dict()` loads with weights_only.

    Fields: mode; cycle (pass number); order (this pass's shard order, empty in follow mode); shard_index
    (index in order; follow: shards started before the current one); shard (path of the shard being read,
    None before the first); sample_index (samples taken from that shard); buffer (the shuffle buffer's
    records); rng (the buffer RNG's `getstate()`); finished (follow: `ShardNames.entries()` of the shards read to
    the end or rejected; None in the other modes, and in follow positions saved before it existed, which took
    every shard named before `shard` as read). Shallow: records, order and names are shared, never copied.
    """

    mode: str
    cycle: int = 0
    order: tuple[str, ...] = ()
    shard_index: int = 0
    shard: str | None = None
    sample_index: int = 0
    buffer: tuple[_Item, ...] = ()
    rng: tuple[Any, ...] = ()
    finished: tuple[Entry, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        state = {"mode": self.mode, "cycle": self.cycle, "order": self.order, "shard_index": self.shard_index,
                 "shard": self.shard, "sample_index": self.sample_index, "buffer": list(self.buffer), "rng": self.rng}
        return state if self.finished is None else {**state, "finished": self.finished}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ShardPosition:
        try:
            version, internal, gauss = state["rng"]
            order, shard, finished = tuple(state["order"]), state["shard"], state.get("finished")
            if not all(isinstance(path, str) for path in (*order, *([shard] if shard is not None else []))):
                raise TypeError("shard paths must be strings")
            if finished is not None:
                finished = ShardNames((str(a), str(b), str(c), str(d)) for a, b, c, d in finished).entries()
            return cls(str(state["mode"]), int(state["cycle"]), order, int(state["shard_index"]), shard,
                       int(state["sample_index"]), tuple(tuple(item) for item in state["buffer"]),
                       (version, tuple(internal), gauss), finished)
        except (KeyError, TypeError, ValueError) as err:
            raise SourceError(f"saved stream position is not a WebDatasetSource position: {err!r}") from None


class WebDatasetSource:
    """Yields `Record`s from tar shards and knows its position.

    Args:
        spec: A directory of shards (`*.tar`, name order), a brace pattern
            (`lake/shard-{000000..000099}.tar`), an object-storage prefix listed like a directory
            (`s3://bucket/prefix/`, streams/object_store.py) or a URL / `pipe:` command that webdataset's gopen opens.
        mode: "cycle" (endless passes, shard order reshuffled each pass from (seed, pass); a directory
            is re-listed at the start of every pass), "once" (one pass in name / pattern order) or
            "follow" (a directory or s3 prefix read in name order, then polled for shards that land later).
        shuffle_buffer: Records held back and handed out in seeded random order, across shards;
            0 keeps stream order.
        seed: Seeds every pass's shard order and the shuffle buffer.
        poll_seconds: Follow mode's wait between directory listings when nothing new is there.
        on_reject: Called with (shard, key, reason, detail) for input that is skipped; logged when None.
        s3_endpoint: The endpoint URL for s3:// specs ("" = the AWS chain's: `AWS_ENDPOINT_URL` or AWS itself).
        max_record_bytes: A sample with a tar member bigger than this is rejected ("oversized_record") unread; 0 = no limit.

    Raises:
        SourceError: A bad mode or setting, a missing data path, an s3 prefix that cannot be listed (no such
            bucket, no credentials, no endpoint), or follow mode without a directory;
            from `load_state_dict`, a saved position that names shards this spec does not.

    Follow mode reads every shard that lands, in name order of what is not read yet: a shard landing late under
    an earlier name is read next (no shard is dropped for its name). A directory entry that cannot be opened (a
    symlink loop, no permission) is rejected as "unreadable_shard" with the error as detail.

    One consumer at a time: iterate in one thread; `state_dict`, `stats` and `close` may be called
    from others (`close` makes a waiting follow iteration return promptly).
    """

    def __init__(self, spec: str, *, mode: str = "cycle", shuffle_buffer: int = 0, seed: int = 0,
                 poll_seconds: float = 2.0, on_reject: RejectFn | None = None, s3_endpoint: str = "",
                 max_record_bytes: int = 0) -> None:
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
        # A pattern's first URL says where it lives: a worker's share of an s3 prefix is "{s3://…,s3://…}".
        self._store = ObjectStore(s3_endpoint) if is_object_url(next(iter(braceexpand(spec)), spec)) else None
        self._listed: list[str] = []  # an s3 prefix's last listing: what a failed re-listing falls back to
        self._store_down = False  # an s3 prefix's listing failing: warned once per outage, not every poll
        self._max_record_bytes = max_record_bytes
        self._directory, self._urls = self._resolve(spec)
        if mode == "follow" and self._directory is None:
            raise SourceError(f"follow mode needs a local directory of shards, got {spec}")
        self._closed = threading.Event()
        self._waiting = WaitingNotice("shards", self._directory or spec)
        self._waiting_shards = 0  # follow: listed shards not read yet besides the current one, for stats()
        # The position; see ShardPosition. follow: `_finished` is kept as a set and as its entries, for positions.
        self._cycle = 0
        self._order: tuple[str, ...] = () if mode == "follow" else self._pass_order(0)
        self._shard_index = 0
        self._shard: str | None = None
        self._sample_index = 0
        self._buffer: list[_Item] = []
        self._rng = random.Random(f"shuffle-buffer:{seed}")
        self._finished = ShardNames()
        self._finished_entries: tuple[Entry, ...] = ()

    def _resolve(self, spec: str) -> tuple[str | None, list[str]]:
        """(directory, []) for a local directory or an s3 prefix (listed now: one that cannot be is a SourceError),
        else (None, the pattern's expansion)."""
        if is_object_prefix(spec):
            assert self._store is not None
            prefix = spec.rstrip("/")
            try:
                self._listed = self._object_shards(prefix)
            except ObjectStoreError as err:
                raise SourceError(f"cannot list {spec} ({err.reason})") from None
            return prefix, []
        local = local_path(spec)
        if local is not None and os.path.isdir(local):
            return local, []
        urls = list(braceexpand(spec))
        local_paths = [path for path in map(local_path, urls) if path]
        if len(local_paths) == len(urls) and not any(os.path.isfile(path) for path in local_paths):  # all local
            raise SourceError(f"data path not found: {spec}")
        return None, urls

    # --- position --------------------------------------------------------------------------------
    def position(self) -> ShardPosition:
        """The position after the last record yielded (taken every batch: a list copy, no record copied)."""
        return ShardPosition(self._mode, self._cycle, self._order, self._shard_index, self._shard, self._sample_index,
                             tuple(self._buffer), self._rng.getstate(),
                             self._finished_entries if self._mode == "follow" else None)

    def state_dict(self) -> dict[str, Any]:
        """`position()` as plain data (see `ShardPosition`)."""
        return self.position().to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the position `state` describes; an empty dict (no batch taken yet) is a no-op.

        Raises SourceError for a position of another mode, or one naming a shard this spec does not name.
        """
        if not state:
            return
        if state.get("mode") != self._mode:
            raise SourceError(f"saved stream position is from data mode '{state.get('mode')}', not '{self._mode}'")
        position = ShardPosition.from_dict(state)
        self._rng.setstate(position.rng)
        own = self._own_shard
        self._cycle, self._order = position.cycle, tuple(map(own, position.order))
        self._shard = None if position.shard is None else own(position.shard)
        self._shard_index, self._sample_index = position.shard_index, position.sample_index
        self._buffer = list(position.buffer)
        if self._mode == "follow":
            self._finished = ShardNames(position.finished or ())
            if position.finished is None and self._shard is not None:  # saved before the set: as it was read then
                current = os.path.basename(self._shard)
                for name in map(os.path.basename, self._unread()):
                    if name < current:
                        self._finished.add(name)
            self._finished_entries = self._finished.entries()

    def _own_shard(self, shard: str) -> str:
        """A saved shard as this spec names it; SourceError unless it is one of the spec's URLs or a shard file (no
        scheme, a shard's name) in the spec's directory or beside one of its files. A checkpoint must not choose what
        gopen opens (a `pipe:` entry runs a shell command), and another lake's shards mean `--data` changed under the
        same run dir. Beside: a worker of a group is given a list of a directory's (or prefix's) shards, which shifts
        as it grows. An s3 prefix owns exactly the shard objects directly under it (another bucket or prefix is another
        lake), a list of s3 objects the shard objects beside them."""
        if shard in self._own_urls:
            return shard
        folder, name = os.path.split(shard)
        if self._store is not None:
            prefixes = {self._directory} if self._directory is not None else {os.path.dirname(url) for url in self._urls}
            if folder in prefixes and is_shard_name(name):
                return shard
        elif local_path(shard) == shard and is_shard_name(name) and os.path.realpath(folder) in self._own_folders:
            return shard if self._directory is None else os.path.join(self._directory, name)
        raise SourceError(f"the run dir's stream position names shard {shard!r}, which --data {self._spec} does not; "
                          "resume with the data the run started on, or use a new --run-dir")

    @functools.cached_property
    def _own_urls(self) -> frozenset[str]:
        return frozenset(self._urls)

    @functools.cached_property
    def _own_folders(self) -> frozenset[str]:
        """The real paths of the spec's directory, or of the folders its local files are in."""
        folders = [self._directory] if self._directory is not None else [
            os.path.dirname(url) for url in self._urls if local_path(url) == url]
        return frozenset(map(os.path.realpath, set(folders)))

    def stats(self) -> dict[str, float]:
        """Position and lag gauges: cycle, shard_index, sample_index, shards_pending, shuffle_buffer (fill)."""
        pending = self._waiting_shards if self._mode == "follow" else max(len(self._order) - self._shard_index - 1, 0)
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

    def _reject(self, source: str, key: str, reason: str, detail: str = "", payload: bytes = b"") -> None:
        if self._on_reject is not None:
            self._on_reject(source, key, reason, detail)
        else:
            log.warning("skipped %s (last good key %r): %s %s", source, key, reason, detail)

    def _list(self) -> list[str]:
        """The lake directory's or s3 prefix's shards in name order (a local directory: as fast as before)."""
        assert self._directory is not None
        if self._store is None:
            return list_complete_shards(self._directory)
        try:
            self._listed = self._object_shards(self._directory)
        except ObjectStoreError as err:  # a store that is down for a while: keep reading what was listed
            if not self._store_down:
                log.warning("%s; using the previous listing (%d shards) until it answers", err, len(self._listed))
            self._store_down = True
        else:
            if self._store_down:
                log.info("%s answers again", self._spec)
            self._store_down = False
        return list(self._listed)

    def _object_shards(self, prefix: str) -> list[str]:
        assert self._store is not None
        return [f"{prefix}/{name}" for name in self._store.list_names(prefix) if is_shard_name(name)]

    def _pass_order(self, cycle: int) -> tuple[str, ...]:
        shards = self._list() if self._directory is not None else list(self._urls)
        if self._mode == "cycle":
            random.Random(f"shard-order:{self._seed}:{cycle}").shuffle(shards)
        return tuple(shards)

    def _shard_items(self, shard: str) -> Iterator[_Item]:
        """The shard's samples from the position's sample index on, advancing it as they are taken."""
        opener = self._store.open if self._store is not None else gopen
        for key, fields, index in read_samples(shard, self._sample_index, self._reject, self._max_record_bytes, opener):
            self._sample_index = index + 1
            if fields is None:  # over max_record_bytes, never read: dead-lettered by read_samples at the next sample
                continue
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
        """follow: the rest of the current shard, then the shards not read yet in name order; None while waiting."""
        while not self._closed.is_set():
            if self._shard is not None and os.path.basename(self._shard) not in self._finished:
                yield from self._shard_items(self._shard)
                if self._closed.is_set():  # stopped inside the shard: its position says where
                    return
                self._finished.add(os.path.basename(self._shard))
                self._finished_entries = self._finished.entries()
            unread = self._unread()
            self._waiting_shards = max(len(unread) - 1, 0)
            if not unread:
                yield None
                self._waiting.dry()
                self._closed.wait(self._poll_seconds)
                continue
            self._waiting.found()
            if self._shard is not None:
                self._shard_index += 1
            self._shard, self._sample_index = unread[0], 0

    def _unread(self) -> list[str]:
        """The lake's shards that are not finished, in name order."""
        return [path for path in self._list() if os.path.basename(path) not in self._finished]

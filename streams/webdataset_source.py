"""A WebDataset shard stream with a resumable position: cycle over a lake, read it once, or follow it.

webdataset has no mid-epoch resume of its own, so this source tracks its position itself: the
pass number, which shard of the pass it is in, how many samples of that shard it has taken, and
the records waiting in the shuffle buffer with the buffer's RNG state. `state_dict()` is that
position after the last record yielded; a new source given it continues with exactly the records
a run that never stopped would have seen. Opening shards and splitting tar members into samples
is webdataset's (`gopen`, `tar_file_iterator`, `group_by_keys`).
"""

from __future__ import annotations

import random
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from braceexpand import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from streamssl.streams.records import Record, RejectFn, SourceError

MODES = ("cycle", "once", "follow")
_IDLE = object()  # follow mode: nothing new on disk right now


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith(("pipe:", "file:"))


def list_complete_shards(directory: Path) -> list[str]:
    """Complete shards of a lake directory in name order; a writer publishes one by renaming it to *.tar."""
    return sorted(str(p) for p in directory.glob("*.tar") if not p.name.startswith(".") and p.is_file())


class _TailTracker:
    """A read-only file wrapper remembering the last bytes read, to check for the end-of-archive marker."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.bytes_read = 0
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        if data:
            self.bytes_read += len(data)
            self.tail = (self.tail + data)[-tarfile.BLOCKSIZE:]
        return data

    def ended_cleanly(self) -> bool:
        # A complete tar ends with zero blocks (and writers pad to a whole record), so the last block
        # tarfile read is all zeros; a file cut inside a member or header ends with data.
        return self.bytes_read > 0 and self.tail == bytes(len(self.tail))

    def close(self) -> None:
        self.handle.close()


class WebDatasetSource:
    """Yields `Record`s from tar shards and knows its position.

    Args:
        spec: a directory of shards, a brace pattern (`lake/shard-{000000..000099}.tar`) or a URL / `pipe:`
            command that webdataset's gopen opens.
        mode: "cycle" (endless passes, shard order reshuffled each pass), "once" (one pass in the given
            order) or "follow" (a directory read in name order, then polled for shards that land later).
        shuffle_buffer: records mixed across shards by a seeded buffer; 0 keeps stream order.
        seed: seeds the shard order of every pass and the shuffle buffer.
        poll_seconds: follow mode's wait between directory listings.
        on_reject: called with (shard, key, reason) for shards that cannot be read.
    """

    def __init__(self, spec: str, *, mode: str = "cycle", shuffle_buffer: int = 0, seed: int = 0,
                 poll_seconds: float = 2.0, on_reject: RejectFn | None = None) -> None:
        if mode not in MODES:
            raise SourceError(f"unknown data mode '{mode}'; valid: {', '.join(MODES)}")
        self.spec = spec
        self.mode = mode
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.poll_seconds = poll_seconds
        self.on_reject = on_reject or (lambda source, key, reason: None)
        self.directory = Path(spec) if not _is_url(spec) and Path(spec).is_dir() else None
        if mode == "follow" and self.directory is None:
            raise SourceError(f"follow mode needs a directory of shards, got {spec}")
        self.shards = self._list_fixed_shards() if self.directory is None else []
        self._closed = threading.Event()
        self._seen: set[str] | None = None  # follow: shard names already read or reported
        # The position (see state_dict).
        self._cycle = 0
        self._slot = 0  # index of the current shard in this pass's order (cycle / once)
        self._shard = ""  # follow: name of the shard being read, or the last one finished
        self._sample = 0  # samples taken from the current shard
        self._buffer: list[Record] = []
        self._rng = random.Random(seed)

    def _list_fixed_shards(self) -> list[str]:
        if _is_url(self.spec):
            return list(braceexpand(self.spec))
        shards = list(braceexpand(self.spec))
        if not any(Path(s).is_file() for s in shards):
            raise SourceError(f"data path not found: {self.spec}")
        return shards

    # --- position --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "cycle": self._cycle, "slot": self._slot, "shard": self._shard,
            "sample": self._sample, "rng": self._rng.getstate(),
            "buffer": [(r.key, r.fields, r.source, r.index) for r in self._buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a checkpoint taken before any batch
            return
        if state["mode"] != self.mode:
            raise SourceError(f"checkpoint was taken in data mode '{state['mode']}', not '{self.mode}'")
        self._cycle, self._slot, self._shard, self._sample = state["cycle"], state["slot"], state["shard"], state["sample"]
        self._rng.setstate(state["rng"])
        self._buffer = [Record(key, dict(fields), source, index) for key, fields, source, index in state["buffer"]]

    def stats(self) -> dict[str, float]:
        if self.directory is not None and self.mode == "follow":
            names = list_complete_shards(self.directory)
            pending = sum(1 for name in names if name > self._shard)
            index = float(len(names) - pending)
        else:
            pending = len(self._order(self._cycle)) - self._slot - 1
            index = float(self._slot)
        return {"cycle": float(self._cycle), "shard_index": index, "sample_index": float(self._sample),
                "shards_pending": float(max(pending, 0)), "shuffle_buffer": float(len(self._buffer))}

    def close(self) -> None:
        """Makes a follow-mode iteration waiting for new shards return promptly."""
        self._closed.set()

    # --- reading ---------------------------------------------------------------------------------
    def _order(self, cycle: int) -> list[str]:
        shards = list_complete_shards(self.directory) if self.directory is not None else list(self.shards)
        if self.mode == "cycle":
            random.Random(f"{self.seed}:{cycle}").shuffle(shards)
        return shards

    def _read_shard(self, shard: str, skip: int) -> Iterator[Record]:
        """Samples of one shard from index `skip` on; unreadable, vanished or truncated shards are reported."""
        try:
            stream = _TailTracker(gopen(shard))
        except FileNotFoundError:
            self.on_reject(shard, "", "shard_vanished")
            return
        except OSError:
            self.on_reject(shard, "", "unreadable_shard")
            return
        key, index, error = "", 0, ""
        try:
            files = ({**member, "__url__": shard} for member in tar_file_iterator(stream))
            for sample in group_by_keys(files):
                key = sample["__key__"]
                if index >= skip:
                    fields = {name: value for name, value in sample.items() if not name.startswith("__")}
                    yield Record(key, fields, shard, index)
                index += 1
        except (tarfile.ReadError, EOFError, OSError, ValueError) as err:
            error = str(err) or type(err).__name__
        finally:
            stream.close()
        if error and not key:  # not a single sample could be read: not a tar (or an empty file)
            self.on_reject(shard, "", "unreadable_shard")
        elif error or not stream.ended_cleanly():
            # tarfile treats a file cut at a member boundary as a normal end; the missing end-of-archive
            # zero blocks are what give it away.
            self.on_reject(shard, key, "truncated_shard")

    def _read_passes(self) -> Iterator[Record]:
        """cycle / once: whole passes over the shard list, from the saved (pass, shard, sample) on."""
        while not self._closed.is_set():
            order = self._order(self._cycle)
            if not order:
                raise SourceError(f"no shards in {self.spec}")
            while self._slot < len(order):
                for record in self._read_shard(order[self._slot], self._sample):
                    self._sample += 1
                    yield record
                self._slot, self._sample = self._slot + 1, 0
            if self.mode == "once":
                return
            self._cycle, self._slot = self._cycle + 1, 0

    def _read_follow(self) -> Iterator[Record | object]:
        """follow: shards in name order, resuming inside the current one; then wait for new ones."""
        assert self.directory is not None
        finished = False
        while not self._closed.is_set():
            if self._shard and not finished:
                for record in self._read_shard(self._shard, self._sample):
                    self._sample += 1
                    yield record
                finished = True
            names = list_complete_shards(self.directory)
            if self._seen is None:  # first listing after (re)start: everything up to the position was read
                self._seen = {name for name in names if name <= self._shard}
            for name in names:
                if name < self._shard and name not in self._seen:
                    self._seen.add(name)
                    self.on_reject(name, "", "out_of_order_shard")
            newer = [name for name in names if name > self._shard]
            if newer:
                self._shard, self._sample, finished = newer[0], 0, False
                self._seen.add(self._shard)
                continue
            yield _IDLE
            self._closed.wait(self.poll_seconds)

    def __iter__(self) -> Iterator[Record]:
        reader = self._read_follow() if self.mode == "follow" else self._read_passes()
        for item in reader:
            if item is _IDLE:  # nothing new for now: hand out what the buffer holds instead of sitting on it
                while self._buffer:
                    yield self._pop()
                continue
            assert isinstance(item, Record)
            if self.shuffle_buffer <= 0:
                yield item
                continue
            self._buffer.append(item)
            if len(self._buffer) >= self.shuffle_buffer:
                yield self._pop()
        while self._buffer and not self._closed.is_set():
            yield self._pop()

    def _pop(self) -> Record:
        """A uniformly random buffered record (swap with the last, then pop: O(1))."""
        index = self._rng.randrange(len(self._buffer))
        self._buffer[index], self._buffer[-1] = self._buffer[-1], self._buffer[index]
        return self._buffer.pop()

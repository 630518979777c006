"""Ray Data as a stream: `ray+webdataset://`, `ray+parquet://` and `ray+images://` specs read with Ray Data,
and a reader that turns one worker's share of such a dataset into fixed-size batches with an exact position.

The reading, and the decoding the pipeline attaches with `map_batches`, run as Ray Data tasks (in other
processes, on any node); with Ray Train every worker gets its share through `streaming_split`. Ray Data's
iterators do not resume (ray #37633: a restarted iterator begins its pass again), so the position is our
own: the pass number and how many rows of that pass this worker has consumed. The order is deterministic
(the dataset is read with `preserve_order`, and the optional local shuffle is seeded per pass), so a
resumed reader skips exactly that many rows of its pass and goes on with the next one. Skipping is not
free: the skipped rows are still read and decoded by Ray Data (≈4,300 small PNGs/s here, so resuming
30,000 rows into a pass costs ≈7 s); it never reaches back past the start of the current pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamssl.streams.records import RejectFn, SourceError, readable
from streamssl.streams.tar_shards import list_complete_shards

KINDS = ("webdataset", "parquet", "images")
MODES = ("cycle", "once")
# Where a record's encoded image may be: the configured field first, then these (webdataset extensions,
# the usual Parquet column names).
IMAGE_COLUMNS = ("png", "jpg", "jpeg", "webp", "image", "bytes")
KEY_COLUMNS = ("__key__", "key", "id")
# The files `ray+images://DIR` reads: Ray Data's `read_images` list, and WebP, which `streamssl lake --from` takes too.
IMAGE_FILE_EXTENSIONS = ["png", "jpg", "jpeg", "tif", "tiff", "bmp", "gif", "webp"]

# What the decode step given to `read_ray_dataset` must return for every row, and what the reader reads:
#   image  uint8 [C, H, W] (H, W per row at full resolution; zeros for a rejected row)
#   key  str   id  int64 record id   reason  "" for a good row, else why it was rejected   detail  str
#   payload  bytes (b"" for good rows)   source  where the row came from (shard, file)
DECODED_COLUMNS = ("image", "key", "id", "reason", "detail", "payload", "source")


@dataclass(frozen=True)
class RayPosition:
    """Where a `RayShardReader` is: a pass, and how many rows of it were consumed (handed out or rejected)."""

    pass_number: int = 0
    rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "ray", "pass": self.pass_number, "rows": self.rows}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RayPosition:
        if state.get("kind") != "ray":
            raise SourceError(f"saved stream position is for a '{state.get('kind', 'webdataset')}' source, not Ray Data")
        try:
            position = cls(int(state["pass"]), int(state["rows"]))
        except (KeyError, TypeError, ValueError) as err:
            raise SourceError(f"saved stream position is not a Ray Data position: {err!r}") from None
        if position.pass_number < 0 or position.rows < 0:
            raise SourceError(f"saved Ray Data position is negative: {state}")
        return position


def parse_ray_spec(spec: str) -> tuple[str, str]:
    """(kind, path) of `ray+KIND://PATH`; PATH is a local path (made absolute) or any URI pyarrow opens (s3://…)."""
    scheme, separator, path = spec.partition("://")
    kind = scheme.removeprefix("ray+")
    if not separator or not scheme.startswith("ray+") or kind not in KINDS or not path:
        raise SourceError(f"not a Ray Data spec: {spec!r}; expected ray+KIND://PATH with KIND one of {', '.join(KINDS)}")
    if "://" not in path:
        path = os.path.abspath(path)  # Ray Train workers run in their own working directory
        if not os.path.exists(path):
            raise SourceError(f"data path not found: {path}")
    return kind, path


def unlisted_shards(spec: str) -> list[tuple[str, str, str]]:
    """(shard, reason, detail) of a local `ray+webdataset://` lake's shard entries that cannot be opened (a symlink
    loop, a dangling link): Ray Data's listing leaves them out without a word. The reasons are the shard path's
    (streams/tar_shards.py `read_shard`), so both paths dead-letter the same entry the same way."""
    kind, path = parse_ray_spec(spec)
    if kind != "webdataset" or not os.path.isdir(path):
        return []
    found = []
    for shard in list_complete_shards(path):
        try:
            os.stat(shard)
        except FileNotFoundError:
            found.append((shard, "shard_vanished", ""))
        except OSError as err:
            found.append((shard, "unreadable_shard", err.strerror or str(err)))
    return found


def _content_key(data: Any) -> str:
    """A key for a row that has none: a hash of its bytes, so the same record gets the same id in every run."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data or b"")
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:32]


def _image_bytes(value: Any) -> Any:
    """Raw bytes of an image cell: plain bytes, or a Hugging Face style {"bytes": …, "path": …} struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return b"" if value is None else value


def _normalise(rows: dict[str, np.ndarray], image_field: str, path_keys: bool = False) -> dict[str, np.ndarray]:
    """Any reader's rows → {key, image, source}: the encoded bytes of the first image column a row has a value in, its
    key (its file's path with `path_keys`, one image per file; else a key column or a content hash) and where it came
    from."""
    count = len(next(iter(rows.values())))
    images = np.empty(count, dtype=object)
    images[:] = [b""] * count
    # Later columns first, so the configured field and then the earlier ones win where a row has several.
    for name in reversed((image_field, *IMAGE_COLUMNS)):
        if name in rows:
            for row, value in enumerate(rows[name]):
                data = _image_bytes(value)
                if len(data):
                    images[row] = data
    key_column = rows["path"] if path_keys else next((rows[name] for name in KEY_COLUMNS if name in rows), None)
    keys = [str(key) for key in key_column] if key_column is not None else [_content_key(image) for image in images]
    sources = rows.get("__url__", rows.get("path"))
    return {"key": np.array(keys, dtype=object), "image": images,
            "source": np.array([str(s) for s in sources] if sources is not None else [""] * count, dtype=object)}


def read_ray_dataset(spec: str, decode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], *,
                     image_field: str = "png", override_num_blocks: int | None = None) -> Any:
    """A lazy Ray Dataset of `spec`, normalised to {key, image, source} rows and then passed through `decode`.

    Every reader hands over the encoded bytes (`ray+images` too: its files are read whole, not by `read_images`), so
    that `decode` decodes them as every other path does. `decode` runs in Ray Data tasks (fused with the read) and
    must return `DECODED_COLUMNS`. Must be called with Ray initialised. The dataset's own context preserves order;
    a Ray Train run passes `preserve_order` to its `DataConfig` too (Train sets the split's options itself).
    """
    import ray.data  # Ray loads only for ray+ specs

    kind, path = parse_ray_spec(spec)
    read_options: dict[str, Any] = {"override_num_blocks": override_num_blocks} if override_num_blocks else {}
    if kind == "webdataset":
        # decoder=None: keep the encoded bytes; the pipeline decodes them the way every other source's are.
        # filerename: a member name that is not UTF-8 (decoded with surrogateescape) fails Ray's own Arrow block.
        dataset = ray.data.read_webdataset(path, decoder=None, filerename=readable, **read_options)
    elif kind == "parquet":
        dataset = ray.data.read_parquet(path, include_paths=True, **read_options)
    else:
        dataset = ray.data.read_binary_files(path, include_paths=True, file_extensions=IMAGE_FILE_EXTENSIONS,
                                             **read_options)
    dataset.context.execution_options.preserve_order = True
    # Ray's stub types `fn` as taking the batch alone, though `fn_kwargs` supplies its further arguments.
    return (dataset.map_batches(_normalise, fn_kwargs={"image_field": image_field,  # type: ignore[arg-type]
                                                       "path_keys": kind == "images"}, batch_format="numpy")
            .map_batches(decode, batch_format="numpy"))


def _pass_seed(seed: int, pass_number: int) -> int:
    """A different, reproducible local-shuffle seed for every pass (one seed for all passes repeats the order)."""
    digest = hashlib.blake2b(f"ray-shuffle:{seed}:{pass_number}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class RayShardReader:
    """One worker's share of a decoded Ray dataset as (images, keys, ids, position) batches of `batch_size`.

    Args:
        iterator: A `ray.data.DataIterator`: this worker's `streaming_split` shard (`ray.train.get_dataset_shard`)
            or, on one worker, `dataset.iterator()`. Its rows carry `DECODED_COLUMNS`.
        batch_size: Good rows per batch; rejected rows are reported and left out, so a batch may span
            several Ray batches and, in cycle mode, the end of one pass and the start of the next.
        mode: "cycle" (endless passes) or "once" (one pass; a last partial batch is dropped).
        shuffle_buffer: Ray Data's local shuffle buffer in rows, seeded per pass from `seed`; 0 keeps order.
        seed: Seeds the local shuffle.
        prefetch_batches: Ray Data batches fetched ahead of the one being consumed.
        on_reject: Called with (source, key, reason, detail, payload) for every rejected row.

    Yields (images: B uint8 [C, H, W] arrays, their sides as decoded; keys; ids int64 [B]; position); the position
    is `position()` right after
    the batch's last row. A rejected row with no good row before it waiting for a batch moves it on too.

    A `streaming_split` shard starts a pass only once every worker asks for it (a barrier): between the
    end of one pass and the first rows of the next, `waiting_for_pass` is True, so that a trainer can tell
    the other workers to read to the end of their pass instead of waiting for it with a full queue.
    """

    def __init__(self, iterator: Any, *, batch_size: int, mode: str = "cycle", shuffle_buffer: int = 0, seed: int = 0,
                 prefetch_batches: int = 2, on_reject: RejectFn | None = None) -> None:
        if mode not in MODES:
            raise SourceError(f"data mode '{mode}' is not available for Ray Data sources; valid: {', '.join(MODES)}")
        if batch_size < 1 or shuffle_buffer < 0:
            raise SourceError(f"need batch_size >= 1 and shuffle_buffer >= 0, got {batch_size}, {shuffle_buffer}")
        self._iterator = iterator
        self._batch_size = batch_size
        self._mode = mode
        self._shuffle_buffer = shuffle_buffer
        self._seed = seed
        self._prefetch = prefetch_batches
        self._on_reject = on_reject
        self._closed = threading.Event()
        self._pass = 0  # position: the pass of the last row handed out, and rows of that pass consumed
        self._rows = 0
        self._rejected = 0
        self.reading_pass = 0  # the pass being read (ahead of the position by what waits to be batched)
        self.waiting_for_pass = False

    def position(self) -> RayPosition:
        return RayPosition(self._pass, self._rows)

    def state_dict(self) -> dict[str, Any]:
        """`position()` as plain data: {"kind": "ray", "pass": P, "rows": rows of pass P consumed}."""
        return self.position().to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after `state` (call before iterating); an empty dict starts at the first row."""
        if state:
            position = RayPosition.from_dict(state)
            self._pass, self._rows = position.pass_number, position.rows

    def stats(self) -> dict[str, float]:
        return {"pass": float(self._pass), "rows": float(self._rows), "rejected": float(self._rejected)}

    def close(self) -> None:
        """Ends iteration at the next Ray batch."""
        self._closed.set()

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], list[str], np.ndarray, RayPosition]]:
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]] = []  # images, keys, ids, pass, rows
        waiting_rows = 0
        skip = self._rows  # rows of the first pass already consumed before a restart
        pass_number = self._pass
        first = True
        while not self._closed.is_set():
            self.reading_pass = pass_number
            self.waiting_for_pass = not first  # the first pass starts for every worker at once: no one is behind
            shuffle = {"local_shuffle_buffer_size": self._shuffle_buffer,
                       "local_shuffle_seed": _pass_seed(self._seed, pass_number)} if self._shuffle_buffer else {}
            seen = 0
            batches = self._iterator.iter_batches(batch_size=self._batch_size, batch_format="numpy",
                                                  prefetch_batches=self._prefetch, **shuffle)
            try:
                for rows in batches:
                    self.waiting_for_pass = False
                    count = len(rows["key"])
                    start, first_row, seen = min(max(skip - seen, 0), count), seen, seen + count
                    good = self._take(rows, start, pass_number, first_row, waiting_rows > 0)
                    if len(good):
                        pending.append((rows["image"][good], rows["key"][good], rows["id"][good], pass_number,
                                        first_row + good + 1))
                        waiting_rows += len(good)
                    while waiting_rows >= self._batch_size:
                        batch = self._cut(pending)
                        waiting_rows -= self._batch_size
                        yield batch
                    if self._closed.is_set():
                        return
            finally:
                # Ends Ray's prefetching now, not whenever the generator is collected (maybe after ray.shutdown).
                with contextlib.suppress(Exception):
                    batches.close()
            self.waiting_for_pass = False
            if seen == 0:
                raise SourceError("the Ray dataset has no rows for this worker")
            if self._mode == "once":
                return
            pass_number, skip, first = pass_number + 1, 0, False

    def _take(self, rows: dict[str, np.ndarray], start: int, pass_number: int, first_row: int, waiting: bool
              ) -> np.ndarray:
        """Indices of the good rows from `start` on; reports the rejected ones.

        A rejected row moves the position past itself while no good row before it waits for a batch (`waiting`):
        then nothing before it is left to hand out, and a checkpoint taken now need not read it again.
        """
        reasons = rows["reason"]
        for row in range(start, len(reasons)):
            if not reasons[row]:
                waiting = True
                continue
            self._rejected += 1
            if not waiting:
                self._pass, self._rows = pass_number, first_row + row + 1
            if self._on_reject is not None:
                self._on_reject(str(rows["source"][row]), str(rows["key"][row]), str(reasons[row]),
                                str(rows["detail"][row]), bytes(rows["payload"][row]))
        return np.flatnonzero(reasons[start:] == "") + start

    def _cut(self, pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]]
             ) -> tuple[list[np.ndarray], list[str], np.ndarray, RayPosition]:
        """The first `batch_size` pending good rows as a batch; moves the position to just after its last row.

        A segment's images are a uint8 [n, C, H, W] array, or an object array of [C, H, W] arrays where Ray Data
        holds images of different sizes; either way the batch is a list of [C, H, W] arrays."""
        images: list[np.ndarray] = []
        keys: list[str] = []
        ids: list[np.ndarray] = []
        needed = self._batch_size
        while needed:
            segment_images, segment_keys, segment_ids, pass_number, rows_after = pending[0]
            taken = min(needed, len(segment_keys))
            images.extend(segment_images[:taken])
            keys.extend(str(key) for key in segment_keys[:taken])
            ids.append(segment_ids[:taken])
            self._pass, self._rows = pass_number, int(rows_after[taken - 1])
            if taken == len(segment_keys):
                pending.pop(0)
            else:
                pending[0] = (segment_images[taken:], segment_keys[taken:], segment_ids[taken:], pass_number,
                              rows_after[taken:])
            needed -= taken
        return images, keys, np.concatenate(ids).astype(np.int64), self.position()

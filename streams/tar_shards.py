"""One tar shard of a WebDataset lake read sample by sample, judged whole or not, and a lake directory listed.

Opening shards and grouping tar members into samples is webdataset's (`gopen`, `group_by_keys`); listing the
members is done here, so that a member over the size limit is skipped by its header's size instead of read, and
so is judging whether a shard ended whole, because tarfile's stream mode does not tell.
"""

from __future__ import annotations

import contextlib
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

from streamssl.streams.records import RejectFn, readable

# What a damaged, vanished or unreachable shard raises while it is read; anything else is a bug.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
# Streams tarfile decompresses itself (gzip, bzip2, xz): their tail is compressed data, not zero blocks.
_COMPRESSED_MAGIC = (b"\x1f\x8b\x08", b"BZh", b"\x5d\x00\x00\x80", b"\xfd7zXZ")
_BLOCK = tarfile.BLOCKSIZE
_META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata members, never a sample's


def is_shard_name(name: str) -> bool:
    """Whether a directory entry's name is a published shard's: a writer renames a shard to `*.tar` when it is
    whole, so temp names (`x.tar.tmp`, `.x.tar`) are not shards yet."""
    return name.endswith(".tar") and not name.startswith(".")


def _is_shard(entry: os.DirEntry[str]) -> bool:
    if not is_shard_name(entry.name):
        return False
    try:
        return entry.is_file()
    except OSError:  # a symlink loop, a target out of reach: listed anyway, so that reading it reports it
        return True


def list_complete_shards(directory: str) -> list[str]:
    """Paths of a lake directory's shards (see `is_shard_name`) in name order.

    A missing directory lists as empty so that follow mode keeps polling while a lake is being recreated
    or remounted.
    """
    try:
        with os.scandir(directory) as entries:
            names = [entry.name for entry in entries if _is_shard(entry)]
    except FileNotFoundError:
        return []
    return [os.path.join(directory, name) for name in sorted(names)]


def local_path(url: str) -> str | None:
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


def _members(stream: _ArchiveReader, shard: str, max_member_bytes: int) -> Iterator[dict[str, Any]]:
    """The shard's regular files as `group_by_keys` takes them; the data of one over `max_member_bytes` (0: no limit)
    is its size, an int from its header: tarfile's stream mode then skips it block by block, never holding it."""
    # Stream mode only calls read(); closing the archive leaves `stream` open.
    with tarfile.open(fileobj=stream, mode="r|*") as archive:  # type: ignore[call-overload]
        for member in archive:
            if not member.isreg() or _META_NAME.match(member.name):
                continue
            too_big = max_member_bytes and member.size > max_member_bytes
            data = member.size if too_big else archive.extractfile(member).read()
            yield {"fname": member.name, "data": data, "__url__": shard}
            archive.members = []  # a stream has no random access: forget the headers read


def read_shard(shard: str, skip: int, reject: RejectFn,
               opener: Callable[[str], Any] = gopen) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """`read_samples` without a size limit: every complete sample has its fields."""
    for key, fields, index in read_samples(shard, skip, reject, opener=opener):
        if fields is not None:
            yield key, fields, index


def read_samples(shard: str, skip: int, reject: RejectFn, max_member_bytes: int = 0,
                 opener: Callable[[str], Any] = gopen) -> Iterator[tuple[str, dict[str, bytes] | None, int]]:
    """(key, fields, index) of a shard's complete samples from index `skip` on, opened by `opener` (webdataset's
    gopen; an object store's `open` for s3://).

    A sample with a member over `max_member_bytes` comes as (key, None, index) and is reported through `reject`
    ("oversized_record") once the caller asks for the next sample, that is after it has moved its position past it.

    A shard that cannot be read whole is reported once through `reject` after its complete samples:
    "shard_vanished" (gone before it was opened), "unreadable_shard" (not a tar at all, a malformed one, or
    one that cannot be opened: a symlink loop, no permission, with the error as detail) or "truncated_shard"
    (ends early; the key given is the last complete sample's, or ""). Names that are not UTF-8 come out
    `readable`.
    """
    try:
        stream = _ArchiveReader(opener(shard))
    except FileNotFoundError:
        reject(shard, "", "shard_vanished")
        return
    except OSError as err:  # a symlink loop, no permission, a directory
        reject(shard, "", "unreadable_shard", err.strerror or str(err))
        return
    except ValueError:  # gopen has no handler for the URL's scheme
        reject(shard, "", "unreadable_shard", "no reader for this URL scheme")
        return
    held: tuple[str, dict[str, Any]] | None = None  # newest sample: whole only once the next one begins
    index, last_key, damage = 0, "", ""
    try:
        for sample in group_by_keys(_members(stream, shard, max_member_bytes)):
            if held is not None:
                if index >= skip:
                    yield from _taken(shard, *held, index, max_member_bytes, reject)
                index, last_key = index + 1, held[0]
            held = (readable(sample["__key__"]),
                    {readable(name): data for name, data in sample.items() if not name.startswith("__")})
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
            yield from _taken(shard, *held, index, max_member_bytes, reject)
        last_key = held[0]
    if damage == "truncated_shard" and not last_key and not stream.starts_like_tar():
        damage = "unreadable_shard"
    if damage:
        reject(shard, last_key, damage)


def _taken(shard: str, key: str, fields: dict[str, Any], index: int, max_member_bytes: int,
           reject: RejectFn) -> Iterator[tuple[str, dict[str, bytes] | None, int]]:
    sizes = [data for data in fields.values() if isinstance(data, int)]
    if not sizes:
        yield key, fields, index
        return
    yield key, None, index
    # The same reason and detail as a record refused by its length after reading (pipeline/loading/decode.py).
    reject(shard, key, "oversized_record", f"{max(sizes)} bytes > data.max_record_bytes {max_member_bytes}")

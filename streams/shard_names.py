"""The names of a followed lake's finished shards (read to the end or rejected), kept small enough for a checkpoint.

A lake's shards are usually numbered (`shard-000042.tar`), so the set is kept as runs of consecutive numbers per
name pattern: the run that starts at the first shard is a watermark, the later runs are the finished names above
it, and a shard that lands late inside a gap is simply not in the set (it is read, not lost). Names without a
number are kept as they are. The plain form, `entries()`, is a tuple of (prefix, first, last, suffix) strings:
`("shard-", "000000", "000099", ".tar")` covers shard-000000.tar … shard-000099.tar; a name without digits is
(name, "", "", "").
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable

Entry = tuple[str, str, str, str]

# The last group of digits in a name: shard-000042.tar → ("shard-", "000042", ".tar").
_NUMBERED = re.compile(r"^(.*?)(\d+)(\D*)$")


class ShardNames:
    """A set of shard names: `name in names`, `add(name)`, and `entries()` to save it."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        # (prefix, digits, suffix) → sorted, disjoint, non-adjacent [first, last] number ranges.
        self._runs: dict[tuple[str, int, str], list[list[int]]] = {}
        self._plain: set[str] = set()
        for prefix, first, last, suffix in entries:
            if not first:
                self._plain.add(prefix)
                continue
            if len(first) != len(last) or not (first.isdigit() and last.isdigit()) or int(first) > int(last):
                raise ValueError(f"not a run of shard numbers: {(prefix, first, last, suffix)}")
            pattern = (prefix, len(first), suffix)
            self._runs[pattern] = self._merged(self._runs.get(pattern, []), int(first), int(last))

    @staticmethod
    def _split(name: str) -> tuple[tuple[str, int, str], int] | None:
        match = _NUMBERED.match(name)
        if match is None:
            return None
        prefix, digits, suffix = match.groups()
        return (prefix, len(digits), suffix), int(digits)

    def __contains__(self, name: str) -> bool:
        split = self._split(name)
        if split is None:
            return name in self._plain
        runs = self._runs.get(split[0], [])
        at = bisect.bisect_right(runs, split[1], key=lambda run: run[0]) - 1
        return at >= 0 and runs[at][0] <= split[1] <= runs[at][1]

    def add(self, name: str) -> None:
        split = self._split(name)
        if split is None:
            self._plain.add(name)
        else:
            pattern, number = split
            self._runs[pattern] = self._merged(self._runs.get(pattern, []), number, number)

    @staticmethod
    def _merged(runs: list[list[int]], first: int, last: int) -> list[list[int]]:
        """`runs` with [first, last] added, overlapping and adjacent runs joined."""
        kept: list[list[int]] = []
        for run in runs:
            if run[1] < first - 1 or run[0] > last + 1:
                kept.append(run)
            else:
                first, last = min(first, run[0]), max(last, run[1])
        bisect.insort(kept, [first, last])
        return kept

    def entries(self) -> tuple[Entry, ...]:
        """The set as plain data, in a stable order."""
        runs = [(prefix, f"{first:0{width}d}", f"{last:0{width}d}", suffix)
                for (prefix, width, suffix), ranges in sorted(self._runs.items()) for first, last in ranges]
        return (*runs, *((name, "", "", "") for name in sorted(self._plain)))

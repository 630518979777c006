"""ShardNames: a set of finished shard names kept as runs of consecutive numbers, exact for late names in gaps."""

from __future__ import annotations

import random

import pytest

from streamssl.streams.shard_names import ShardNames


def test_consecutive_names_compact_to_one_run_and_a_gap_stays_out() -> None:
    names = ShardNames()
    for number in [*range(0, 50), *range(51, 100)]:
        names.add(f"shard-{number:06d}.tar")
    assert names.entries() == (("shard-", "000000", "000049", ".tar"), ("shard-", "000051", "000099", ".tar"))
    assert "shard-000050.tar" not in names and "shard-000049.tar" in names and "shard-000100.tar" not in names
    names.add("shard-000050.tar")  # the late one closes the gap
    assert names.entries() == (("shard-", "000000", "000099", ".tar"),)


def test_the_same_number_in_another_width_or_pattern_is_another_name() -> None:
    names = ShardNames()
    for name in ("shard-000007.tar", "shard-7.tar", "other-000007.tar", "shard-000007.tar.tar", "lake.tar"):
        names.add(name)
    for name in ("shard-07.tar", "other-000008.tar", "lake2.tar", "lak.tar"):
        assert name not in names
    assert "lake.tar" in names and "shard-7.tar" in names and "shard-000007.tar.tar" in names
    assert ("lake.tar", "", "", "") in names.entries()


def test_entries_round_trip_and_match_a_plain_set() -> None:
    rng = random.Random(0)
    picked = {f"{prefix}{number:0{width}d}.tar" for prefix, width in (("a-", 4), ("b", 2))
              for number in rng.sample(range(10 ** width if width == 2 else 300), 60)} | {"x.tar", "y.tar"}
    names = ShardNames()
    for name in sorted(picked, key=lambda _: rng.random()):
        names.add(name)
    again = ShardNames(names.entries())
    assert again.entries() == names.entries()
    for candidate in [f"a-{n:04d}.tar" for n in range(300)] + [f"b{n:02d}.tar" for n in range(100)] + ["x.tar", "z.tar"]:
        assert (candidate in again) == (candidate in picked), candidate


@pytest.mark.parametrize("entry", [("s-", "9", "1", ".tar"), ("s-", "01", "2", ".tar"), ("s-", "a", "b", ".tar")])
def test_a_malformed_entry_is_refused(entry: tuple[str, str, str, str]) -> None:
    with pytest.raises(ValueError, match="not a run"):
        ShardNames([entry])

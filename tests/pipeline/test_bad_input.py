"""Bad records and shards are skipped, counted by reason, dead-lettered; the run goes on."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from streamssl.pipeline.images import Trainer
from streamssl.streams.lake import write_shard
from tests.conftest import tiny_config


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (28, 28), color=value).save(buffer, format="PNG")
    return buffer.getvalue()


def _good(prefix: str, count: int) -> list[tuple[str, dict[str, bytes]]]:
    return [(f"{prefix}-{i:04d}", {"png": _png(i % 250), "json": b'{"label": 0}'}) for i in range(count)]


def test_bad_records_and_shards_are_dead_lettered_and_counted(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    good = _good("a", 64)
    corrupt_png = ("bad-png", {"png": _png(1)[:30] + b"garbage", "json": b"{}"})
    no_image = ("no-image", {"json": b'{"label": 1}'})
    write_shard(lake / "shard-000000.tar", [*good[:20], corrupt_png, *good[20:40], no_image, *good[40:]])
    write_shard(lake / "shard-000001.tar", _good("b", 64))
    full = (lake / "shard-000001.tar").read_bytes()
    (lake / "shard-000001.tar").write_bytes(full[: len(full) // 2])  # truncated mid-way
    (lake / "shard-000002.tar").write_bytes(b"this is not a tar file at all" * 40)
    write_shard(lake / "shard-000003.tar", _good("c", 64))

    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(run_dir, lake, "data.mode=once", "data.shuffle_buffer=0"))
    state = trainer.run()

    letters = [json.loads(line) for line in (run_dir / "dead-letter.jsonl").read_text().splitlines()]
    reasons = {letter["reason"] for letter in letters}
    assert {"corrupt_image", "missing_image", "truncated_shard", "unreadable_shard"} <= reasons
    by_key = {letter["key"]: letter for letter in letters}
    assert by_key["bad-png"]["source"].endswith("shard-000000.tar")
    assert by_key["no-image"]["reason"] == "missing_image"
    # Every good sample before the truncation and in the last shard was trained on.
    assert state.samples_seen >= 128 + 32
    assert state.step == state.samples_seen // 32
    counted = {s.labels["reason"]: s.value for metric in trainer.metrics.registry.collect()
               if metric.name == "streamssl_records_rejected" for s in metric.samples if s.name.endswith("_total")}
    assert counted == {reason: sum(1 for x in letters if x["reason"] == reason) for reason in reasons}
    assert (run_dir / "published" / "latest" / "manifest.json").is_file()

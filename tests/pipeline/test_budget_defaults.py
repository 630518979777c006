"""Budgets that fit the run: the demo ends by itself, a run on the user's data goes on until it is stopped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamssl.pipeline.config import DEMO_MINUTES, load_config
from streamssl.pipeline.config_show import describe


def budget(*sets: str, job: str | None = None) -> tuple[int, float]:
    cfg = load_config(sets=list(sets), job=job)  # type: ignore[arg-type]
    return cfg.train.max_steps, cfg.train.max_minutes


def test_the_embedded_demo_gets_five_minutes_unless_a_budget_is_set() -> None:
    assert DEMO_MINUTES == 5.0
    assert budget() == (0, 5.0)
    assert budget("train.max_minutes=0") == (0, 0.0)  # explicitly unbounded
    assert budget("train.max_minutes=1.5") == (0, 1.5)
    assert budget("train.max_steps=100") == (100, 0.0)  # a step budget alone is not cut short by the demo's minutes
    assert budget("method=cpc") == (0, 5.0)  # the series job's demo series too


@pytest.mark.parametrize("source", ["{lake}", "kafka://localhost:9092/images", "{lake}/shard-{{000000..000001}}.tar"])
def test_a_run_on_the_users_data_has_no_budget_of_its_own(tmp_path: Path, source: str) -> None:
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    data = source.format(lake=tmp_path)
    assert budget(f"data.source={data}") == (0, 0.0)
    assert budget(f"data.source={data}", "train.max_minutes=30") == (0, 30.0)
    assert budget(f"data.source={tmp_path}", "method=forecast") == (0, 0.0)


def test_streamssl_forecast_keeps_its_bounds() -> None:
    assert budget(job="forecast") == (3000, 5.0)
    assert budget("train.max_minutes=0", job="forecast") == (3000, 0.0)


def test_config_show_says_where_the_five_minutes_apply() -> None:
    line = next(line for line in describe("moco", "images") if line.startswith("train.max_minutes = "))
    assert re.match(r"train.max_minutes = 5.0  # .*0 = no limit.*embedded demo.*5.*own data.*until it is stopped", line)

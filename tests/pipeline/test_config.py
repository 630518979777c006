"""The one config tree: a section per registered method, choices as Literal types, keys a job does not read
refused, per-job defaults, every resolved config reloadable, and `streamssl config --show`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest

from streamssl.models.registry import METHODS, SERIES_METHODS
from streamssl.pipeline.config import (
    Config,
    ConfigError,
    MethodOptions,
    applies,
    flatten,
    job_of,
    load_config,
    to_dict,
)
from streamssl.pipeline.config_show import describe

JOBS = [(name, job_of(Config(method=name))) for name in sorted({**METHODS, **SERIES_METHODS})] + [("forecast", "forecast")]


def test_every_registered_method_has_its_section_and_no_other_exists() -> None:
    hints = typing.get_type_hints(Config)
    sections = {name for name, hint in hints.items() if hint is MethodOptions}
    assert sections == set(METHODS) | set(SERIES_METHODS)
    for name in sections:
        assert getattr(Config(), name).method is {**METHODS, **SERIES_METHODS}[name]


@pytest.mark.parametrize(("method", "job"), JOBS)
def test_a_resolved_config_reloads_as_itself(method: str, job: typing.Any) -> None:
    # Ray workers rebuild the driver's config from its resolved dict: every key then counts as set
    cfg = load_config(overrides={"method": method}, job=job)
    assert to_dict(load_config(overrides=to_dict(cfg), job=job)) == to_dict(cfg)


@pytest.mark.parametrize(("sets", "job", "message"), [
    (["swav.epsilon=0.1"], None, "swav.epsilon does not apply to an image run with method moco"),
    (["series.window=64"], None, "series.window does not apply to an image run"),
    (["method=cpc", "augment.blur_prob=0.1", "model.bn_splits=2"], None,
     "model.bn_splits, augment.blur_prob do not apply to a series run with method cpc"),  # tree order
    (["method=forecast", "series.patience=3"], None, "series.patience does not apply to a series run"),
    (["data.mode=follow"], "forecast", "data.mode does not apply to `streamssl forecast`"),
    (["method=cpc"], "forecast", "`streamssl forecast` trains the forecast method, not 'cpc'"),
    (["data.mode=sometimes"], None, "data.mode: 'sometimes' is not one of auto, cycle, once, follow"),
    (["method=forecast", "forecast.mode=best"], None, "forecast.mode: 'best' is not one of persistence, single"),
    (["eval.every_seconds=5"], "forecast", "checks validation by steps only"),
    (["checkpoint.publish_every=-1"], None, "checkpoint.publish_every must be >= 0"),
])
def test_what_a_job_would_ignore_or_cannot_use_is_one_line_error(sets: list[str], job: typing.Any,
                                                                   message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(sets=sets, job=job)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_job_defaults_yield_to_what_is_set() -> None:
    offline = load_config(job="forecast")
    assert (offline.method, offline.train.max_steps, offline.eval.every_steps, offline.checkpoint.publish_every,
            offline.metrics.port, offline.run_dir) == ("forecast", 3000, 100, 0, 0, "")
    assert load_config(sets=["train.max_steps=7"], job="forecast").train.max_steps == 7
    assert load_config().train.max_steps == 0  # the image job keeps the tree's default


@pytest.mark.parametrize(("method", "job"), JOBS)
def test_show_lists_exactly_the_keys_the_job_reads_each_with_its_default_and_help(method: str, job: typing.Any) -> None:
    lines = describe(method, job)
    cfg = load_config(overrides={"method": method}, job=job)
    shown = {}
    for line in lines:
        key, _, rest = line.partition(" = ")
        value, _, help_text = rest.partition("  # ")
        assert help_text, f"{key} has no help"
        shown[key] = value
    expected = {key for key in flatten(cfg) if applies(key, job, method)}
    assert set(shown) == expected
    assert f"{method}." in "".join(shown) or not dataclasses.fields(getattr(cfg, method))
    assert shown["train.max_steps"] == str(cfg.train.max_steps)


def test_config_show_cli() -> None:
    run = subprocess.run([sys.executable, "-m", "streamssl.pipeline.cli", "config", "--show", "--job", "forecast"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "series.patience = 10  # validation checks without improvement" in run.stdout
    assert "augment." not in run.stdout and "moco." not in run.stdout
    resolved = subprocess.run([sys.executable, "-m", "streamssl.pipeline.cli", "config", "--method", "simclr"],
                              capture_output=True, text=True, timeout=120)
    assert json.loads(resolved.stdout)["method"] == "simclr"

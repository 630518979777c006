"""The Python API (`streamssl.pipeline.api`): configure, run and watch a training run from Python or a notebook.

    from streamssl.pipeline import api

    cfg = api.load_config(data__source="/data/lake", run_dir="runs/nb", **{"train.max_steps": 200})
    stop = threading.Event()
    state = api.run(cfg, api.Callbacks(on_step=lambda step, loss, logs: print(step, loss)), stop=stop)
    encoder = api.load_encoder("runs/nb/published/latest")

`run` is `streamssl run` in this process, minus the signal handlers: it blocks until a stop reason (the
budget, the end of a finite stream, `stop.set()` from another thread or a callback) and ends as the CLI
does (eval, checkpoint, publish). Bad config raises `ConfigError`, a bad data path `SourceError`, a run dir
in use `RunDirError`. The pieces a custom loop needs are re-exported: `build_method` (a method around a
backbone), `BatchAugment` (the batched augmentation), `load_encoder` (a published version).
"""

from __future__ import annotations

import threading
from typing import Any

from streamssl.models import build_backbone, build_method, load_encoder
from streamssl.models.registry import SERIES_METHODS
from streamssl.pipeline import config as _config
from streamssl.pipeline.augment import BatchAugment
from streamssl.pipeline.callbacks import Callbacks
from streamssl.pipeline.config import Config, ConfigError
from streamssl.pipeline.run_state import RunState

__all__ = ["BatchAugment", "Callbacks", "Config", "ConfigError", "RunState", "build_backbone", "build_method",
           "load_config", "load_encoder", "run"]


def load_config(path: str | None = None, **overrides: Any) -> Config:
    """The config a run uses: defaults ← the YAML file at `path` ← `overrides`, then the job's and the method's
    defaults for the keys none of them set, validated (`ConfigError` otherwise).

    Keys are spelled with `__` for the dot (`train__max_steps=100`) or given dotted through a dict
    (`**{"train.max_steps": 100}`); a section may also be a dict (`train={"max_steps": 100}`).
    """
    return _config.load_config(path, {key.replace("__", "."): value for key, value in overrides.items()})


def run(config: Config, callbacks: Callbacks | None = None, stop: threading.Event | None = None) -> RunState:
    """Trains `config` in this process until a stop reason; returns the final counters (`step`, `samples_seen`,
    `eval_metrics`, …). `callbacks` hear of steps, evals, checkpoints and publishes; `stop.set()` (from any
    thread) finishes the step, then evaluates, checkpoints and publishes."""
    from streamssl.pipeline.loading.sources import source_spec

    if source_spec(config.data).kind == "ray":
        raise ConfigError("run() trains in this process; a ray+… source needs `streamssl run --workers N`")
    if config.method in SERIES_METHODS:
        from streamssl.pipeline.series.job import SeriesJob

        return SeriesJob(config, stop, callbacks=callbacks).run()
    from streamssl.pipeline.images import Trainer

    return Trainer(config, stop, callbacks=callbacks).run()

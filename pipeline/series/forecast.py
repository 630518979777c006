"""`streamssl forecast`: train and score one self-boosted forecaster offline on a real series; one JSON line out.

    streamssl forecast --series electricity|temperature|exchange|PATH [--mode combined|mtl|mtv|single|persistence]
        [--lag L] [--horizon H] [--points N] [--max-minutes M] [--max-steps N] [--seed S] [--run-dir DIR]
        [--config FILE] [--set KEY=VALUE ...]

The series is loaded (`streams.series_data`), cut to its most recent `series.points` points (default
4000: decomposing every trailing window is the cost, ~one EEMD per point), turned into leakage-free
examples (`pipeline.series.examples`: origins split in time order by `series.train_fraction` /
`series.val_fraction`, grouping and normalisation from the training part only), and a
`models.forecaster.Forecaster` is trained with Adam on random training batches. It is a task of the one
training loop (pipeline/loop.py), configured by the same tree as every job (`streamssl config --show --job
forecast`): the loop's eval is the validation check, every `eval.every_steps` steps, which keeps the best
model so far; the task ends itself after `series.patience` checks without improvement (early stopping), and
the loop stops at `train.max_steps` or when this invocation's `train.max_minutes` (training time; the
decomposition is not counted) run out. The test set is scored with the best model: nRMSE = RMSE / std of
the test targets.

With `--run-dir`, the loop checkpoints (model, optimizer, batch sampler, best model, counters, grouping) at
every check and at the end, and a rerun continues exactly where the last one stopped (a run that is done
only prints its result again). At the end the best model's trunk is published to RUN_DIR/published/ with a
manifest holding the window, lag, channels, normalisation, grouping and test scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamssl.models.encoder_io import Manifest
from streamssl.models.forecaster import MODES, Forecaster
from streamssl.pipeline.config import Config, ConfigError, SeriesConfig, load_config
from streamssl.pipeline.device import resolve_device
from streamssl.pipeline.extras import require
from streamssl.pipeline.loading.messages import Tick
from streamssl.pipeline.loading.positions import Position
from streamssl.pipeline.loop import Loop
from streamssl.pipeline.series.examples import (
    NRMSE_DEFINITION,
    Decomposition,
    ForecastExamples,
    Groups,
    build_examples,
    default_cache_dir,
    forecast_errors,
    series_fingerprint,
)
from streamssl.pipeline.task import Feed, Step

log = logging.getLogger(__name__)

# What must match for a run dir to be continued: data, task, model and sampling.
IDENTITY_SERIES_KEYS = ("value_column", "time_column", "window", "lag", "horizon", "decomposition", "trials",
                        "noise_width", "max_imfs", "grouping", "threshold", "points", "decomposition_seed")


def decomposition_of(series: SeriesConfig) -> Decomposition:
    return Decomposition(window=series.window, method=series.decomposition, trials=series.trials,
                         noise_width=series.noise_width, max_imfs=series.max_imfs, seed=series.decomposition_seed)


def load_values(name: str, series: SeriesConfig) -> np.ndarray:
    """The series' values, limited to the most recent `series.points` points."""
    require("pyarrow", "series", "streamssl forecast")
    from streamssl.streams.series_data import BUNDLED, load_series

    if name in BUNDLED:
        # the bundled sets know their columns; only a value column set away from the default picks another
        default = SeriesConfig().value_column
        _, values = load_series(name, "" if series.value_column == default else series.value_column)
    else:
        _, values = load_series(name, series.value_column, series.time_column)
    return values[-series.points:] if series.points else values


def identity(name: str, values: np.ndarray, cfg: Config) -> dict[str, Any]:
    s = cfg.series
    return {"series": name, "series_sha256": series_fingerprint(values),
            "series_config": {key: getattr(s, key) for key in IDENTITY_SERIES_KEYS}, "forecast": cfg.method_options(),
            "seed": cfg.train.seed, "batch_size": s.batch_size, "lr": s.lr, "weight_decay": s.weight_decay,
            "eval_every": cfg.eval.every_steps, "fractions": [s.train_fraction, s.val_fraction]}


class _Ticks:
    """The feed of an in-memory task: an endless stream of `Tick`s."""

    def next(self, timeout: float) -> Tick:
        return Tick()

    def commit(self, position: Position | None) -> None: ...

    def close(self) -> None: ...


class ForecastTask:
    """The offline forecaster as a loop task: examples in memory, random training batches, validation checks."""

    map_location = "cpu"
    quick_eval = True  # one forward pass over the held-out examples

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.name = cfg, cfg.data.source
        self.options = cfg.method_options()
        self.values = load_values(self.name, cfg.series)  # a missing file or column fails before anything is written
        self.identity = identity(self.name, self.values, cfg)
        self.device = resolve_device(cfg.train.device)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.examples: ForecastExamples | None = None
        self.model: Forecaster | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        # batch indices come from a CPU generator of their own: its state is part of the checkpoint
        self.sampler = torch.Generator().manual_seed(cfg.train.seed)
        self.best_step, self.best_val, self.checks_since_best, self.stopped_early = 0, float("inf"), 0, False
        self.best_state: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, float] = {}
        self.resumed, self._threads = False, 0
        self.loop: Loop  # set by attach(), which the loop calls before anything else

    @property
    def finished(self) -> str:
        if self.model is not None and self.model.trunk is None:
            return "persistence has nothing to train"
        if self.stopped_early:
            return f"early stopping: {self.checks_since_best} validation checks without improvement"
        return ""

    def attach(self, loop: Loop) -> None:
        self.loop = loop

    def build(self, groups: Groups | None) -> None:
        """Decomposes the series into examples (stored `groups` on resume) and builds the model."""
        s = self.cfg.series
        cache = None if s.cache_dir == "none" else Path(s.cache_dir) if s.cache_dir else default_cache_dir()
        self.examples = examples = build_examples(
            self.values, mode=self.options["mode"], lag=s.lag, horizon=s.horizon, spec=decomposition_of(s),
            fractions=(s.train_fraction, s.val_fraction), grouping=s.grouping, threshold=s.threshold, groups=groups,
            cache_dir=cache)
        torch.manual_seed(self.cfg.train.seed)
        self.model = self._forecaster().to(self.device)
        self.inputs = torch.from_numpy(examples.inputs).to(self.device)
        self.targets = torch.from_numpy(examples.targets).to(self.device)
        if self.model.trunk is not None:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        self.best_state = self._copy(self.model.state_dict())

    def _forecaster(self) -> Forecaster:
        examples = self.examples
        assert examples is not None
        return Forecaster(examples.inputs.shape[1], self.cfg.series.lag, examples.targets.shape[1] - 1, **self.options)

    @staticmethod
    def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in state.items()}

    # --- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        assert self.model is not None and self.examples is not None
        groups = self.examples.groups
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "sampler": self.sampler.get_state(), "best_state": self.best_state, "best_step": self.best_step,
                "best_val": self.best_val, "checks_since_best": self.checks_since_best,
                "stopped_early": self.stopped_early, "identity": self.identity,
                "groups": groups.as_dict() if groups else None}

    def upgrade(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint of the forecast command before it ran on the loop (its own counters, `fit` settings)."""
        if "method_name" in ckpt:
            return ckpt
        old, step = ckpt["identity"], ckpt["step"]
        upgraded = {key: ckpt[key] for key in ("model", "optimizer", "sampler", "best_state", "best_step", "best_val",
                                                "checks_since_best", "stopped_early", "groups")}
        return {**upgraded, "format": 1, "method_name": "forecast", "step": step, "source": {},
                "samples_seen": step * old["batch_size"], "checkpoints_written": step // old["eval_every"],
                "eval_metrics": {"best_val_mse": ckpt["best_val"]}, "eval_step": step,
                "identity": {**old, "series_config": {key: old["series_config"][key] for key in IDENTITY_SERIES_KEYS}}}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        if ckpt["identity"] != self.identity:
            changed = sorted(k for k in self.identity if ckpt["identity"].get(k) != self.identity[k])
            raise ConfigError(f"run dir {self.cfg.run_dir} holds a different run (differs in: {', '.join(changed)}); "
                              f"use another --run-dir")
        self.build(Groups(**ckpt["groups"]) if ckpt["groups"] else None)
        self.roll_back(ckpt)
        self.best_state = {k: v.to(self.device) for k, v in ckpt["best_state"].items()}
        self.best_step, self.best_val = ckpt["best_step"], ckpt["best_val"]
        self.checks_since_best, self.stopped_early = ckpt["checks_since_best"], ckpt["stopped_early"]
        self.metrics, self.resumed = {"best_val_mse": self.best_val}, True

    def roll_back(self, ckpt: dict[str, Any]) -> None:
        assert self.model is not None
        self.model.load_state_dict(ckpt["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.sampler.set_state(ckpt["sampler"])

    # --- training ------------------------------------------------------------------------------
    def open(self, position: Position | None) -> Feed:
        if self.examples is None:
            self.build(None)
        if self.cfg.series.threads and self.device.type == "cpu":
            self._threads = torch.get_num_threads()
            torch.set_num_threads(self.cfg.series.threads)
        assert self.model is not None
        self.model.train()
        return _Ticks()

    def step(self, message: Any) -> Step:
        assert self.model is not None and self.optimizer is not None and self.examples is not None
        s, train = self.cfg.series, self.examples.train
        index = torch.randint(train.start, train.stop, (s.batch_size,), generator=self.sampler).to(self.device)
        loss, _ = self.model(self.inputs[index], self.targets[index])
        value = float(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        if not np.isfinite(value):
            return Step(value, {}, s.batch_size, s.lr, finite=False)
        loss.backward()
        self.optimizer.step()
        return Step(value, {}, s.batch_size, s.lr)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The validation check: MSE of the main forecast; keeps the best model; early stopping.

        Checks happen at multiples of `eval.every_steps` only, never where a time budget or max_steps happens
        to end (the loop also evaluates there): a resumed or extended run checks at the same steps as a
        straight one, so it keeps the same best model."""
        assert self.model is not None and self.examples is not None
        step = self.loop.state.step
        if self.model.trunk is None or not step or step % self.cfg.eval.every_steps:
            return self.metrics
        val = self.examples.val
        self.model.eval()
        error = self.model.predict(self.inputs[val]) - self.targets[val, 0]
        self.model.train()
        mse = float((error.float() ** 2).mean())
        if mse < self.best_val:
            self.best_val, self.best_step, self.checks_since_best = mse, step, 0
            self.best_state = self._copy(self.model.state_dict())
        else:
            self.checks_since_best += 1
            self.stopped_early = bool(self.cfg.series.patience and self.checks_since_best >= self.cfg.series.patience)
        log.info("step %d: validation MSE %.5f (best %.5f at step %d)", step, mse, self.best_val, self.best_step)
        self.metrics = {"val_mse": mse, "best_val_mse": self.best_val}
        return self.metrics

    def best_model(self) -> Forecaster:
        """The best model so far (the current one before any check)."""
        assert self.model is not None
        if self.model.trunk is None or not self.best_step:
            return self.model
        model = self._forecaster().to(self.device)
        model.load_state_dict(self.best_state)
        return model

    @torch.no_grad()
    def test_errors(self) -> dict[str, float]:
        """rmse / mae / nrmse of the best model's main forecasts on the test origins, in the series' units."""
        examples = self.examples
        assert examples is not None
        model = self.best_model()
        was_training = model.training
        model.eval()
        forecasts = model.predict(self.inputs[examples.test]).float().cpu().numpy()
        model.train(was_training)
        return forecast_errors(examples.main_in_units(forecasts), examples.main_in_units(examples.targets[examples.test, 0]))

    # --- publishing and output -----------------------------------------------------------------
    def encoder(self) -> torch.nn.Module | None:
        if self.model is None or self.model.trunk is None:
            return None
        return self.best_model().cpu().encoder()

    def manifest(self) -> Manifest:
        examples, s = self.examples, self.cfg.series
        assert examples is not None
        spec = decomposition_of(s)
        return Manifest(
            backbone=f"forecaster-{self.options['trunk']}", embedding_dim=self.options["hidden"],
            backbone_options={"in_channels": len(examples.channels), "lag": s.lag, "hidden": self.options["hidden"]},
            input={"channels": len(examples.channels), "channel_names": examples.channels, "lag": s.lag,
                   "window": s.window, "horizon": s.horizon, "mean": examples.input_mean.tolist(),
                   "std": examples.input_std.tolist()},
            metrics={**self.test_errors(), "test_points": examples.test.stop - examples.test.start,
                     "nrmse_definition": NRMSE_DEFINITION},
            extra={"mode": self.options["mode"], "best_step": self.best_step, "series": self.name,
                   "targets": {"names": examples.target_names, "mean": examples.target_mean.tolist(),
                               "std": examples.target_std.tolist()},
                   "groups": examples.groups.as_dict() if examples.groups else None,
                   "decomposition": {**dataclasses.asdict(spec), "backend": examples.decomposition_backend or spec.backend}})

    def progress(self, samples_rate: float, seconds: float, loss: float, logs: dict[str, float]) -> str:
        return (f"step {self.loop.state.step}  loss {loss:.5f}  best validation MSE {self.best_val:.5f} "
                f"at step {self.best_step}  {samples_rate:.0f} examples/s")

    def summary(self) -> str:
        return f", best validation MSE {self.best_val:.5f} at step {self.best_step}" if self.best_step else ""

    def close(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
            self._threads = 0


def forecast(cfg: Config) -> dict[str, Any]:
    """Trains (or continues) and scores one forecaster; returns the result that the CLI prints."""
    started = time.monotonic()
    task = ForecastTask(cfg)
    with tempfile.TemporaryDirectory(prefix="streamssl-forecast-") as scratch:
        run_dir = cfg.run_dir or scratch  # without --run-dir nothing outlives the command
        loop = Loop(dataclasses.replace(cfg, run_dir=run_dir), task, out=sys.stderr)
        state = loop.run()
        trained = task.model is not None and task.model.trunk is not None
        published = loop.publisher.latest_version() if cfg.run_dir and trained else None
    examples = task.examples
    assert examples is not None
    errors = task.test_errors()
    groups = None
    if examples.groups is not None:
        groups = {**examples.groups.as_dict(), "components": decomposition_of(cfg.series).component_names()}
    s = cfg.series
    return {
        "series": task.name, "mode": task.options["mode"], "lag": s.lag, "horizon": s.horizon, "window": s.window,
        "points": len(task.values), "test_points": examples.test.stop - examples.test.start,
        "nrmse": round(errors["nrmse"], 6), "rmse": round(errors["rmse"], 6), "mae": round(errors["mae"], 6),
        "nrmse_definition": NRMSE_DEFINITION, "groups": groups, "steps": state.step, "best_step": task.best_step,
        "best_val_mse": None if task.best_val == float("inf") else round(task.best_val, 6),
        "stopped_early": task.stopped_early, "resumed": task.resumed, "seed": cfg.train.seed,
        "device": str(task.device), "published": published,
        "decomposition_seconds": round(examples.decomposition_seconds, 1), "seconds": round(time.monotonic() - started, 1),
    }


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Adds the `forecast` sub-command to an argparse subparsers object."""
    parser = commands.add_parser("forecast", help="train and score a self-boosted forecaster on one series (JSON)")
    parser.add_argument("--series", required=True, help="electricity | temperature | exchange | a .csv/.parquet file")
    parser.add_argument("--mode", choices=MODES, help="combined (default) | mtl | mtv | single | persistence")
    parser.add_argument("--lag", type=int, help="past points fed to the model (series.lag, default 12)")
    parser.add_argument("--horizon", type=int, help="steps ahead (series.horizon, default 1)")
    parser.add_argument("--points", type=int, help="use the most recent N points (series.points, default 4000; 0 = all)")
    parser.add_argument("--max-steps", type=int, help="total training steps for the run dir (train.max_steps, 3000)")
    parser.add_argument("--max-minutes", type=float, help="training time of this invocation (train.max_minutes)")
    parser.add_argument("--seed", type=int, help="model initialisation and batch order (train.seed)")
    parser.add_argument("--run-dir", help="checkpoints (a rerun continues) and the published trunk")
    parser.add_argument("--config", help="YAML config file (keys as in `--set`; see `streamssl config --show --job "
                                         "forecast`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any key `streamssl forecast` reads, e.g. --set series.trials=20 (repeatable)")
    return parser


def config_of(args: argparse.Namespace) -> Config:
    return load_config(args.config, {"data.source": args.series, "forecast.mode": args.mode, "series.lag": args.lag,
                                     "series.horizon": args.horizon, "series.points": args.points,
                                     "train.max_steps": args.max_steps, "train.max_minutes": args.max_minutes,
                                     "train.seed": args.seed, "run_dir": args.run_dir}, args.set, job="forecast")


def run(args: argparse.Namespace) -> int:
    """The `forecast` command: prints one JSON line; bad arguments raise ConfigError / SourceError."""
    print(json.dumps(forecast(config_of(args))))
    return 0

"""`streamssl forecast`: train and score one self-boosted forecaster offline on a real series; one JSON line out.

    streamssl forecast --series electricity|temperature|exchange|PATH [--mode combined|mtl|mtv|single|persistence]
        [--lag L] [--horizon H] [--points N] [--max-minutes M] [--max-steps N] [--seed S] [--run-dir DIR]
        [--set series.KEY=V | forecast.KEY=V | fit.KEY=V ...]

The series is loaded (`streams.series_data`), cut to its most recent `series.points` points (default
4000: decomposing every trailing window is the cost, ~one EEMD per point), turned into leakage-free
examples (`pipeline.series.examples`: origins split 70/10/20 in time order, grouping and normalisation
from the training part only), and a `models.forecaster.Forecaster` is trained with Adam on random
training batches. Every `fit.eval_every` steps the validation MSE of the main forecast is measured; the
best model so far is kept, and training stops after `fit.patience` checks without improvement, at
`--max-steps`, or when this invocation's `--max-minutes` (training time; the decomposition is not
counted) run out. The test set is scored with the best model: nRMSE = RMSE / std of the test targets.

With `--run-dir`, state (model, optimizer, batch sampler, best model, counters, grouping) is checkpointed
at every validation check and at the end, and a rerun continues exactly where the last one stopped (a
run that is done only prints its result again). The best model's trunk is published to
RUN_DIR/published/ with a manifest holding the window, lag, channels, normalisation and grouping.
Config sections: `series.*` (shared with the streaming runs), `forecast.*` (the Forecaster's own
keyword options) and `fit.*` (this command's training loop).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamssl.models.forecaster import MODES, TRUNKS, Forecaster
from streamssl.pipeline.checkpointing import Checkpointer
from streamssl.pipeline.config import CHOICES, ConfigError, SeriesConfig, apply_overrides, options_section
from streamssl.pipeline.publishing import Publisher
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
from streamssl.streams.files import RunPaths
from streamssl.streams.series_data import BUNDLED, load_series

log = logging.getLogger(__name__)

ForecastOptions = options_section(Forecaster)


@dataclass
class FitConfig:
    """The training loop of `streamssl forecast` (offline: the series is small and fits in memory)."""

    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_steps: int = 3000  # total for the run dir; 0 = until early stopping or the time budget
    max_minutes: float = 5.0  # training time of this invocation; 0 = no limit
    eval_every: int = 100  # steps between validation checks (and checkpoints with --run-dir)
    patience: int = 10  # validation checks without improvement before stopping; 0 = never stop early
    train_fraction: float = 0.7
    val_fraction: float = 0.1
    seed: int = 0  # model initialisation and batch order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # CPU threads while training: the model is tiny, and on 2 busy cores intra-op threads cost far more than they
    # gain (measured: 2.6 ms/step with 1 thread, 142 ms/step with 2 while other jobs ran); 0 = torch's default
    threads: int = 1
    cache_dir: str = ""  # decomposition cache; "" = ~/.cache/streamssl/eemd, "none" = do not cache
    keep: int = 3  # checkpoints kept in RUN_DIR/checkpoints


@dataclass
class ForecastConfig:
    series: SeriesConfig = field(default_factory=SeriesConfig)
    forecast: ForecastOptions = field(default_factory=ForecastOptions)
    fit: FitConfig = field(default_factory=FitConfig)


def load_forecast_config(overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> ForecastConfig:
    """Defaults ← explicit overrides (CLI flags; None = not given) ← `key=value` strings; validated."""
    cfg = ForecastConfig()
    apply_overrides(cfg, overrides, sets)
    _validate(cfg)
    return cfg


def _validate(cfg: ForecastConfig) -> None:
    choices = {key: allowed for key, allowed in CHOICES.items() if key.startswith("series.")}
    choices.update({"forecast.mode": MODES, "forecast.trunk": TRUNKS})
    for key, allowed in choices.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    at_least_one = {"series.window": cfg.series.window, "series.lag": cfg.series.lag, "series.horizon": cfg.series.horizon,
                    "series.trials": cfg.series.trials, "series.max_imfs": cfg.series.max_imfs,
                    "forecast.hidden": cfg.forecast.hidden, "fit.batch_size": cfg.fit.batch_size,
                    "fit.eval_every": cfg.fit.eval_every, "fit.keep": cfg.fit.keep}
    for key, value in at_least_one.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    if cfg.series.lag > cfg.series.window:
        raise ConfigError(f"series.lag {cfg.series.lag} must not exceed series.window {cfg.series.window}")
    at_least_zero = {"series.points": cfg.series.points, "fit.max_steps": cfg.fit.max_steps,
                     "fit.max_minutes": cfg.fit.max_minutes, "fit.patience": cfg.fit.patience,
                     "fit.weight_decay": cfg.fit.weight_decay, "forecast.aux_weight": cfg.forecast.aux_weight,
                     "series.noise_width": cfg.series.noise_width, "fit.threads": cfg.fit.threads}
    negative = [key for key, value in at_least_zero.items() if value < 0]
    if negative:
        raise ConfigError(f"{', '.join(negative)} must be >= 0")
    if cfg.fit.lr <= 0:
        raise ConfigError(f"fit.lr must be > 0, got {cfg.fit.lr}")
    if min(cfg.fit.train_fraction, cfg.fit.val_fraction) <= 0 or cfg.fit.train_fraction + cfg.fit.val_fraction >= 1:
        raise ConfigError("fit.train_fraction and fit.val_fraction must be > 0 and sum to less than 1 (the test set)")
    if cfg.fit.max_steps == 0 and cfg.fit.max_minutes == 0 and cfg.fit.patience == 0:
        raise ConfigError("fit.max_steps, fit.max_minutes and fit.patience are all 0: training would never stop")


def decomposition_of(series: SeriesConfig) -> Decomposition:
    return Decomposition(window=series.window, method=series.decomposition, trials=series.trials,
                         noise_width=series.noise_width, max_imfs=series.max_imfs, seed=series.decomposition_seed)


def load_values(name: str, series: SeriesConfig) -> np.ndarray:
    """The series' values, limited to the most recent `series.points` points."""
    if name in BUNDLED:
        # the bundled sets know their columns; only a value column set away from the default picks another
        default = SeriesConfig().value_column
        _, values = load_series(name, "" if series.value_column == default else series.value_column)
    else:
        _, values = load_series(name, series.value_column, series.time_column)
    return values[-series.points:] if series.points else values


def prepare(name: str, cfg: ForecastConfig, groups: Groups | None = None) -> tuple[np.ndarray, ForecastExamples]:
    """Loads `name` and builds its examples for cfg.forecast.mode: (values used, examples)."""
    values = load_values(name, cfg.series)
    cache = None if cfg.fit.cache_dir == "none" else Path(cfg.fit.cache_dir) if cfg.fit.cache_dir else default_cache_dir()
    examples = build_examples(values, mode=cfg.forecast.mode, lag=cfg.series.lag, horizon=cfg.series.horizon,
                              spec=decomposition_of(cfg.series),
                              fractions=(cfg.fit.train_fraction, cfg.fit.val_fraction), grouping=cfg.series.grouping,
                              threshold=cfg.series.threshold, groups=groups, cache_dir=cache)
    return values, examples


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"fit.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("fit.device: cuda requested but no CUDA device is available")
    return device


def identity(name: str, values: np.ndarray, cfg: ForecastConfig) -> dict[str, Any]:
    """What must match for a run dir to be continued: data, task, model and sampling."""
    return {"series": name, "series_sha256": series_fingerprint(values), "series_config": dataclasses.asdict(cfg.series),
            "forecast": dataclasses.asdict(cfg.forecast), "seed": cfg.fit.seed, "batch_size": cfg.fit.batch_size,
            "lr": cfg.fit.lr, "weight_decay": cfg.fit.weight_decay, "eval_every": cfg.fit.eval_every,
            "fractions": [cfg.fit.train_fraction, cfg.fit.val_fraction]}


def forecast(name: str, cfg: ForecastConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Trains (or continues) and scores one forecaster; returns the result that the CLI prints."""
    started = time.monotonic()
    checkpointer = Checkpointer(RunPaths(run_dir).checkpoints, keep=cfg.fit.keep) if run_dir else None
    loaded = checkpointer.load_latest() if checkpointer else None
    state = loaded[0] if loaded else None
    stored_groups = Groups(**state["groups"]) if state and state["groups"] else None
    values, examples = prepare(name, cfg, stored_groups)
    run_identity = identity(name, values, cfg)
    if state is not None and state["identity"] != run_identity:
        changed = sorted(k for k in run_identity if state["identity"].get(k) != run_identity[k])
        raise ConfigError(f"run dir {run_dir} holds a different run (differs in: {', '.join(changed)}); "
                          f"use another --run-dir")
    device = pick_device(cfg.fit.device)
    threads = torch.get_num_threads()
    if cfg.fit.threads:
        torch.set_num_threads(cfg.fit.threads)
    try:
        return _train_and_score(name, cfg, run_dir, started, values, examples, state, run_identity, checkpointer, device)
    finally:
        torch.set_num_threads(threads)


def _train_and_score(name: str, cfg: ForecastConfig, run_dir: Path | None, started: float, values: np.ndarray,
                     examples: ForecastExamples, state: dict[str, Any] | None, run_identity: dict[str, Any],
                     checkpointer: Checkpointer | None, device: torch.device) -> dict[str, Any]:
    trainer = _Fit(examples, cfg, device, state)

    def save() -> None:
        if checkpointer is not None and trainer.model.trunk is not None:
            checkpointer.save({**trainer.state_dict(), "identity": run_identity,
                               "groups": examples.groups.as_dict() if examples.groups else None}, trainer.step)

    trainer.train(save)
    test = examples.test
    forecasts = trainer.predict(examples.inputs[test])
    errors = forecast_errors(examples.main_in_units(forecasts), examples.main_in_units(examples.targets[test, 0]))
    published = _publish(run_dir, name, cfg, examples, trainer, errors) if run_dir else None
    groups = None
    if examples.groups is not None:
        groups = {**examples.groups.as_dict(), "components": decomposition_of(cfg.series).component_names()}
    return {
        "series": name, "mode": cfg.forecast.mode, "lag": cfg.series.lag, "horizon": cfg.series.horizon,
        "window": cfg.series.window, "points": len(values), "test_points": test.stop - test.start,
        "nrmse": round(errors["nrmse"], 6), "rmse": round(errors["rmse"], 6), "mae": round(errors["mae"], 6),
        "nrmse_definition": NRMSE_DEFINITION, "groups": groups, "steps": trainer.step, "best_step": trainer.best_step,
        "best_val_mse": None if trainer.best_val == float("inf") else round(trainer.best_val, 6),
        "stopped_early": trainer.stopped_early, "resumed": state is not None, "seed": cfg.fit.seed,
        "device": str(device), "published": published, "decomposition_seconds": round(examples.decomposition_seconds, 1),
        "seconds": round(time.monotonic() - started, 1),
    }


class _Fit:
    """The training loop's state: model, optimizer, batch sampler, best model so far, counters."""

    def __init__(self, examples: ForecastExamples, cfg: ForecastConfig, device: torch.device,
                 state: dict[str, Any] | None) -> None:
        self.cfg, self.device, self.examples = cfg, device, examples
        torch.manual_seed(cfg.fit.seed)
        self.model = Forecaster(examples.inputs.shape[1], cfg.series.lag, examples.targets.shape[1] - 1,
                                **dataclasses.asdict(cfg.forecast)).to(device)
        self.inputs = torch.from_numpy(examples.inputs).to(device)
        self.targets = torch.from_numpy(examples.targets).to(device)
        # batch indices come from a CPU generator of their own: its state is part of the checkpoint
        self.sampler = torch.Generator().manual_seed(cfg.fit.seed)
        self.optimizer = (torch.optim.Adam(self.model.parameters(), lr=cfg.fit.lr, weight_decay=cfg.fit.weight_decay)
                          if self.model.trunk is not None else None)
        self.step, self.best_step, self.best_val, self.checks_since_best = 0, 0, float("inf"), 0
        self.stopped_early, self.train_seconds = False, 0.0
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if state is not None:
            self.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.get_state(), "best_state": self.best_state, "best_step": self.best_step,
                "best_val": self.best_val, "checks_since_best": self.checks_since_best,
                "stopped_early": self.stopped_early, "train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.set_state(state["sampler"])
        self.best_state = {k: v.to(self.device) for k, v in state["best_state"].items()}
        self.step, self.best_step, self.best_val = state["step"], state["best_step"], state["best_val"]
        self.checks_since_best, self.stopped_early = state["checks_since_best"], state["stopped_early"]
        self.train_seconds = state["train_seconds"]
        log.info("resumed at step %d (best validation MSE %.5f at step %d)", self.step, self.best_val, self.best_step)

    def done(self) -> bool:
        return self.stopped_early or bool(self.cfg.fit.max_steps and self.step >= self.cfg.fit.max_steps)

    def train(self, save: Callable[[], None]) -> None:
        """Runs steps until done or this invocation's time budget is spent; `save` checkpoints.

        Validation checks happen at multiples of `fit.eval_every` only, never where a time budget or
        `--max-steps` happens to end: a resumed (or extended) run checks at the same steps as a straight
        one, so it keeps the same best model. Steps after the last check count only if no check happened
        at all (then the current model is scored); use a max_steps that is a multiple of eval_every.
        """
        if self.model.trunk is None:  # persistence: nothing to learn
            return
        fit = self.cfg.fit
        train = self.examples.train
        deadline = time.monotonic() + fit.max_minutes * 60 if fit.max_minutes else float("inf")
        began, saved_step = time.monotonic(), self.step
        self.model.train()
        while not self.done() and time.monotonic() < deadline:
            index = torch.randint(train.start, train.stop, (fit.batch_size,), generator=self.sampler).to(self.device)
            loss, _ = self.model(self.inputs[index], self.targets[index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            if self.step % fit.eval_every == 0:
                self._check()
                self.train_seconds += time.monotonic() - began
                began, saved_step = time.monotonic(), self.step
                save()
        self.train_seconds += time.monotonic() - began
        if self.step != saved_step:  # a rerun of a finished run changes nothing and writes nothing
            save()

    @torch.no_grad()
    def _check(self) -> None:
        """Validation MSE of the main forecast; keeps the best model; early stopping."""
        val = self.examples.val
        self.model.eval()
        error = self.model.predict(self.inputs[val]) - self.targets[val, 0]
        self.model.train()
        mse = float((error.float() ** 2).mean())  # one host sync per check, not per step
        if mse < self.best_val:
            self.best_val, self.best_step, self.checks_since_best = mse, self.step, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.checks_since_best += 1
            if self.cfg.fit.patience and self.checks_since_best >= self.cfg.fit.patience:
                self.stopped_early = True
        log.info("step %d: validation MSE %.5f (best %.5f at step %d)", self.step, mse, self.best_val, self.best_step)

    @torch.no_grad()
    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Main forecasts (normalised) of the best model so far (the current one before any check)."""
        model = self.model
        if model.trunk is not None and self.best_step:
            model = Forecaster(self.model.in_channels, self.model.lag, self.model.n_aux,
                               **dataclasses.asdict(self.cfg.forecast)).to(self.device)
            model.load_state_dict(self.best_state)
        model.eval()
        return model.predict(torch.from_numpy(inputs).to(self.device)).float().cpu().numpy()

    def best_trunk(self) -> torch.nn.Module:
        model = Forecaster(self.model.in_channels, self.model.lag, self.model.n_aux, **dataclasses.asdict(self.cfg.forecast))
        model.load_state_dict({k: v.cpu() for k, v in (self.best_state if self.best_step else
                                                        self.model.state_dict()).items()})
        return model.encoder()


def _publish(run_dir: Path, name: str, cfg: ForecastConfig, examples: ForecastExamples, trainer: _Fit,
             errors: dict[str, float]) -> int | None:
    """Publishes the best model's trunk unless this step is already published; returns the version or None."""
    if trainer.model.trunk is None:
        return None
    publisher = Publisher(RunPaths(run_dir).published)
    if publisher.latest_step() == trainer.step:
        return publisher.latest_version()
    spec = decomposition_of(cfg.series)
    manifest = {
        "step": trainer.step, "best_step": trainer.best_step, "samples_seen": trainer.step * cfg.fit.batch_size,
        "method": "forecast", "mode": cfg.forecast.mode, "backbone": f"forecaster-{cfg.forecast.trunk}",
        "feature_dim": cfg.forecast.hidden, "series": name,
        "input": {"channels": len(examples.channels), "channel_names": examples.channels, "lag": cfg.series.lag,
                  "window": cfg.series.window, "horizon": cfg.series.horizon,
                  "mean": examples.input_mean.tolist(), "std": examples.input_std.tolist()},
        "targets": {"names": examples.target_names, "mean": examples.target_mean.tolist(),
                    "std": examples.target_std.tolist()},
        "groups": examples.groups.as_dict() if examples.groups else None,
        "decomposition": {**dataclasses.asdict(spec), "backend": examples.decomposition_backend or spec.backend},
        "eval": {**errors, "test_points": examples.test.stop - examples.test.start,
                                                            "nrmse_definition": NRMSE_DEFINITION},
    }
    version, _ = publisher.publish(trainer.best_trunk(), manifest)
    return version


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Adds the `forecast` sub-command to an argparse subparsers object."""
    parser = commands.add_parser("forecast", help="train and score a self-boosted forecaster on one series (JSON)")
    parser.add_argument("--series", required=True, help="electricity | temperature | exchange | a .csv/.parquet file")
    parser.add_argument("--mode", choices=MODES, help="combined (default) | mtl | mtv | single | persistence")
    parser.add_argument("--lag", type=int, help="past points fed to the model (series.lag, default 12)")
    parser.add_argument("--horizon", type=int, help="steps ahead (series.horizon, default 1)")
    parser.add_argument("--points", type=int, help="use the most recent N points (series.points, default 4000; 0 = all)")
    parser.add_argument("--max-steps", type=int, help="total training steps for the run dir (fit.max_steps)")
    parser.add_argument("--max-minutes", type=float, help="training time of this invocation (fit.max_minutes)")
    parser.add_argument("--seed", type=int, help="model initialisation and batch order (fit.seed)")
    parser.add_argument("--run-dir", help="checkpoints (a rerun continues) and the published trunk")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="series.*, forecast.* or fit.* value, e.g. --set series.trials=20 (repeatable)")
    return parser


def run(args: argparse.Namespace) -> int:
    """The `forecast` command: prints one JSON line; bad arguments raise ConfigError / SourceError."""
    cfg = load_forecast_config({"forecast.mode": args.mode, "series.lag": args.lag, "series.horizon": args.horizon,
                                "series.points": args.points, "fit.max_steps": args.max_steps,
                                "fit.max_minutes": args.max_minutes, "fit.seed": args.seed}, args.set)
    result = forecast(args.series, cfg, Path(args.run_dir) if args.run_dir else None)
    print(json.dumps(result))
    return 0

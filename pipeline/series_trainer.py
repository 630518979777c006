"""The continuous time-series job, `streamssl run --method forecast|cpc`: points in, models trained as they arrive.

Source (`data.source`: a Parquet/Arrow/CSV file or a growing directory of them, `kafka://…` records
`{"series_id", "timestamp", "value"}`, or "" for the demo: the electricity series as Parquet files in the
cache) → per-series incremental windows (`pipeline.series_window`, its rule for late and duplicate points)
→ one of:

* `forecast` (the self-boosted forecaster, `models.forecaster`), prequential ("predict first, then
  learn"; Dawid 1984): when point e of a series arrives, the forecast made at origin t = e - h by the model
  of that moment is scored against it (rolling nRMSE over the last `series.eval_points` scored points, next
  to the persistence forecast's on the same points), then (inputs of t, targets at e) joins the training
  batch, and a full batch is one Adam step. Then the inputs of origin e are built and forecast. Examples
  follow `pipeline.series_examples`: inputs are the last `lag` values and the view components of the
  trailing window ending at t, auxiliary targets the aux components of the trailing window ending at e,
  so nothing is computed from points after the time it is used at.
* `cpc` (`models.cpc`): every `series.points_per_step` new points, one step on `series.batch_size`
  windows drawn at random from each series' last `series.history` points.

Each series' first `series.warmup_points` points fix its z-score statistics (frozen, checkpointed,
published); the decomposition (EEMD) runs on z-scored windows, so components share the series' scale.
The grouping of components into auxiliary targets and views is decided once, on windows inside the first
completed warm-up. Checkpoints hold everything the next point depends on (model, optimizer, windows,
pending forecasts, partial batch, rolling errors, statistics, grouping, RNGs, source position), so N steps
in one go equal N/2 + N/2 across a restart, bit for bit. Single process: the data rate is points, not
images; a thread reads the source so that a stop request is never stuck behind a waiting source.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from streamssl.models.forecaster import Forecaster
from streamssl.monitoring.metrics import Metrics
from streamssl.pipeline.checkpoint import Checkpointer
from streamssl.pipeline.config import ConfigError, to_dict
from streamssl.pipeline.data import dead_letter_topic, source_factory
from streamssl.pipeline.deadletter import DeadLetters
from streamssl.pipeline.forecast import decomposition_of
from streamssl.pipeline.publish import Publisher
from streamssl.pipeline.series_examples import NRMSE_DEFINITION, USES_AUX, USES_VIEWS, Groups, decide_groups, forecast_errors
from streamssl.pipeline.series_window import SeriesWindows
from streamssl.pipeline.trainer import RunState, resolve_device
from streamssl.streams.records import SourceError
from streamssl.streams.series_source import ParquetSeriesSource, PointReader, demo_series

log = logging.getLogger(__name__)

GROUPING_WINDOWS = 64  # warm-up windows decomposed to decide the grouping (evenly spread over the warm-up)
LOOKAHEAD = 256  # messages taken at once, so that their windows are decomposed in one batched call


def series_source_factory(cfg: Any) -> Callable[..., Any]:
    """`make_source(on_reject=…)` for `data.source`; builds one first so that a bad path fails before any write."""
    data, series = cfg.data, cfg.series
    if data.source.startswith("kafka://"):
        return source_factory(data, cfg.train.seed, cfg.kafka)
    if data.mode == "cycle":
        raise ConfigError("data.mode cycle would replay old timestamps into a series; use once or follow")
    spec = data.source or str(demo_series())
    mode = data.mode if data.mode != "auto" else "follow" if data.source and Path(spec).is_dir() else "once"
    make = partial(ParquetSeriesSource, spec, mode=mode, poll_seconds=data.poll_seconds, time_column=series.time_column,
                   value_column=series.value_column, series_column=series.series_column)
    make().close()
    return make


def validate_series(cfg: Any) -> None:
    s = cfg.series
    if cfg.method not in ("forecast", "cpc"):
        raise ConfigError(f"the series job runs forecast or cpc, not {cfg.method!r}")
    if min(s.window, s.lag, s.horizon, s.batch_size, s.points_per_step, s.max_imfs, s.trials) < 1 or s.eval_points < 2:
        raise ConfigError("series.window, lag, horizon, batch_size, points_per_step, max_imfs, trials must be >= 1 "
                          "and series.eval_points >= 2")
    if not s.lag <= s.window <= s.warmup_points:
        raise ConfigError(f"need series.lag <= series.window <= series.warmup_points, got {s.lag}, {s.window}, "
                          f"{s.warmup_points}")
    if cfg.method == "cpc" and s.history < s.window:
        raise ConfigError(f"series.history {s.history} must be at least series.window {s.window}")
    if s.lr <= 0:
        raise ConfigError(f"series.lr must be > 0, got {s.lr}")


class SeriesJob:
    """One continuous forecast / CPC run in `cfg.run_dir`; `run()` trains until stopped and returns its state."""

    def __init__(self, cfg: Any, stop: threading.Event | None = None) -> None:
        validate_series(cfg)
        self.cfg, self.stop, s = cfg, stop or threading.Event(), cfg.series
        self.options = cfg.method_options() if getattr(cfg, cfg.method, None) is not None else {}
        self.forecasting = cfg.method == "forecast"
        self.mode = self.options.get("mode", "combined") if self.forecasting else ""
        if self.mode == "persistence":
            raise ConfigError("forecast.mode persistence has nothing to train (its rolling nRMSE is reported next to "
                              "every other mode's as rolling_nrmse_persistence)")
        self.make_source = series_source_factory(cfg)  # first: a missing path fails before anything is written
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.device = resolve_device(cfg.train.device)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)
        self.uses_aux, self.uses_views = self.mode in USES_AUX, self.mode in USES_VIEWS
        self.spec = decomposition_of(s)
        self.eemd: Any = None
        if self.uses_aux or self.uses_views:
            from streamssl.models.eemd import RollingEEMD

            self.eemd = RollingEEMD(method=self.spec.method, trials=self.spec.trials, noise_width=self.spec.noise_width,
                                    max_imfs=self.spec.max_imfs, processes=s.processes, seed=self.spec.seed,
                                    backend=self.spec.backend)
        self.metrics = Metrics(cfg.method)
        self.dead_letter_topic = topic = dead_letter_topic(cfg.data, cfg.kafka)
        forward = None if topic is None else (
            lambda source, key, reason, detail, payload: topic.send(key, payload, reason, detail, source))
        self.dead_letters = DeadLetters(self.run_dir / "dead-letter.jsonl", self.metrics, forward)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep)
        self.publisher = Publisher(self.run_dir / "published")
        self.windows = SeriesWindows(s.window if self.forecasting else s.history, self.dead_letters.reject)
        self.sampler = torch.Generator().manual_seed(cfg.train.seed)  # cpc: which windows a step trains on
        self.state, self.points_seen, self.last_logs = RunState(), 0, {}
        self.warmup: dict[str, list[float]] = {}  # values of series still in their warm-up
        self.norm: dict[str, tuple[float, float]] = {}  # frozen (mean, std) per series
        self.groups: Groups | None = None
        self.model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        # forecast: per series, origins waiting for their target: (origin index, inputs, forecast, last value)
        self.pending: dict[str, deque[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
        self.batch: list[tuple[torch.Tensor, torch.Tensor]] = []  # (inputs, targets) not trained on yet
        self.scored = torch.zeros(s.eval_points, 3, device=self.device)  # rows: forecast, target, persistence (z)
        self.scored_count, self.points_since_step = 0, 0
        self._checkpointed_position: dict[str, Any] = {}
        self.reader: PointReader | None = None
        self.ahead: dict[tuple[str, int], np.ndarray] = {}  # decompositions of windows of points not consumed yet
        if self.eemd is None:  # nothing about the model depends on data: build it now, so bad options fail now
            self.build_model()

    # --- the model, built when the first series ends its warm-up (the grouping sets its shape) ---------
    def build_model(self) -> None:
        s = self.cfg.series
        try:
            if self.forecasting:
                views = len(self.groups.views) if self.uses_views else 0
                model = Forecaster(1 + views, s.lag, len(self.groups.aux) if self.uses_aux else 0, **self.options)
            else:
                from streamssl.models.cpc import CPC
                from streamssl.models.series_backbones import build_series_encoder

                backbone, feature_dim = build_series_encoder("conv", channels=1)
                model = CPC(backbone, feature_dim, **self.options)
                if backbone.latent_length(s.window) <= model.prediction_steps:
                    raise ValueError(f"series.window {s.window} gives {backbone.latent_length(s.window)} latents, not more "
                                     f"than prediction_steps {model.prediction_steps}")
        except ValueError as err:  # a model refusing an option value
            raise ConfigError(f"{self.cfg.method}: {err}") from None
        self.model = model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=s.lr)

    def end_warmup(self, sid: str) -> None:
        s = self.cfg.series
        values = np.asarray(self.warmup.pop(sid))
        mean, std = float(values.mean()), float(values.std())
        self.norm[sid] = (mean, std if std > 1e-12 else 1.0)
        if self.model is not None:
            return
        if self.eemd is not None:
            z = (values - mean) / self.norm[sid][1]
            ends = np.unique(np.linspace(s.window - 1, len(z) - 1, GROUPING_WINDOWS).round().astype(np.int64))
            windows = np.stack([z[end - s.window + 1:end + 1] for end in ends])
            self.groups = decide_groups(windows, self.eemd.decompose(windows), s.grouping, s.threshold)
        self.build_model()

    # --- one point ---------------------------------------------------------------------------------
    def consume(self, point: Any) -> bool:
        """Takes one point through the windows and the method; True if a training step was taken."""
        index = self.windows.add(point)
        if index is None:
            return False
        sid = point.series_id
        if sid not in self.norm:
            self.warmup.setdefault(sid, []).append(point.value)
            if index + 1 < self.cfg.series.warmup_points:
                return False
            self.end_warmup(sid)
        return self.forecast_point(sid, index) if self.forecasting else self.cpc_point()

    def forecast_point(self, sid: str, index: int) -> bool:
        """Scores the forecast made for this point, learns from it, then forecasts from it (origin `index`)."""
        s, (mean, std) = self.cfg.series, self.norm[sid]
        window = (self.windows.values(sid, s.window if self.eemd is not None else s.lag) - mean) / std
        components = None
        if self.eemd is not None:
            components = self.ahead.pop((sid, index), None)
            if components is None:
                components = self.eemd.decompose(window[None])[0]
        pending, stepped = self.pending.setdefault(sid, deque()), False
        if pending and pending[0][0] == index - s.horizon:
            _, inputs, forecast, last = pending.popleft()
            row = self.scored_count % len(self.scored)
            self.scored[row, 0] = forecast  # made before the model saw this point: prequential
            self.scored[row, 1:] = torch.tensor([window[-1], last])
            self.scored_count += 1
            aux = components[self.groups.aux, -1] if self.uses_aux else []
            self.batch.append((inputs, torch.tensor([window[-1], *aux], dtype=torch.float32)))
            if len(self.batch) == s.batch_size:
                inputs_batch, targets_batch = (torch.stack(part).to(self.device) for part in zip(*self.batch, strict=True))
                self.batch = []
                stepped = self.train_step(inputs_batch, targets_batch)
        views = [components[k, -s.lag:] for k in self.groups.views] if self.uses_views else []
        inputs = torch.tensor(np.stack([window[-s.lag:], *views]), dtype=torch.float32)
        pending.append((index, inputs, self.model.predict(inputs[None].to(self.device))[0], float(window[-1])))
        return stepped

    def decompose_ahead(self, messages: deque[tuple[Any, ...]]) -> None:
        """Decomposes, in one batched call, the windows the coming points of warmed-up series will end.

        A window's decomposition depends only on its values (`RollingEEMD` is deterministic per window), so
        this equals decomposing each when its point is consumed; batching is just much faster.
        """
        if self.eemd is None:
            return
        preview, keys, windows = self.windows.copy(), [], []
        for message in messages:
            if message[0] != "point" or message[1].series_id not in self.norm:
                continue
            sid, (mean, std) = message[1].series_id, self.norm[message[1].series_id]
            index = preview.add(message[1])
            if index is not None:
                keys.append((sid, index))
                windows.append((preview.values(sid, self.cfg.series.window) - mean) / std)
        self.ahead = dict(zip(keys, self.eemd.decompose(np.stack(windows)), strict=True)) if windows else {}

    def cpc_point(self) -> bool:
        self.points_since_step += 1
        if self.points_since_step < self.cfg.series.points_per_step:
            return False
        self.points_since_step = 0
        return self.train_step([self.sample_windows()])

    def sample_windows(self) -> torch.Tensor:
        """`batch_size` windows [B, 1, W], uniformly over every window inside the kept history of warmed-up series."""
        s = self.cfg.series
        ready = [sid for sid in self.windows.series_ids() if sid in self.norm]
        series = [(self.windows.values(sid) - self.norm[sid][0]) / self.norm[sid][1] for sid in ready]
        counts = np.array([len(values) - s.window + 1 for values in series])
        starts = np.cumsum(counts) - counts
        picks = torch.randint(int(counts.sum()), (s.batch_size,), generator=self.sampler).numpy()
        which = np.searchsorted(starts, picks, side="right") - 1
        windows = [series[w][p - starts[w]:p - starts[w] + s.window] for w, p in zip(which, picks, strict=True)]
        return torch.from_numpy(np.stack(windows)).float()[:, None].to(self.device)

    def train_step(self, *batch: Any) -> bool:
        """One Adam step; False (and skipped) when the loss is not finite."""
        started = time.perf_counter()
        loss, logs = self.model(*batch)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            if not self.forecasting:
                self.model.discard_step()
            self.metrics.skipped_steps.inc()
            log.warning("step %d: non-finite loss, step skipped", self.state.step)
            return False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if not self.forecasting:
            self.model.commit_step()
            self.model.on_step_end(self.state.step)
        samples = len(batch[0]) if self.forecasting else len(batch[0][0])
        self.state.step += 1
        self.state.samples_seen += samples
        self.last_logs = {"loss": loss_value, **{name: float(value) for name, value in logs.items()}}
        self.metrics.observe_step(samples, time.perf_counter() - started, self.cfg.series.lr)
        self.metrics.observe_logs(self.last_logs)
        return True

    def rolling_metrics(self) -> dict[str, float]:
        """nRMSE (RMSE / std of the targets) of the last `eval_points` scored forecasts, and of persistence on them."""
        filled = min(self.scored_count, len(self.scored))
        if filled < 2:
            return {}
        rows = self.scored[:filled].double().cpu().numpy()
        return {"rolling_nrmse": forecast_errors(rows[:, 0], rows[:, 1])["nrmse"],
                "rolling_nrmse_persistence": forecast_errors(rows[:, 2], rows[:, 1])["nrmse"],
                "rolling_points": float(filled)}

    # --- checkpoint / resume / publish ---------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        st = self.state
        return {
            "format": 1, "method_name": self.cfg.method, "step": st.step, "samples_seen": st.samples_seen,
            "checkpoints_written": st.checkpoints_written, "points_seen": self.points_seen, "source": st.position,
            "model": None if self.model is None else self.model.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "windows": self.windows.state_dict(),
            "warmup": {sid: torch.tensor(values, dtype=torch.float64) for sid, values in self.warmup.items()},
            "normalisation": {sid: list(stats) for sid, stats in self.norm.items()},
            "groups": None if self.groups is None else self.groups.as_dict(),
            "pending": {sid: list(entries) for sid, entries in self.pending.items()}, "batch": list(self.batch),
            "scored": self.scored, "scored_count": self.scored_count, "points_since_step": self.points_since_step,
            "rng": {"torch": torch.get_rng_state(), "sampler": self.sampler.get_state()}, "config": to_dict(self.cfg),
        }

    def resume(self) -> None:
        found = self.checkpointer.load_latest(map_location="cpu")
        if found is None:
            return
        ckpt, path = found
        if ckpt.get("method_name") != self.cfg.method:
            raise ConfigError(f"run dir {self.run_dir} holds a '{ckpt.get('method_name')}' run, not '{self.cfg.method}'")
        self.state = RunState(ckpt["step"], ckpt["samples_seen"], ckpt["checkpoints_written"], ckpt["source"], {},
                              self.publisher.latest_step())
        self._checkpointed_position, self.points_seen = ckpt["source"], ckpt["points_seen"]
        self.windows.load_state_dict(ckpt["windows"])
        self.warmup = {sid: values.tolist() for sid, values in ckpt["warmup"].items()}
        self.norm = {sid: (float(mean), float(std)) for sid, (mean, std) in ckpt["normalisation"].items()}
        self.groups = Groups(**ckpt["groups"]) if ckpt["groups"] is not None else None
        if ckpt["model"] is not None:
            if self.model is None:
                self.build_model()  # before the RNG is restored: building draws initial weights
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.pending = {sid: deque((origin, inputs, forecast.to(self.device), last) for origin, inputs, forecast, last
                                   in entries) for sid, entries in ckpt["pending"].items()}
        self.batch = [tuple(example) for example in ckpt["batch"]]
        self.scored = ckpt["scored"].to(self.device)
        self.scored_count, self.points_since_step = ckpt["scored_count"], ckpt["points_since_step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.sampler.set_state(ckpt["rng"]["sampler"])
        log.info("resumed from %s at step %d (%d points seen)", path.name, self.state.step, self.points_seen)

    def save_checkpoint(self) -> None:
        started = time.perf_counter()
        self.state.checkpoints_written += 1
        self.checkpointer.save(self.checkpoint_state(), self.state.step)
        self._checkpointed_position = self.state.position
        self.metrics.observe_checkpoint(time.perf_counter() - started)
        if self.reader is not None:  # durable now: Kafka may move the group's committed offsets up to it
            self.reader.commit(self.state.position)

    def publish(self) -> None:
        """The forecaster's trunk or CPC's pooled encoder, with what a consumer needs to feed it."""
        s, cfg = self.cfg.series, self.cfg
        self.state.eval_metrics = self.rolling_metrics()
        self.metrics.observe_logs(self.state.eval_metrics)
        manifest: dict[str, Any] = {
            "step": self.state.step, "samples_seen": self.state.samples_seen, "method": cfg.method,
            "input": {"channels": 1, "window": s.window, "warmup_points": s.warmup_points,
                      "normalisation": "z-score per series with the mean/std of its first warmup_points points",
                      "series": {sid: {"mean": mean, "std": std} for sid, (mean, std) in sorted(self.norm.items())}},
            "metrics": {**self.state.eval_metrics, **self.last_logs},
        }
        if self.forecasting:
            names = self.spec.component_names()
            channels = ["series"] + ([names[k] for k in self.groups.views] if self.uses_views else [])
            manifest["input"].update(channels=len(channels), channel_names=channels, lag=s.lag, horizon=s.horizon)
            manifest.update(mode=self.mode, backbone=f"forecaster-{self.options.get('trunk', 'cnn')}",
                            feature_dim=self.options.get("hidden", 64), nrmse_definition=NRMSE_DEFINITION,
                            groups=None if self.groups is None else self.groups.as_dict(),
                            decomposition=dataclasses.asdict(self.spec) if self.eemd is not None else None)
        else:
            manifest.update(backbone="series-conv", embedding_dim=self.model.feature_dim)
        version, folder = self.publisher.publish(self.model.encoder(), manifest)
        self.state.published_step = self.state.step
        self.metrics.observe_publish(version)
        log.info("published %s", folder)

    # --- the loop ------------------------------------------------------------------------------------
    def run(self) -> RunState:
        cfg = self.cfg
        if cfg.metrics.port:
            try:
                port = self.metrics.serve(cfg.metrics.port, cfg.metrics.host)
            except OSError as err:
                raise ConfigError(f"cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port} ({err.strerror}); "
                                  "pick another --metrics-port or 0 for none") from None
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.host, port)
        threads = torch.get_num_threads()
        try:
            self.resume()
            if cfg.series.threads and self.device.type == "cpu":
                torch.set_num_threads(cfg.series.threads)
            self.reader = reader = PointReader(self.make_source, self.state.position)
            started = last_checkpoint = last_log = time.monotonic()
            deadline = started + cfg.train.max_minutes * 60 if cfg.train.max_minutes else float("inf")
            logged_points, logged_samples, reason = self.points_seen, self.state.samples_seen, "stop requested"
            inbox: deque[tuple[Any, ...]] = deque()  # taken from the reader, not consumed yet: not part of the position
            while not self.stop.is_set():
                if cfg.train.max_steps and self.state.step >= cfg.train.max_steps:
                    reason = f"reached max_steps {cfg.train.max_steps}"
                    break
                if time.monotonic() >= deadline:
                    reason = f"time budget of {cfg.train.max_minutes} min used"
                    break
                if not inbox:
                    try:
                        inbox.append(reader.messages.get(timeout=0.5))
                    except queue.Empty:
                        continue
                    while len(inbox) < LOOKAHEAD and not reader.messages.empty():
                        inbox.append(reader.messages.get_nowait())
                    self.decompose_ahead(inbox)
                message = inbox.popleft()
                if message[0] == "end":
                    reason = "stream ended"
                    break
                if message[0] == "error":
                    raise SourceError(message[1])
                if message[0] == "reject":
                    self.dead_letters.reject(*message[1:6])
                    self.state.position = message[6]
                    continue
                _, point, self.state.position = message
                self.points_seen += 1
                warmed_up = len(self.norm)
                stepped = self.consume(point)
                if len(self.norm) != warmed_up:  # a series just got its statistics: its coming windows can be decomposed
                    self.decompose_ahead(inbox)
                now = time.monotonic()
                if now - last_log >= cfg.train.log_every_seconds:
                    self.print_progress((self.points_seen - logged_points) / (now - last_log),
                                        (self.state.samples_seen - logged_samples) / (now - last_log))
                    last_log, logged_points, logged_samples = now, self.points_seen, self.state.samples_seen
                every_steps, every_seconds = cfg.checkpoint.every_steps, cfg.checkpoint.every_seconds
                if stepped and ((every_steps and self.state.step % every_steps == 0)
                                or (every_seconds and now - last_checkpoint >= every_seconds)):
                    self.save_checkpoint()
                    last_checkpoint = time.monotonic()
                    if self.state.checkpoints_written % cfg.checkpoint.publish_every == 0:
                        self.publish()
            self.finish(reason)  # while the reader still runs: the final checkpoint's offsets are committed too
        finally:
            torch.set_num_threads(threads)
            if self.reader is not None:
                self.reader.close()
                self.reader = None
            if self.eemd is not None:
                self.eemd.close()
            if self.dead_letter_topic is not None:
                self.dead_letter_topic.close()
            self.metrics.close()
        return self.state

    def finish(self, reason: str) -> None:
        log.info("stopping: %s", reason)
        if self.state.position != self._checkpointed_position:
            self.save_checkpoint()
        if self.model is not None and self.state.published_step != self.state.step:
            self.publish()
        elif self.model is None:
            log.warning("nothing published: no series has finished its warm-up of %d points", self.cfg.series.warmup_points)
        self.state.eval_metrics = self.rolling_metrics()
        nrmse = self.state.eval_metrics.get("rolling_nrmse")
        print(f"done: {reason}; step {self.state.step}, {self.points_seen} points"
              + (f", rolling nRMSE {nrmse:.4f}" if nrmse is not None else ""), flush=True)

    def print_progress(self, points_rate: float, samples_rate: float) -> None:
        rolling = self.rolling_metrics()
        self.metrics.observe_logs(rolling)
        self.metrics.observe_source(self.reader.stats if self.reader is not None else {})
        self.metrics.samples_per_second.set(samples_rate)
        parts = [f"step {self.state.step}", f"{points_rate:.0f} points/s", f"{samples_rate:.0f} samples/s"]
        if rolling:
            parts.append(f"rolling nRMSE {rolling['rolling_nrmse']:.4f} (persistence "
                         f"{rolling['rolling_nrmse_persistence']:.4f}) over {int(rolling['rolling_points'])} points")
        print(" | ".join(parts + [f"{name} {value:.4f}" for name, value in self.last_logs.items()]), flush=True)


def run_series(cfg: Any, stop: threading.Event | None = None) -> RunState:
    """Entry point of `streamssl run --method forecast|cpc`: trains until stopped; returns the run's state."""
    return SeriesJob(cfg, stop).run()

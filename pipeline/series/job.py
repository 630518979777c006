"""The continuous time-series job, `streamssl run --method forecast|cpc`: points in, models trained as they arrive.

Source (`data.source`: a Parquet/Arrow/CSV file or a growing directory of them, `kafka://…` records
`{"series_id", "timestamp", "value"}`, or "" for the demo: the electricity series as Parquet files in the
cache) → per-series incremental windows (`pipeline.series.windows`, its rule for late and duplicate points)
→ one of:

* `forecast` (the self-boosted forecaster, `models.forecaster`), prequential ("predict first, then
  learn"; Dawid 1984): when point e of a series arrives, the forecast made at origin t = e - h by the model
  of that moment is scored against it (rolling nRMSE over the last `series.eval_points` scored points, next
  to the persistence forecast's on the same points), then (inputs of t, targets at e) joins the training
  batch, and a full batch is one Adam step. Then the inputs of origin e are built and forecast. Examples
  follow `pipeline.series.examples`: inputs are the last `lag` values and the view components of the
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
images; a thread reads the source so that a stop request is never stuck behind a waiting source
(pipeline/series/feed.py). The loop around the task (stopping, non-finite steps and rollback, checkpoint and
publish cadence, metrics) is the one every job uses: pipeline/loop.py.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from streamssl.models.encoder_io import Manifest
from streamssl.models.forecaster import Forecaster
from streamssl.pipeline.config import Config, ConfigError
from streamssl.pipeline.device import resolve_device
from streamssl.pipeline.loading.messages import Message, PointMessage
from streamssl.pipeline.loading.positions import Position
from streamssl.pipeline.log_format import ProgressLine
from streamssl.pipeline.loop import Loop
from streamssl.pipeline.run_state import RunState
from streamssl.pipeline.rundir import append_audit
from streamssl.pipeline.series.examples import USES_AUX, USES_VIEWS, Groups, decide_groups, forecast_errors
from streamssl.pipeline.series.feed import PointReader, SeriesFeed, series_source_factory
from streamssl.pipeline.series.forecast import decomposition_of
from streamssl.pipeline.series.manifest import series_manifest
from streamssl.pipeline.series.windows import SeriesWindows
from streamssl.pipeline.task import Feed, Step

if TYPE_CHECKING:
    from streamssl.models.cpc import CPC

log = logging.getLogger(__name__)

GROUPING_WINDOWS = 64  # warm-up windows decomposed to decide the grouping (evenly spread over the warm-up)


class SeriesTask:
    """One continuous forecast / CPC job: the loop hands it points (`PointMessage`) one by one."""

    finished = ""  # a stream of points has no end of its own
    map_location = "cpu"  # pending forecasts and scores are moved to the device where they are used
    quick_eval = True  # rolling errors of the points already scored

    def __init__(self, cfg: Config) -> None:
        self.cfg, s = cfg, cfg.series
        self.options = cfg.method_options()
        self.forecasting = cfg.method == "forecast"
        self.mode = self.options.get("mode", "combined") if self.forecasting else ""
        if self.mode == "persistence":
            raise ConfigError("forecast.mode persistence has nothing to train (its rolling nRMSE is reported next to "
                              "every other mode's as rolling_nrmse_persistence)")
        self.make_source = series_source_factory(cfg)  # first: a missing path fails before anything is written
        self.device = resolve_device(cfg.train.device)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)
        self.uses_aux, self.uses_views = self.mode in USES_AUX, self.mode in USES_VIEWS
        self.spec = decomposition_of(s)
        self.eemd: Any = None
        if self.uses_aux or self.uses_views:
            from streamssl.pipeline.series.eemd import RollingEEMD

            self.eemd = RollingEEMD(method=self.spec.method, trials=self.spec.trials, noise_width=self.spec.noise_width,
                                    max_imfs=self.spec.max_imfs, processes=s.processes, seed=self.spec.seed,
                                    backend=self.spec.backend)
        self.windows = SeriesWindows(s.window if self.forecasting else s.history, self._reject, s.max_series,
                                     self._forget)
        self.series_dropped = 0
        self.sampler = torch.Generator().manual_seed(cfg.train.seed)  # cpc: which windows a step trains on
        self.loop: Loop  # set by attach(), which the loop calls before anything else
        self.points_seen, self._logged_points = 0, 0
        self.last_logs: dict[str, float] = {}
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
        self.feed: SeriesFeed | None = None
        self._threads = 0  # torch's thread count before `open` set series.threads
        self.ahead: dict[tuple[str, int], np.ndarray] = {}  # decompositions of windows of points not consumed yet
        if self.eemd is None:  # nothing about the model depends on data: build it now, so bad options fail now
            self.build_model()

    def attach(self, loop: Loop) -> None:
        self.loop = loop

    @property
    def decided_groups(self) -> Groups:
        """The grouping, for a mode with aux targets or views: decided on the first warm-up, before the model."""
        assert self.groups is not None, "the grouping is decided before the model is built"
        return self.groups

    def _reject(self, source: str, key: str, reason: str, detail: str = "", payload: bytes = b"") -> None:
        self.loop.dead_letters.reject(source, key, reason, detail, payload)

    def _forget(self, sid: str) -> None:
        """Drops what is kept of a series the windows let go (`series.max_series`): it starts afresh if it returns."""
        self.warmup.pop(sid, None)
        self.norm.pop(sid, None)
        self.pending.pop(sid, None)
        self.series_dropped += 1
        if self.series_dropped == 1 or self.series_dropped % 1000 == 0:
            log.warning("series.max_series (%d) reached: dropped series %r, the one updated longest ago (%d dropped "
                        "so far)", self.cfg.series.max_series, sid, self.series_dropped)

    def open(self, position: Position | None) -> Feed:
        threads = self.cfg.series.threads
        if threads and self.device.type == "cpu":
            self._threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        self.feed = SeriesFeed(PointReader(self.make_source, position), self.decompose_ahead)
        return self.feed

    def close(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        self.feed = None
        if self.eemd is not None:
            self.eemd.close()

    # --- the model, built when the first series ends its warm-up (the grouping sets its shape) ---------
    def build_model(self) -> None:
        s = self.cfg.series
        model: Forecaster | CPC
        try:
            if self.forecasting:
                views = len(self.decided_groups.views) if self.uses_views else 0
                model = Forecaster(1 + views, s.lag, len(self.decided_groups.aux) if self.uses_aux else 0, **self.options)
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
    def step(self, message: PointMessage) -> Step | None:
        """Takes one point through the windows and the method; the training step it completed, if any."""
        self.points_seen += 1
        warmed_up = len(self.norm)
        result = self.consume(message.point)
        if len(self.norm) != warmed_up and self.feed is not None:  # a series just got its statistics:
            self.decompose_ahead(self.feed.inbox)  # the coming windows can be decomposed
        return result

    def consume(self, point: Any) -> Step | None:
        index = self.windows.add(point)
        if index is None:
            return None
        if self.cfg.train.audit_keys:  # the image audit trail's equivalent: a point twice is a duplicate delivery
            append_audit(self.loop.paths.trained_keys, self.loop.state.step, [f"{point.series_id}@{point.timestamp!r}"])
        sid = point.series_id
        if sid not in self.norm:
            self.warmup.setdefault(sid, []).append(point.value)
            if index + 1 < self.cfg.series.warmup_points:
                return None
            self.end_warmup(sid)
        return self.forecast_point(sid, index) if self.forecasting else self.cpc_point()

    def forecast_point(self, sid: str, index: int) -> Step | None:
        """Scores the forecast made for this point, learns from it, then forecasts from it (origin `index`)."""
        s, (mean, std) = self.cfg.series, self.norm[sid]
        window = (self.windows.values(sid, s.window if self.eemd is not None else s.lag) - mean) / std
        aux: np.ndarray | list[float] = []  # what the window's decomposition gives: aux targets, input views
        views: list[np.ndarray] = []
        if self.eemd is not None:
            components = self.ahead.pop((sid, index), None)
            if components is None:
                components = self.eemd.decompose(window[None])[0]
            aux = components[self.decided_groups.aux, -1] if self.uses_aux else []
            views = [components[k, -s.lag:] for k in self.decided_groups.views] if self.uses_views else []
        pending, stepped = self.pending.setdefault(sid, deque()), None
        if pending and pending[0][0] == index - s.horizon:
            _, inputs, forecast, last = pending.popleft()
            row = self.scored_count % len(self.scored)
            self.scored[row, 0] = forecast  # made before the model saw this point: prequential
            self.scored[row, 1:] = torch.tensor([window[-1], last])
            self.scored_count += 1
            self.batch.append((inputs, torch.tensor([window[-1], *aux], dtype=torch.float32)))
            if len(self.batch) == s.batch_size:
                inputs_batch, targets_batch = (torch.stack(part).to(self.device) for part in zip(*self.batch, strict=True))
                self.batch = []
                stepped = self.train_step(inputs_batch, targets_batch)
        inputs = torch.tensor(np.stack([window[-s.lag:], *views]), dtype=torch.float32)
        pending.append((index, inputs, self.model.predict(inputs[None].to(self.device))[0], float(window[-1])))
        return stepped

    def decompose_ahead(self, messages: deque[Message]) -> None:
        """Decomposes, in one batched call, the windows the coming points of warmed-up series will end.

        A window's decomposition depends only on its values (`RollingEEMD` is deterministic per window), so
        this equals decomposing each when its point is consumed; batching is just much faster.
        """
        if self.eemd is None:
            return
        preview, keys, windows = self.windows.copy(), [], []
        for message in messages:
            if not isinstance(message, PointMessage) or message.point.series_id not in self.norm:
                continue
            sid, (mean, std) = message.point.series_id, self.norm[message.point.series_id]
            index = preview.add(message.point)
            if index is not None:
                keys.append((sid, index))
                windows.append((preview.values(sid, self.cfg.series.window) - mean) / std)
        self.ahead = dict(zip(keys, self.eemd.decompose(np.stack(windows)), strict=True)) if windows else {}

    def cpc_point(self) -> Step | None:
        self.points_since_step += 1
        if self.points_since_step < self.cfg.series.points_per_step:
            return None
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

    def train_step(self, *batch: Any) -> Step:
        """One Adam step; not taken (finite=False) when the loss is not finite."""
        assert self.optimizer is not None, "build_model makes the optimizer with the model"
        loss, logs = self.model(*batch)
        loss_value = float(loss.detach())
        samples = len(batch[0]) if self.forecasting else len(batch[0][0])
        if not math.isfinite(loss_value):
            if not self.forecasting:
                self.model.discard_step()
            return Step(loss_value, {}, samples, self.cfg.series.lr, finite=False)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if not self.forecasting:
            self.model.commit_step()
            self.model.on_step_end(self.loop.state.step)
        logs = {name: float(value) for name, value in logs.items()}
        self.last_logs = {"loss": loss_value, **logs}
        return Step(loss_value, logs, samples, self.cfg.series.lr)

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "points_seen": self.points_seen,
            "model": None if self.model is None else self.model.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "windows": self.windows.state_dict(),
            "warmup": {sid: torch.tensor(values, dtype=torch.float64) for sid, values in self.warmup.items()},
            "normalisation": {sid: list(stats) for sid, stats in self.norm.items()},
            "groups": None if self.groups is None else self.groups.as_dict(),
            "pending": {sid: list(entries) for sid, entries in self.pending.items()}, "batch": list(self.batch),
            "scored": self.scored, "scored_count": self.scored_count, "points_since_step": self.points_since_step,
            "rng": {"torch": torch.get_rng_state(), "sampler": self.sampler.get_state()},
        }

    def upgrade(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        return ckpt  # one layout so far

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.points_seen = self._logged_points = ckpt["points_seen"]
        self.windows.load_state_dict(ckpt["windows"])
        self.warmup = {sid: values.tolist() for sid, values in ckpt["warmup"].items()}
        self.norm = {sid: (float(mean), float(std)) for sid, (mean, std) in ckpt["normalisation"].items()}
        self.groups = Groups(**ckpt["groups"]) if ckpt["groups"] is not None else None
        if ckpt["model"] is not None and self.model is None:
            self.build_model()  # before the RNG is restored: building draws initial weights
        self.pending = {sid: deque((origin, inputs, forecast.to(self.device), last) for origin, inputs, forecast, last
                                   in entries) for sid, entries in ckpt["pending"].items()}
        self.batch = [tuple(example) for example in ckpt["batch"]]
        self.scored = ckpt["scored"].to(self.device)
        self.scored_count, self.points_since_step = ckpt["scored_count"], ckpt["points_since_step"]
        self.roll_back(ckpt)

    def roll_back(self, ckpt: dict[str, Any]) -> None:
        """The checkpoint's model, optimizer and RNGs; the windows and pending forecasts stay where the stream is."""
        if ckpt["model"] is not None:
            assert self.optimizer is not None, "a checkpoint with a model: ours is built too (load_state_dict sees to it)"
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.sampler.set_state(ckpt["rng"]["sampler"])

    # --- evaluation and publishing -------------------------------------------------------------------
    def rolling_metrics(self) -> dict[str, float]:
        """nRMSE (RMSE / std of the targets) of the last `eval_points` scored forecasts, and of persistence on them."""
        filled = min(self.scored_count, len(self.scored))
        if filled < 2:
            return {}
        rows = self.scored[:filled].double().cpu().numpy()
        return {"rolling_nrmse": forecast_errors(rows[:, 0], rows[:, 1])["nrmse"],
                "rolling_nrmse_persistence": forecast_errors(rows[:, 2], rows[:, 1])["nrmse"],
                "rolling_points": float(filled)}

    def evaluate(self) -> dict[str, float]:
        metrics = self.rolling_metrics()
        self.loop.metrics.observe_logs(metrics)
        return metrics

    def encoder(self) -> torch.nn.Module | None:
        """The forecaster's trunk or CPC's pooled encoder; None before any series has finished its warm-up."""
        if self.model is None:
            log.warning("nothing published: no series has finished its warm-up of %d points", self.cfg.series.warmup_points)
            return None
        return self.model.encoder()

    def manifest(self) -> Manifest:
        return series_manifest(self)

    # --- what the loop prints --------------------------------------------------------------------------
    def progress(self, samples_rate: float, seconds: float, loss: float, logs: dict[str, float]) -> str:
        points_rate, self._logged_points = (self.points_seen - self._logged_points) / seconds, self.points_seen
        rolling = self.evaluate()
        self.loop.metrics.observe_source(self.feed.stats if self.feed is not None else {})
        parts = [f"step {self.loop.state.step}", f"{points_rate:.0f} points/s", f"{samples_rate:.0f} samples/s"]
        if rolling:
            parts.append(f"rolling nRMSE {rolling['rolling_nrmse']:.4f} (persistence "
                         f"{rolling['rolling_nrmse_persistence']:.4f}) over {int(rolling['rolling_points'])} points")
        return ProgressLine(" | ".join(parts + [f"{name} {value:.4f}" for name, value in self.last_logs.items()]),
                            points_per_second=points_rate, **rolling)

    def summary(self) -> str:
        nrmse = self.rolling_metrics().get("rolling_nrmse")
        return f", {self.points_seen} points" + (f", rolling nRMSE {nrmse:.4f}" if nrmse is not None else "")


class SeriesJob(Loop):
    """The loop driving a `SeriesTask`: `SeriesJob(cfg).run()` is `streamssl run --method forecast|cpc`."""

    def __init__(self, cfg: Config, stop: threading.Event | None = None, **loop_options: Any) -> None:
        super().__init__(cfg, SeriesTask(cfg), stop, **loop_options)


def run_series(cfg: Config, stop: threading.Event | None = None) -> RunState:
    """Entry point of `streamssl run --method forecast|cpc`: trains until stopped; returns the run's state."""
    return SeriesJob(cfg, stop).run()

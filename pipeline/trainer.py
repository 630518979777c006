"""The training loop: stream → batched augment → method step, with checkpoints, eval, publishing, metrics.

Stopping (SIGINT/SIGTERM via `stop`, max_steps, max_minutes, end of a finite stream) always ends
the same way: the current step finishes, then eval, checkpoint, publish. Resuming from the run
dir restores model, optimizer, method buffers, RNGs and the stream position, so N steps in one go
and N/2 + N/2 across a restart train on the same samples with the same views.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from streamssl.models import build_backbone, build_method
from streamssl.monitoring.metrics import Metrics
from streamssl.pipeline.augment import BatchAugment
from streamssl.pipeline.checkpoint import Checkpointer
from streamssl.pipeline.config import Config, ConfigError, to_dict
from streamssl.pipeline.data import dead_letter_topic, knn_sets, source_factory
from streamssl.pipeline.deadletter import DeadLetters
from streamssl.pipeline.knn import knn_top1
from streamssl.pipeline.loader import Batch, BatchLoader
from streamssl.pipeline.optim import build_optimizer, set_learning_rate
from streamssl.pipeline.publish import Publisher
from streamssl.pipeline.schedule import HorizonEstimate, learning_rate, warmup_length

log = logging.getLogger(__name__)


class TrainingDiverged(Exception):
    """The loss stayed non-finite after every allowed rollback; the CLI prints it as one line."""


@dataclass
class RunState:
    """Counters that go into every checkpoint next to the model."""

    step: int = 0
    samples_seen: int = 0
    checkpoints_written: int = 0
    position: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    published_step: int = -1
    # The schedule: the step the LR anneals to (0 = none) and where the current cycle began (a time-bounded
    # invocation that resumes a finished schedule starts a new cycle: a warm restart).
    horizon_steps: int = 0
    cycle_start: int = 0


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 autocast where the hardware runs it natively (≈2× the fp32 step on such CPUs), else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: Config, stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or threading.Event()
        # First: a missing data path must fail before anything is written into the run dir.
        self.make_source = source_factory(cfg.data, cfg.train.seed, cfg.kafka)
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.device = resolve_device(cfg.train.device)
        self.autocast = resolve_precision(cfg.train.precision, self.device) == "bf16"
        if cfg.train.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic; it must be set before its first use.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)

        backbone, self.feature_dim = build_backbone(cfg.model.backbone, cfg.data.channels, bn_splits=cfg.model.bn_splits)
        try:
            method = build_method(cfg.method, backbone, self.feature_dim, cfg.method_options(), dataclasses.asdict(cfg.aux))
        except ValueError as err:  # a method refusing an option value
            raise ConfigError(f"{cfg.method}: {err}") from None
        self.method = method.to(self.device)
        if cfg.train.channels_last:
            self.method.to(memory_format=torch.channels_last)
        # What train_step calls: the method itself, or (pipeline/distributed.py) a DDP wrapper around it.
        self.forward_module: torch.nn.Module = self.method
        self.base_lr = cfg.optim.lr * cfg.train.batch_size / 256  # linear scaling rule
        self.optimizer = build_optimizer(cfg.optim.name, self.method.param_groups(), self.base_lr, cfg.optim.momentum,
                                         cfg.optim.weight_decay)
        self._horizon_estimate: HorizonEstimate | None = None
        # What gets published: the encoder itself, or a weight EMA of it (train.ema_decay).
        self.encoder_ema = (None if not cfg.train.ema_decay else torch.optim.swa_utils.AveragedModel(
            self.method.encoder(), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.train.ema_decay),
            use_buffers=True))
        self.augment = BatchAugment(cfg.augment, cfg.data.mean, cfg.data.std, cfg.data.size)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed)

        self.metrics = Metrics(cfg.method)
        self.dead_letter_topic = dead_letter_topic(cfg.data, cfg.kafka)
        forward = None if self.dead_letter_topic is None else (
            lambda source, key, reason, detail, payload: self.dead_letter_topic.send(key, payload, reason, detail, source))
        self.dead_letters = DeadLetters(self.run_dir / "dead-letter.jsonl", self.metrics, forward)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep)
        self.publisher = Publisher(self.run_dir / "published")
        self.state = RunState()
        self._knn_data: tuple[torch.Tensor, ...] | None = None
        self._knn_baselines: dict[str, float] | None = None
        self.metrics_port = 0
        self.loop_seconds = 0.0
        self.startup_seconds = 0.0  # of loop_seconds, until the first batch arrived (connecting, joining, first fetch)
        self._checkpointed_step = -1
        self._nonfinite_in_a_row = 0
        self._rollbacks = 0
        self.loader: BatchLoader | None = None

    # --- checkpoint / resume -------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "augment": self.generator.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": 1, "method_name": self.cfg.method, "step": self.state.step,
            "samples_seen": self.state.samples_seen, "checkpoints_written": self.state.checkpoints_written,
            "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "encoder_ema": None if self.encoder_ema is None else self.encoder_ema.state_dict(),
            # the LR is a pure function of step and horizon
            "schedule": {"base_lr": self.base_lr, "step": self.state.step, "horizon_steps": self.state.horizon_steps,
                         "cycle_start": self.state.cycle_start},
            "source": self.state.position, "rng": rng, "eval_metrics": self.state.eval_metrics,
            "config": to_dict(self.cfg),
        }

    def resume(self) -> bool:
        found = self.checkpointer.load_latest(map_location=self.device)
        if found is None:
            return False
        ckpt, path = found
        if ckpt.get("method_name") != self.cfg.method:
            raise ConfigError(f"run dir {self.run_dir} holds a '{ckpt.get('method_name')}' run, not '{self.cfg.method}'")
        self._restore(ckpt)
        schedule = ckpt.get("schedule", {})
        self.state = RunState(ckpt["step"], ckpt["samples_seen"], ckpt["checkpoints_written"], ckpt["source"],
                              dict(ckpt["eval_metrics"]), self.publisher.latest_step(),
                              schedule.get("horizon_steps", 0), schedule.get("cycle_start", 0))
        self._checkpointed_step = self.state.step
        log.info("resumed from %s at step %d (%d samples seen)", path.name, self.state.step, self.state.samples_seen)
        return True

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.encoder_ema is not None:
            if ckpt.get("encoder_ema") is not None:
                self.encoder_ema.load_state_dict(ckpt["encoder_ema"])
            else:  # train.ema_decay switched on for a run that had none: the average starts from here
                self.encoder_ema.n_averaged.zero_()
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        self.generator.set_state(ckpt["rng"]["augment"].cpu())
        random.setstate(ckpt["rng"]["python"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])

    def roll_back(self) -> None:
        """After `nan_rollback_after` non-finite losses in a row: back to the last good checkpoint's model,
        optimizer and RNG, but not its stream position: the batches that diverged are skipped, not replayed."""
        cfg = self.cfg.train
        found = self.checkpointer.load_latest(map_location=self.device)
        if found is None or self._rollbacks >= cfg.max_rollbacks:
            why = "no checkpoint to roll back to" if found is None else f"{self._rollbacks} rollbacks did not help"
            raise TrainingDiverged(f"loss was not finite for {self._nonfinite_in_a_row} steps in a row and {why}; "
                                   "lower optim.lr or check the data")
        ckpt, path = found
        self._restore(ckpt)
        self._rollbacks += 1
        self._nonfinite_in_a_row = 0
        self.metrics.rollbacks.inc()
        log.warning("rolled back from step %d to %s (rollback %d of at most %d)", self.state.step, path.name,
                    self._rollbacks, cfg.max_rollbacks)
        self.state.step, self.state.samples_seen = ckpt["step"], ckpt["samples_seen"]

    def save_checkpoint(self) -> None:
        started = time.perf_counter()
        self.state.checkpoints_written += 1
        self.checkpointer.save(self.checkpoint_state(), self.state.step)
        self._checkpointed_step = self.state.step
        self.metrics.observe_checkpoint(time.perf_counter() - started)
        if self.loader is not None:  # durable now: Kafka may move the group's committed offsets up to it
            self.loader.commit(self.state.position)

    def publish(self) -> None:
        cfg = self.cfg
        if cfg.eval.dataset != "none" and self.state.eval_metrics.get("knn_step") != float(self.state.step):
            self.evaluate()  # the manifest carries the metrics of exactly the weights it publishes
        manifest = {
            "step": self.state.step, "samples_seen": self.state.samples_seen, "method": cfg.method,
            "backbone": cfg.model.backbone, "backbone_options": {}, "embedding_dim": self.feature_dim,
            "input": {"channels": cfg.data.channels, "height": cfg.data.size, "width": cfg.data.size,
                      "range": "float in [0, 1], normalised inside the encoder",
                      "mean": cfg.data.mean, "std": cfg.data.std},
            "metrics": dict(self.state.eval_metrics),
        }
        version, folder = self.publisher.publish(self.published_encoder(), manifest)
        self.state.published_step = self.state.step
        self.metrics.observe_publish(version)
        log.info("published %s", folder)

    def audit_keys(self, keys: list[str]) -> None:
        """Lineage: which records went into which step. Lines after the last checkpoint are replayed after a crash,
        so a key may appear twice; at-least-once delivery means every acknowledged key appears at least once."""
        with open(self.run_dir / "trained-keys.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": self.state.step, "keys": keys}) + "\n")

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> None:
        cfg = self.cfg.eval
        if cfg.dataset == "none":
            return
        if self._knn_data is None:
            self._knn_data = knn_sets(cfg)
        started = time.perf_counter()
        top1 = self.knn(self.published_encoder())
        if self._knn_baselines is None:
            self._knn_baselines = self.knn_baselines()
        self.state.eval_metrics = {"knn_top1": top1, "knn_step": float(self.state.step), **self._knn_baselines}
        self.metrics.knn_top1.set(top1)
        log.info("kNN top-1 %.4f at step %d (%.1f s; same subset: raw pixels %.4f, untrained encoder %.4f)", top1,
                 self.state.step, time.perf_counter() - started, self._knn_baselines["knn_raw_pixels"],
                 self._knn_baselines["knn_untrained"])

    def published_encoder(self) -> torch.nn.Module:
        return self.method.encoder() if self.encoder_ema is None else self.encoder_ema.module

    def knn(self, encoder: torch.nn.Module) -> float:
        cfg = self.cfg.eval
        return knn_top1(encoder, *self._knn_data, self.cfg.data.mean, self.cfg.data.std, self.device, k=cfg.k,
                        temperature=cfg.temperature, autocast=self.autocast)

    def knn_baselines(self) -> dict[str, float]:
        """What the monitor's number must beat, on the same subset and preprocessing: raw pixels, and this
        run's encoder as it was before training (the same seed's initialisation)."""
        with torch.random.fork_rng(devices=[]):  # leaves the training RNG exactly where it was
            torch.manual_seed(self.cfg.train.seed)
            untrained, _ = build_backbone(self.cfg.model.backbone, self.cfg.data.channels)
        return {"knn_raw_pixels": self.knn(torch.nn.Flatten()), "knn_untrained": self.knn(untrained.to(self.device))}

    # --- the loop ------------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> tuple[float, dict[str, float]] | None:
        """One optimizer step; returns (loss, logs), or None when the loss was not finite (step skipped)."""
        cfg = self.cfg
        images = batch.images.to(self.device, non_blocking=True)
        method = self.method
        views = self.augment(images, self.generator, method.num_views, method.small_crops, method.small_crop_size,
                             method.small_crop_scale)
        if cfg.train.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        lr = self.learning_rate()
        set_learning_rate(self.optimizer, lr, self.base_lr)
        method.horizon_steps = self.state.horizon_steps
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, logs = self.forward_module(views, batch.ids.to(self.device, non_blocking=True))
        loss_value = self.loss_value(loss)
        if not math.isfinite(loss_value):
            method.discard_step()  # its queue/bank writes would carry the bad step into every later one
            self.metrics.skipped_steps.inc()
            self._nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss, step skipped (%d in a row)", self.state.step, self._nonfinite_in_a_row)
            if self._nonfinite_in_a_row >= cfg.train.nan_rollback_after:
                self.roll_back()
            return None
        self._nonfinite_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        method.commit_step()
        method.on_step_end(self.state.step)
        if self.encoder_ema is not None:
            self.encoder_ema.update_parameters(method.encoder())
        for param in method.take_reset_parameters():  # re-initialised by the method: no stale momentum
            self.optimizer.state.pop(param, None)
        self.metrics.learning_rate.set(lr)
        return loss_value, {name: float(value) for name, value in logs.items()}

    def learning_rate(self) -> float:
        """This step's LR: warm-up over a share of the current cycle, then cosine to the horizon."""
        optim, horizon, start = self.cfg.optim, self.state.horizon_steps, self.state.cycle_start
        cycle = horizon - start if horizon else 0
        warmup = warmup_length(cycle, optim.warmup_fraction, optim.warmup_steps)
        return learning_rate(self.state.step - start, self.base_lr, warmup, optim.schedule, cycle, optim.min_lr_ratio)

    def plan_horizon(self) -> None:
        """The horizon of this invocation (see pipeline/schedule.py): the step budget, a stored time-based
        horizon not reached yet (a resumed run continues its schedule), or a new estimate from the time budget."""
        cfg = self.cfg
        fixed = cfg.optim.total_steps or cfg.train.max_steps
        if fixed:
            self.state.horizon_steps, self.state.cycle_start = fixed, 0
        elif not cfg.train.max_minutes:
            self.state.horizon_steps = 0
        elif self.state.horizon_steps <= self.state.step:
            self.state.cycle_start = self.state.step
            self._horizon_estimate = HorizonEstimate(self.state.step, cfg.train.max_minutes * 60)
            self.state.horizon_steps = self._horizon_estimate.update(self.state.step, 0.0)

    def update_horizon(self, elapsed: float) -> None:
        if self._horizon_estimate is None:
            return
        horizon = self._horizon_estimate.update(self.state.step, elapsed)
        self.state.horizon_steps, frozen = self.agree_horizon(horizon, self._horizon_estimate.frozen)
        if frozen:
            log.info("schedule horizon: step %d (estimated from the step rate and the time budget)",
                     self.state.horizon_steps)
            self._horizon_estimate = None

    # --- hooks the multi-worker trainer (pipeline/distributed.py) overrides so that workers agree ---
    def loss_value(self, loss: torch.Tensor) -> float:
        """The loss as a number (a host sync); whether it is finite decides if the step is taken."""
        return float(loss.detach())

    def agree_horizon(self, horizon: int, frozen: bool) -> tuple[int, bool]:
        """The horizon estimate every worker uses (one process: its own)."""
        return horizon, frozen

    def checkpoint_due(self, seconds_since_checkpoint: float) -> bool:
        cfg = self.cfg.checkpoint
        return bool((cfg.every_steps and self.state.step % cfg.every_steps == 0)
                    or (cfg.every_seconds and seconds_since_checkpoint >= cfg.every_seconds))

    def open_loader(self) -> Any:
        """What batches come from: `next(timeout)` (None at the end of the stream), `commit(position)`, `close()`."""
        cfg = self.cfg
        return BatchLoader(self.make_source, self.state.position, cfg.train.batch_size, cfg.data.image_field,
                           cfg.data.channels, cfg.data.size, self.dead_letters, cfg.data.prefetch_batches)

    def stop_reason(self, deadline: float) -> str:
        """Why the run should stop before its next step ("" to go on)."""
        if self.stop.is_set():
            return "stop requested"
        if self.cfg.train.max_steps and self.state.step >= self.cfg.train.max_steps:
            return f"reached max_steps {self.cfg.train.max_steps}"
        if time.monotonic() >= deadline:
            return f"time budget of {self.cfg.train.max_minutes} min used"
        return ""

    def next_batch(self, loader: Any, deadline: float) -> tuple[Batch | None, str]:
        """The next batch to train on, or (None, why the run stops)."""
        while True:
            reason = self.stop_reason(deadline)
            if reason:
                return None, reason
            waited = time.perf_counter()
            try:
                batch = loader.next(timeout=0.5)
            except queue.Empty:
                continue
            finally:
                self.metrics.wait_seconds.inc(time.perf_counter() - waited)
            return (batch, "") if batch is not None else (None, "stream ended")

    def run(self) -> RunState:
        cfg = self.cfg
        if cfg.metrics.port:
            try:
                self.metrics_port = self.metrics.serve(cfg.metrics.port, cfg.metrics.host)
            except OSError as err:
                raise ConfigError(f"cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port} ({err.strerror}); "
                                  "pick another --metrics-port or 0 for none") from None
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.host, self.metrics_port)
        self.resume()
        self.plan_horizon()
        loader = self.loader = self.open_loader()
        started = time.monotonic()
        deadline = started + cfg.train.max_minutes * 60 if cfg.train.max_minutes else float("inf")
        last_checkpoint_time = last_eval_time = started
        last_log_time, last_log_samples = started, self.state.samples_seen
        last_loss = float("nan")
        try:
            while True:
                batch, reason = self.next_batch(loader, deadline)
                if batch is None:
                    break
                if not self.startup_seconds:
                    self.startup_seconds = time.monotonic() - started
                step_started = time.perf_counter()
                result = self.train_step(batch)
                # A skipped step still consumed its batch: the position moves on, the step count does not.
                self.state.position = batch.position
                self.metrics.observe_source(batch.source_stats)
                if result is None:
                    continue
                last_loss, logs = result
                self.state.step += 1
                if cfg.train.audit_keys:
                    self.audit_keys(batch.keys)
                self.state.samples_seen += batch.images.shape[0]
                self.metrics.observe_step(batch.images.shape[0], time.perf_counter() - step_started,
                                          self.optimizer.param_groups[0]["lr"])
                self.metrics.observe_logs({"loss": last_loss, **logs})

                now = time.monotonic()
                self.update_horizon(now - started)
                if ((cfg.eval.every_steps and self.state.step % cfg.eval.every_steps == 0)
                        or (cfg.eval.every_seconds and now - last_eval_time >= cfg.eval.every_seconds)):
                    self.evaluate()
                    last_eval_time = now = time.monotonic()
                if now - last_log_time >= cfg.train.log_every_seconds:
                    rate = (self.state.samples_seen - last_log_samples) / (now - last_log_time)
                    self.metrics.samples_per_second.set(rate)
                    self.print_progress(rate, last_loss, logs)
                    last_log_time, last_log_samples = now, self.state.samples_seen
                if self.checkpoint_due(now - last_checkpoint_time):
                    self.save_checkpoint()
                    last_checkpoint_time = time.monotonic()
                    if self.state.checkpoints_written % cfg.checkpoint.publish_every == 0:
                        self.publish()
            self.loop_seconds = time.monotonic() - started
            self.finish(reason)  # while the loader still runs: the final checkpoint's offsets are committed too
        finally:
            loader.close()
            self.loader = None
            if self.dead_letter_topic is not None:
                self.dead_letter_topic.close()
        return self.state

    def finish(self, reason: str) -> None:
        log.info("stopping: %s", reason)
        if self.state.eval_metrics.get("knn_step") != float(self.state.step) and self.state.step > 0:
            self.evaluate()
        if self._checkpointed_step != self.state.step:
            self.save_checkpoint()
        if self.state.published_step != self.state.step:
            self.publish()
        metrics = self.state.eval_metrics
        top1 = metrics.get("knn_top1")
        knn = "" if top1 is None else (f", kNN top-1 {top1:.4f} (subset of {self.cfg.eval.bank_size}/"
                                       f"{self.cfg.eval.test_size}; raw pixels {metrics['knn_raw_pixels']:.4f}, "
                                       f"untrained encoder {metrics['knn_untrained']:.4f})")
        print(f"done: {reason}; step {self.state.step}, {self.state.samples_seen} samples{knn}", flush=True)
        self.metrics.close()

    def print_progress(self, rate: float, loss: float, logs: dict[str, float]) -> None:
        top1 = self.state.eval_metrics.get("knn_top1")
        knn = f"{top1:.4f} @ {int(self.state.eval_metrics['knn_step'])}" if top1 is not None else "-"
        extra = " | ".join(f"{name} {value:.3f}" for name, value in logs.items())
        print(f"step {self.state.step} | {rate:.0f} samples/s | loss {loss:.4f} | "
              f"lr {self.optimizer.param_groups[0]['lr']:.4f} | knn {knn} | {extra}", flush=True)

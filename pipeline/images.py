"""The image task: stream → batched augment → the method's step, kNN eval, the encoder to publish.

`Trainer` is the loop (pipeline/loop.py) driving this task: what `streamssl run` runs for every image method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from streamssl.models import build_backbone, build_method
from streamssl.models.backbones import backbone_options
from streamssl.models.encoder_io import Manifest
from streamssl.pipeline.augment import BatchAugment, normalise
from streamssl.pipeline.collective import Collective
from streamssl.pipeline.config import Config, ConfigError, replayed_per_step
from streamssl.pipeline.device import resolve_device, resolve_precision
from streamssl.pipeline.distill import Distiller
from streamssl.pipeline.drift import DriftMonitor
from streamssl.pipeline.evaluation.eval_data import labelled_sets, sets_digest
from streamssl.pipeline.evaluation.knn import knn_top1
from streamssl.pipeline.loading.decode import decoded_side
from streamssl.pipeline.loading.loader import BatchLoader
from streamssl.pipeline.loading.messages import Batch
from streamssl.pipeline.loading.positions import Position
from streamssl.pipeline.loading.sources import source_factory
from streamssl.pipeline.log_format import ProgressLine
from streamssl.pipeline.loop import Loop
from streamssl.pipeline.optim import build_optimizer, set_learning_rate
from streamssl.pipeline.publish_gate import PROBE_ROWS
from streamssl.pipeline.replay import ReplayBuffer
from streamssl.pipeline.schedule import learning_rate, warmup_length
from streamssl.pipeline.task import Feed, Step

log = logging.getLogger(__name__)


class ImageTask:
    """One self-supervised image method (`cfg.method`) on this worker.

    Args:
        cfg: The run's config; `train.batch_size` is per worker, so the learning rate scales with the global
            batch, workers x batch_size (linear scaling rule).
        collective: The worker group; its size scales the learning rate.
    """

    finished = ""  # a stream of images has no end of its own

    def __init__(self, cfg: Config, collective: Collective | None = None) -> None:
        self.cfg = cfg
        group = collective or Collective()
        workers = group.world_size
        # First: a missing data path must fail before anything is written into the run dir.
        self.make_source: functools.partial[Any] = source_factory(cfg.data, cfg.train.seed, cfg.kafka)
        # eval.data is read now (on the rank that evaluates): a missing dir or label field fails before training
        self._knn_data = labelled_sets(cfg) if cfg.eval.data and group.rank == 0 else None
        self.device = self.map_location = resolve_device(cfg.train.device)
        self.quick_eval = cfg.eval.dataset == "none" and not cfg.eval.data  # no kNN pass (drift waits on a signal)
        self.autocast = resolve_precision(cfg.train.precision, self.device) == "bf16"
        if cfg.train.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic; it must be set before its first use.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)

        try:  # a torchvision name or a user's factory is only known to be buildable by building it
            backbone, self.feature_dim = build_backbone(cfg.model.backbone, cfg.data.channels,
                                                        bn_splits=cfg.model.bn_splits, size=cfg.data.size)
        except ValueError as err:
            raise ConfigError(f"model.backbone: {err}") from None
        try:
            method = build_method(cfg.method, backbone, self.feature_dim, cfg.method_options(), dataclasses.asdict(cfg.aux))
        except ValueError as err:  # a method refusing an option value
            raise ConfigError(f"{cfg.method}: {err}") from None
        self.method = method.to(self.device)
        if cfg.train.channels_last:
            self.method.to(memory_format=torch.channels_last)
        # What the step calls: the method itself, or (pipeline/ray/worker.py) a DDP wrapper around it.
        self.forward_module: torch.nn.Module = self.method
        self.base_lr = cfg.optim.lr * cfg.train.batch_size * workers / 256  # linear scaling rule
        if workers > 1 and (cfg.replay.capacity or cfg.distill.weight):
            raise ConfigError("replay.capacity and distill.weight are for single-process runs so far (each worker "
                              "would need its own buffer in the checkpoint); set them to 0 with --workers")
        self.distiller = None if not cfg.distill.weight else Distiller(
            lambda: build_backbone(cfg.model.backbone, cfg.data.channels, bn_splits=cfg.model.bn_splits,
                                   size=cfg.data.size)[0],
            self.feature_dim, cfg.distill.weight, cfg.distill.every_steps).to(self.device)
        groups = self.method.param_groups()
        if self.distiller is not None:
            groups.append({"params": list(self.distiller.predictor.parameters())})
        self.optimizer = build_optimizer(cfg.optim.name, groups, self.base_lr, cfg.optim.momentum,
                                         cfg.optim.weight_decay)
        # What gets published: the encoder itself, or a weight EMA of it (train.ema_decay).
        self.encoder_ema = (None if not cfg.train.ema_decay else torch.optim.swa_utils.AveragedModel(
            self.method.encoder(), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.train.ema_decay),
            use_buffers=True))
        self.augment = BatchAugment(cfg.augment, cfg.data.mean, cfg.data.std, cfg.data.size)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed)
        # How batches arrive: the background decoder by default, a Ray Data feed under Ray (pipeline/ray/worker.py).
        self.open_feed: Callable[[Position | None], Feed] = self._batch_loader
        self.replayed = replayed_per_step(cfg)
        self.replay = None if not cfg.replay.capacity else ReplayBuffer(
            cfg.replay.capacity, cfg.replay.policy, (cfg.data.channels, cfg.data.size, cfg.data.size), self.feature_dim,
            cfg.train.seed, self.device)
        # The backbone's output for the first view, as the method computes it (no extra forward pass): the replay
        # buffer's features and the distillation's input. Captured only inside `step`.
        self._capture_rows = 0
        self._captured: torch.Tensor | None = None
        self.method.encoder().register_forward_hook(self._capture)
        self.drift = None if not cfg.drift.window else DriftMonitor(
            cfg.drift.window, (cfg.data.channels, cfg.data.size, cfg.data.size), cfg.drift.folds, cfg.drift.threshold)
        self._knn_baselines: dict[str, float] | None = None
        self._recent: torch.Tensor | None = None  # the last arriving records: the publish gate's probe without kNN
        self.loop: Loop  # set by attach(), which the loop calls before anything else

    def attach(self, loop: Loop) -> None:
        self.loop = loop

    def _batch_loader(self, position: Position | None) -> Feed:
        cfg = self.cfg
        arriving = cfg.train.batch_size - self.replayed
        return BatchLoader(self.make_source, position, arriving, cfg.data.image_field, cfg.data.channels, cfg.data.size,
                           cfg.data.prefetch_batches, cfg.data.max_record_bytes, decoded_side(cfg))

    def open(self, position: Position | None) -> Feed:
        return self.open_feed(position)

    def close(self) -> None:
        pass

    # --- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "augment": self.generator.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "encoder_ema": None if self.encoder_ema is None else self.encoder_ema.state_dict(),
                "schedule": {"base_lr": self.base_lr}, "rng": rng,
                "replay": None if self.replay is None else self.replay.state_dict(),
                "distill": None if self.distiller is None else self.distiller.state_dict(),
                "drift": None if self.drift is None else self.drift.state_dict()}

    def upgrade(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        return ckpt  # one layout so far

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        # switched on for a run that had none: the buffer starts empty, the snapshot at the next refresh
        if self.replay is not None and ckpt.get("replay") is not None:
            self.replay.load_state_dict(ckpt["replay"])
        if self.distiller is not None and ckpt.get("distill") is not None:
            self.distiller.load_state_dict(ckpt["distill"])
        if self.drift is not None and ckpt.get("drift") is not None:
            self.drift.load_state_dict(ckpt["drift"])
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

    # weights, optimizer, method state, RNG, and the replay and drift buffers as that checkpoint had them
    roll_back = load_state_dict

    # --- the step --------------------------------------------------------------------------------------
    def _capture(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self._capture_rows and self._captured is None and output.shape[0] >= self._capture_rows:
            self._captured = output[:self._capture_rows]

    def step(self, batch: Batch) -> Step:
        """One optimizer step; not taken (finite=False) when the loss was not finite on any worker."""
        cfg, state, method = self.cfg, self.loop.state, self.method
        if self.drift is not None:
            self.drift.observe(batch.images, batch.extents)  # the arriving records, before they move to the device
        images = arriving = self._recent = batch.images.to(self.device, non_blocking=True)
        ids = batch.ids.to(self.device, non_blocking=True)
        slots = None
        if self.replay is not None:  # arriving records + records drawn from the buffer (fewer while it fills)
            splits = cfg.model.bn_splits
            slots = self.replay.draw(self.replayed)[:min(self.replayed, self.replay.size) // splits * splits]
            images, ids = torch.cat([arriving, self.replay.images[slots]]), torch.cat([ids, self.replay.ids[slots]])
        spec = method.views()
        views = self.augment(images, self.generator, spec.full, spec.small, spec.small_size, spec.small_scale,
                             batch.extents)
        if cfg.train.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        lr = self.learning_rate()
        set_learning_rate(self.optimizer, lr, self.base_lr)
        method.horizon_steps = state.horizon_steps
        # only what the buffer or the distillation reads is captured
        self._capture_rows = len(images) if self.replay is not None or self.distiller is not None else 0
        self._captured = None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, logs = self.forward_module(views, ids)
            features, self._capture_rows = self._captured, 0
            if self.distiller is not None and self.distiller.active and features is not None:
                distill_loss = self.distiller.loss(features, views[0])
                logs["distill_loss"] = distill_loss.detach()
                loss = loss + self.distiller.weight * distill_loss
        loss_value = self.loop.collective.mean(loss)  # a non-finite loss on one worker: every worker skips
        samples = arriving.shape[0]  # samples seen are arriving records; replayed ones are not new data
        if not math.isfinite(loss_value):
            method.discard_step()  # its queue/bank writes would carry the bad step into every later one
            return Step(loss_value, {}, samples, lr, finite=False)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        method.commit_step()
        method.on_step_end(state.step)
        if self.encoder_ema is not None:
            self.encoder_ema.update_parameters(method.encoder())
        for param in method.take_reset_parameters():  # re-initialised by the method: no stale momentum
            self.optimizer.state.pop(param, None)
        self.loop.metrics.learning_rate.set(lr)
        logs = {name: float(value) for name, value in logs.items()}
        if self.replay is not None and features is not None:
            features = features.detach()
            self.replay.refresh(slots, features[len(arriving):])
            self.replay.add(arriving, ids[:len(arriving)], features[:len(arriving)])
            logs.update(self.replay.logs(), replay_share=1 - len(arriving) / len(images))
        if self.distiller is not None:
            self.distiller.maybe_refresh(state.step + 1, method.encoder())  # the loop counts this step after it
            logs.update(self.distiller.logs(state.step + 1))
        return Step(loss_value, logs, samples, lr)

    def learning_rate(self) -> float:
        """This step's LR: warm-up over a share of the current cycle, then cosine to the horizon."""
        optim, state = self.cfg.optim, self.loop.state
        horizon, start = state.horizon_steps, state.cycle_start
        cycle = horizon - start if horizon else 0
        warmup = warmup_length(cycle, optim.warmup_fraction, optim.warmup_steps)
        return learning_rate(state.step - start, self.base_lr, warmup, optim.schedule, cycle, optim.min_lr_ratio)

    # --- evaluation and publishing ---------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg.eval
        drift = self.embedding_drift()
        if cfg.dataset == "none" and not cfg.data:
            return drift
        if self._knn_data is None:
            self._knn_data = labelled_sets(self.cfg)
        started = time.perf_counter()
        top1 = self.knn(self.encoder())
        if self._knn_baselines is None:
            self._knn_baselines = self.knn_baselines()
        step, baselines = self.loop.state.step, self._knn_baselines or {}
        self.loop.metrics.knn_top1.set(top1)
        beside = "baselines skipped: stopping on a signal"
        if baselines:
            beside = (f"same subset: raw pixels {baselines['knn_raw_pixels']:.4f}, "
                      f"untrained encoder {baselines['knn_untrained']:.4f}")
        log.info("kNN top-1 %.4f at step %d (%.1f s; %s)", top1, step, time.perf_counter() - started, beside)
        return {"knn_top1": top1, "knn_step": float(step), **baselines, **drift}

    def embedding_drift(self) -> dict[str, float]:
        """`drift_auc` (pipeline/drift.py) of the stream's windows by the current encoder, once both are full; not
        measured when the run is stopping on a signal (its grace period is for the checkpoint)."""
        if self.drift is None or self.loop.stop.is_set():
            return {}
        auc = self.drift.measure(self.encoder(), self.cfg.data.mean, self.cfg.data.std, self.device, self.autocast)
        if auc is None:
            return {}
        self.loop.metrics.embedding_drift.set(auc)
        return {"drift_auc": auc}

    def encoder(self) -> torch.nn.Module:
        return self.method.encoder() if self.encoder_ema is None else self.encoder_ema.module

    def probe_inputs(self) -> torch.Tensor | None:
        """Real images as `encoder()` takes them, for the publish gate's collapse check: the kNN monitor's test
        images (the same for every version), else the last batch from the stream."""
        images = self._knn_data[2] if self._knn_data is not None else self._recent
        if images is None:
            return None
        return normalise(images[:PROBE_ROWS].to(self.device), self.cfg.data.mean, self.cfg.data.std)

    def manifest(self) -> Manifest:
        cfg = self.cfg
        # build_backbone's options, bn_splits left out: split BN is plain BN at inference, with the same state
        return Manifest(backbone=cfg.model.backbone, embedding_dim=self.feature_dim,
                        backbone_options=backbone_options(cfg.model.backbone, cfg.data.channels, cfg.data.size),
                        input={"channels": cfg.data.channels, "height": cfg.data.size, "width": cfg.data.size,
                               "range": "float in [0, 1], normalised inside the encoder",
                               "mean": cfg.data.mean, "std": cfg.data.std})

    def knn(self, encoder: torch.nn.Module) -> float:
        cfg = self.cfg.eval
        assert self._knn_data is not None, "evaluate() loads the kNN sets first"
        return knn_top1(encoder, *self._knn_data, self.cfg.data.mean, self.cfg.data.std, self.device, k=cfg.k,
                        temperature=cfg.temperature, autocast=self.autocast)

    def knn_baselines(self) -> dict[str, float] | None:
        """What the monitor's number must beat, on the same subset and preprocessing: raw pixels, and this
        run's encoder as it was before training (the same seed's initialisation).

        They cost two more kNN evaluations, so they are kept in the run dir for the settings they were measured
        with, and skipped (None) when the run is stopping on a signal: its grace period is for the checkpoint."""
        cfg = self.cfg
        settings = {**dataclasses.asdict(cfg.eval), "backbone": cfg.model.backbone, "seed": cfg.train.seed,
                    "channels": cfg.data.channels, "size": cfg.data.size, "mean": cfg.data.mean, "std": cfg.data.std}
        if cfg.eval.data and self._knn_data is not None:  # the same directory may hold other records by now
            settings["eval_data_digest"] = sets_digest(self._knn_data)
        cache = self.loop.paths.root / "knn-baselines.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            stored = json.loads(cache.read_text())
            if stored["settings"] == settings:
                return {name: float(value) for name, value in stored["baselines"].items()}
        if self.loop.stop.is_set():
            return None
        with torch.random.fork_rng(devices=[]):  # leaves the training RNG exactly where it was
            torch.manual_seed(cfg.train.seed)
            untrained, _ = build_backbone(cfg.model.backbone, cfg.data.channels, size=cfg.data.size)
        baselines = {"knn_raw_pixels": self.knn(torch.nn.Flatten()), "knn_untrained": self.knn(untrained.to(self.device))}
        with contextlib.suppress(OSError):
            cache.write_text(json.dumps({"settings": settings, "baselines": baselines}))
        return baselines

    # --- what the loop prints ----------------------------------------------------------------------------
    def progress(self, samples_rate: float, seconds: float, loss: float, logs: dict[str, float]) -> str:
        metrics = self.loop.state.eval_metrics
        knn = f"{metrics['knn_top1']:.4f} @ {int(metrics['knn_step'])}" if "knn_top1" in metrics else "-"
        extra = " | ".join(f"{name} {value:.3f}" for name, value in logs.items())
        lr = self.optimizer.param_groups[0]["lr"]
        return ProgressLine(f"step {self.loop.state.step} | {samples_rate:.0f} samples/s | loss {loss:.4f} | "
                            f"lr {lr:.4f} | knn {knn} | {extra}", lr=lr)

    def summary(self) -> str:
        state, eval_cfg = self.loop.state, self.cfg.eval
        metrics = state.eval_metrics
        knn = ""
        if "knn_top1" in metrics:
            beside = "" if "knn_untrained" not in metrics else (
                f"; raw pixels {metrics['knn_raw_pixels']:.4f}, untrained encoder {metrics['knn_untrained']:.4f}")
            sizes = (f"{eval_cfg.bank_size}/{eval_cfg.test_size}" if self._knn_data is None
                     else f"{len(self._knn_data[1])}/{len(self._knn_data[3])}")
            knn = f", kNN top-1 {metrics['knn_top1']:.4f} (subset of {sizes}{beside})"
        return f", {state.samples_seen} samples{knn}"


class Trainer(Loop):
    """The loop driving an `ImageTask`: `Trainer(cfg).run()` is `streamssl run` for an image method."""

    task: ImageTask  # the loop's task, typed as the one this loop is built with

    def __init__(self, cfg: Config, stop: threading.Event | None = None, *, collective: Collective | None = None,
                 **loop_options: Any) -> None:
        super().__init__(cfg, ImageTask(cfg, collective), stop, collective=collective, **loop_options)

    @property
    def method(self) -> Any:
        return self.task.method

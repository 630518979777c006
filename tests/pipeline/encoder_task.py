"""A small real task for the publishing tests: an untrained convnet on the loop's counter feed, probed with
Fashion-MNIST test images, reporting the eval metric each step scripts (what a real eval would measure cannot be
made to regress on cue; what the gate does with the number is what these tests check)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamssl.models.backbones import build_backbone
from streamssl.models.encoder_io import Manifest
from streamssl.pipeline.config import Config, load_config
from streamssl.pipeline.loop import Loop
from streamssl.pipeline.task import Feed, Step
from streamssl.streams.fashion_mnist import load_fashion_mnist
from tests.pipeline.test_loop import Counter, Tick

IMAGE_INPUT = {"channels": 1, "height": 28, "width": 28, "mean": [0.286], "std": [0.353]}


@functools.cache
def real_images(rows: int = 64) -> torch.Tensor:
    """Real images, normalised as the convnet takes them (read once: decoding the set takes seconds)."""
    images, _ = load_fashion_mnist("test")
    return (torch.as_tensor(images[:rows]).float().div(255).unsqueeze(1) - 0.286) / 0.353


def collapse(encoder: nn.Module) -> None:
    """Every weight zero: the encoder's outputs all coincide, whatever the input."""
    with torch.no_grad():
        for tensor in encoder.state_dict().values():
            if tensor.is_floating_point():
                tensor.zero_()


class EncoderTask:
    """Steps that train nothing; `metrics[step]` is what evaluate reports at that step (else the last one given);
    the encoder collapses from step `collapse_at` on."""

    map_location = "cpu"
    finished = ""

    def __init__(self, metrics: dict[int, dict[str, float]] | None = None, collapse_at: int = 0, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.backbone, self.dim = build_backbone("convnet", 1)
        self.metrics, self.collapse_at = metrics or {}, collapse_at
        self.probe = real_images()
        self.loop: Loop | None = None

    def attach(self, loop: Loop) -> None:
        self.loop = loop

    def open(self, position: Any) -> Feed:
        return Counter(0 if position is None else position.row, None)

    def step(self, message: Tick) -> Step:
        assert self.loop is not None
        if self.collapse_at and self.loop.state.step + 1 >= self.collapse_at:
            collapse(self.backbone)
        return Step(0.0, {}, 1)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def upgrade(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        return ckpt

    def load_state_dict(self, ckpt: dict[str, Any]) -> None: ...

    def roll_back(self, ckpt: dict[str, Any]) -> None: ...

    def evaluate(self) -> dict[str, float]:
        assert self.loop is not None
        step = self.loop.state.step
        given = [metrics for at, metrics in sorted(self.metrics.items()) if at <= step]
        return dict(given[-1]) if given else {}

    def encoder(self) -> nn.Module:
        return self.backbone

    def probe_inputs(self) -> torch.Tensor:
        return self.probe

    def manifest(self) -> Manifest:
        return Manifest(backbone="convnet", input=IMAGE_INPUT, embedding_dim=self.dim)

    def progress(self, samples_rate: float, seconds: float, loss: float, logs: dict[str, float]) -> str:
        return ""

    def summary(self) -> str:
        return ""

    def close(self) -> None: ...


def config(run_dir: Path, *sets: str) -> Config:
    """Checkpoint (and publish) every 2 steps, eval before each publish only."""
    return load_config(sets=[f"run_dir={run_dir}", "train.max_minutes=0", "checkpoint.every_steps=2",
                             "checkpoint.every_seconds=0", "eval.every_steps=0", "eval.every_seconds=0",
                             "eval.dataset=none", "metrics.port=0", "train.log_every_seconds=1000", *sets])

"""The learning check: a short, step-bounded run of every image method must leave an encoder whose kNN top-1 on
held-out images beats the same seed's untrained encoder by a margin.

The untrained ConvNet is a strong baseline on Fashion-MNIST (random conv features already beat raw pixels), so
a method that stops learning — a broken loss, a schedule that never starts, state that never updates, a
collapse — fails here. Each method trains through the real image step (`ImageTask.step`) (batched augmentation, the
method, its recipe's optimizer and schedule, staged state writes) on Fashion-MNIST images held in memory.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from streamssl.models.registry import METHODS
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.decode import record_id
from streamssl.pipeline.loading.messages import Batch
from streamssl.streams.fashion_mnist import load_fashion_mnist
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # minutes on 2 cores: `pytest -m 'not slow'` skips it in an inner loop

STEPS = 20
BATCH = 32
TRAIN_IMAGES = 1024  # cycled, ~2 passes: a revisit is what NPID's bank and DeepCluster's fixed labels need
MARGIN = 0.01  # kNN top-1 above the untrained encoder, on 1,000 held-out test images against a 2,000-image bank
# Steps per method where the default is not enough to show learning in this tiny budget (none so far).
STEPS_FOR: dict[str, int] = {}
# Known not to learn in this budget: strict, so the test fails as soon as the method starts to pass (none so far:
# NPID's paper positive, its stale bank entry, was here until its second-view positive).
NOT_YET: dict[str, str] = {}


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    images, _ = load_fashion_mnist("train")
    # From the end of the train split: the kNN bank is a random subset of all of it, the queries are test images.
    return torch.from_numpy(images[-TRAIN_IMAGES:].copy()).unsqueeze(1)


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    """The held-out kNN sets and the untrained / raw-pixel scores on them: the same for every method (same seed,
    same backbone, same subset), so computed once for the module."""
    return {}


@pytest.mark.parametrize("method", [pytest.param(name, marks=pytest.mark.xfail(name in NOT_YET, reason=NOT_YET.get(name, ""),
                                                                            strict=True)) for name in sorted(METHODS)])
def test_a_short_run_beats_the_untrained_encoder(method: str, train_images: torch.Tensor, reference: dict[str, object],
                                                 small_lake: Path, tmp_path: Path) -> None:
    steps = STEPS_FOR.get(method, STEPS)
    cfg = tiny_config(tmp_path / "run", small_lake, f"method={method}", f"train.batch_size={BATCH}",
                      f"train.max_steps={steps}", "train.deterministic=false", "eval.dataset=fashion-mnist",
                      "eval.bank_size=2000", "eval.test_size=1000", "optim.warmup_steps=0")
    trainer = Trainer(cfg)
    trainer.plan_horizon()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(TRAIN_IMAGES, generator=generator)
    started = time.perf_counter()
    for step in range(steps):
        index = order[(step * BATCH) % TRAIN_IMAGES:][:BATCH]
        keys = [f"img-{int(i)}" for i in index]
        batch = Batch(train_images[index], keys, {}, {}, torch.tensor([record_id(key) for key in keys]))
        assert trainer.task.step(batch).finite, f"{method}: step {step} was not finite"
        trainer.state.step += 1
    if reference:  # what the first method's evaluation computed
        trainer.task._knn_data, trainer.task._knn_baselines = reference["data"], reference["baselines"]
    trainer.evaluate()
    reference.update(data=trainer.task._knn_data, baselines=trainer.task._knn_baselines)
    metrics = trainer.state.eval_metrics
    print(f"{method}: kNN {metrics['knn_top1']:.4f} vs untrained {metrics['knn_untrained']:.4f} "
          f"(raw pixels {metrics['knn_raw_pixels']:.4f}) after {steps} steps, {time.perf_counter() - started:.1f} s")
    assert metrics["knn_top1"] >= metrics["knn_untrained"] + MARGIN

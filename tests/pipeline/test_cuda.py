"""CUDA paths: every method's training step on the GPU under bf16 autocast, with the kNN monitor, the encoder
EMA and each optimizer. Skipped without a GPU (CI has none); `bench/gpu_check.sh` runs them on one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamssl.models.registry import METHODS
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.decode import record_id
from streamssl.pipeline.loading.messages import Batch
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch(size: int, offset: int = 0) -> Batch:
    keys = [f"k{offset + i}" for i in range(size)]
    images = torch.randint(0, 256, (size, 1, 28, 28), dtype=torch.uint8)
    return Batch(images, keys, {}, {}, torch.tensor([record_id(key) for key in keys]))


@pytest.mark.parametrize("optimizer", ["sgd", "lars", "adamw"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_steps_on_the_gpu_under_bf16_keep_state_on_the_gpu(method: str, optimizer: str, small_lake: Path,
                                                           tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", small_lake, f"method={method}", "train.device=cuda", "train.precision=bf16",
                      f"optim.name={optimizer}", "train.max_steps=4", "train.ema_decay=0.9",
                      "train.deterministic=false", "eval.dataset=fashion-mnist", "eval.bank_size=500",
                      "eval.test_size=200")
    trainer = Trainer(cfg)
    assert trainer.task.autocast and trainer.task.device.type == "cuda"
    trainer.plan_horizon()
    for step in range(4):
        result = trainer.task.step(_batch(32, 32 * step))
        assert result.finite and torch.isfinite(torch.tensor(result.loss))
        trainer.state.step += 1
    assert all(value.is_cuda for value in trainer.method.state_dict().values())
    trainer.evaluate()
    assert 0.0 < trainer.state.eval_metrics["knn_top1"] <= 1.0
    assert next(trainer.task.encoder().parameters()).is_cuda

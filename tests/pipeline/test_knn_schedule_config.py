"""kNN vote against a brute-force definition, the LR schedule, and config parsing errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from streamssl.pipeline.config import ConfigError, load_config
from streamssl.pipeline.evaluation.knn import knn_predict
from streamssl.pipeline.schedule import learning_rate


def test_knn_predict_matches_brute_force_weighted_vote() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 8, generator=gen), dim=1)
    labels = torch.randint(0, 3, (50,), generator=gen)
    queries = F.normalize(torch.randn(20, 8, generator=gen), dim=1)
    predicted = knn_predict(queries, bank, labels, num_classes=3, k=7, temperature=0.1)
    for query, guess in zip(queries, predicted, strict=True):
        sims = [(float(query @ b), int(c)) for b, c in zip(bank, labels, strict=True)]
        top = sorted(sims, reverse=True)[:7]
        scores = [sum(math.exp(s / 0.1) for s, c in top if c == cls) for cls in range(3)]
        assert int(guess) == max(range(3), key=lambda cls: scores[cls])


def test_schedule_warms_up_then_follows_cosine() -> None:
    assert learning_rate(0, 1.0, 10, "cosine", 110) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, 10, "cosine", 110) == pytest.approx(1.0)
    assert learning_rate(60, 1.0, 10, "cosine", 110) == pytest.approx(0.5)
    assert learning_rate(110, 1.0, 10, "cosine", 110, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert learning_rate(500, 1.0, 10, "constant", 110) == 1.0
    assert learning_rate(500, 1.0, 10, "cosine", 0) == 1.0  # no horizon (unbounded run): constant


def test_config_layers_and_types() -> None:
    cfg = load_config(overrides={"train.max_steps": 7}, sets=["train.batch_size=64", "data.mean=[0.5]",
                                                               "train.deterministic=true"])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.data.mean, cfg.train.deterministic) == (7, 64, [0.5], True)
    assert cfg.method_options()["queue_size"] == 4096


@pytest.mark.parametrize(("sets", "message"), [
    (["train.bach_size=3"], "unknown config key 'train.bach_size' (did you mean train.batch_size?)"),
    (["train.batch_size=abc"], "train.batch_size: expected int"),
    (["train.precision=fp8"], "train.precision: 'fp8' is not one of auto, fp32, bf16"),
    (["train.batch_size=0"], "train.batch_size: must be at least 1"),
    (["nonsense"], "--set expects key=value"),
    (["train=3"], "train: expected a mapping"),
])
def test_bad_config_is_one_readable_error(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(sets=sets)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_file_is_read(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  batch_size: 128\nmoco:\n  queue_size: 1024\n")
    cfg = load_config(str(path))
    assert cfg.train.batch_size == 128 and cfg.moco.queue_size == 1024
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))

"""The run's horizon (step budget or estimated from the time budget), optimizers and parameter groups, method
recipes, the encoder EMA, and manifests that carry the eval metrics of exactly their weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from streamssl.models.method import split_decay
from streamssl.pipeline.config import load_config, to_dict
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.optim import LARS, build_optimizer, set_learning_rate
from streamssl.pipeline.schedule import HorizonEstimate, warmup_length
from tests.conftest import tiny_config


def test_horizon_estimate_follows_the_rate_then_freezes() -> None:
    estimate = HorizonEstimate(start_step=0, budget_seconds=100.0)
    horizons = []
    for step in range(1, 201):
        seconds_per_step = 0.1 if step < 60 else 0.3  # slower after the estimate froze: ignored
        horizons.append(estimate.update(step, elapsed=0.5 + (step - 1) * seconds_per_step if step < 60 else
                                        0.5 + 59 * 0.1 + (step - 60) * seconds_per_step))
        if estimate.frozen:
            break
    # Frozen once 5% of the budget (5 s) had passed: about 100 s / 0.1 s per step steps in all.
    assert estimate.frozen and 45 <= step <= 60
    assert estimate.horizon == pytest.approx(1000, rel=0.02)
    assert estimate.update(step + 50, 90.0) == estimate.horizon


def test_a_resumed_estimate_counts_from_its_start_step() -> None:
    estimate = HorizonEstimate(start_step=500, budget_seconds=60.0)
    for step in range(501, 560):
        estimate.update(step, elapsed=(step - 500) * 0.1)
    assert estimate.frozen and estimate.horizon == pytest.approx(500 + 600, rel=0.02)


def test_warmup_is_a_share_of_the_horizon_unless_given_in_steps() -> None:
    assert warmup_length(274, 0.05, 0) == 14
    assert warmup_length(274, 0.05, 30) == 30
    assert warmup_length(0, 0.05, 0) == 100  # unbounded: a fixed warm-up, then constant


def test_bn_and_bias_parameters_get_no_weight_decay() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    groups = split_decay(model.named_parameters())
    assert {id(p) for p in groups[0]["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(groups[1]["params"]) == 3 and groups[1]["weight_decay"] == 0.0
    for name in ("sgd", "lars", "adamw"):
        optimizer = build_optimizer(name, groups, lr=0.1, momentum=0.9, weight_decay=1e-2)
        assert [group["weight_decay"] for group in optimizer.param_groups] == [1e-2, 0.0]


def test_lars_scales_each_weight_update_by_its_trust_ratio() -> None:
    weight = nn.Parameter(torch.full((2, 2), 2.0))  # ||w|| = 4
    bias = nn.Parameter(torch.ones(2))
    optimizer = LARS([{"params": [weight]}, {"params": [bias], "weight_decay": 0.0, "lars_exclude": True}],
                     lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.02)
    weight.grad, bias.grad = torch.full((2, 2), 0.8), torch.full((2,), 3.0)
    optimizer.step()
    update = torch.full((2, 2), 0.8 + 0.1 * 2.0)  # ||u|| = 2
    torch.testing.assert_close(weight.detach(), torch.full((2, 2), 2.0) - 0.5 * (0.02 * 4 / 2) * update)
    torch.testing.assert_close(bias.detach(), torch.ones(2) - 0.5 * 3.0)  # excluded: plain SGD


def test_fixed_lr_groups_keep_the_base_lr() -> None:
    optimizer = torch.optim.SGD([{"params": [nn.Parameter(torch.ones(1))]},
                                 {"params": [nn.Parameter(torch.ones(1))], "fixed_lr": True}], lr=1.0)
    set_learning_rate(optimizer, 0.25, base_lr=1.0)
    assert [group["lr"] for group in optimizer.param_groups] == [0.25, 1.0]


def test_a_method_recipe_applies_unless_the_user_sets_the_key(tmp_path: Path) -> None:
    assert load_config(overrides={"method": "moco"}).model.bn_splits == 8  # MoCo's shuffle BN
    assert load_config(overrides={"method": "simclr"}).model.bn_splits == 1
    assert load_config(overrides={"method": "moco"}, sets=["model.bn_splits=2"]).model.bn_splits == 2
    config = tmp_path / "run.yaml"
    config.write_text("method: moco\nmodel:\n  bn_splits: 4\n")
    assert load_config(str(config)).model.bn_splits == 4
    # A resolved config handed on whole (as to Ray workers) keeps its values: the recipe does not re-apply.
    resolved = to_dict(load_config(overrides={"method": "moco"}, sets=["train.batch_size=32"]))
    assert load_config(overrides=resolved).train.batch_size == 32


def test_every_recipe_names_real_config_keys() -> None:
    from streamssl.models.registry import METHODS

    for name in METHODS:
        load_config(overrides={"method": name})  # an unknown or badly typed recipe key raises ConfigError


def test_time_bounded_resume_continues_its_horizon_and_a_finished_one_starts_a_new_cycle(
        tmp_path: Path, small_lake: Path) -> None:
    cfg = tiny_config(tmp_path / "run", small_lake, "train.max_minutes=5")
    trainer = Trainer(cfg)
    trainer.plan_horizon()
    assert trainer._horizon_estimate is not None and trainer.state.cycle_start == 0
    trainer.state.step, trainer.state.horizon_steps = 40, 300  # stopped part-way through its schedule
    trainer._horizon_estimate = None
    trainer.plan_horizon()
    assert (trainer.state.horizon_steps, trainer.state.cycle_start) == (300, 0)
    trainer.state.step = 300  # the schedule was finished: a new invocation anneals again from here
    trainer.plan_horizon()
    assert trainer.state.cycle_start == 300 and trainer._horizon_estimate is not None


def test_published_manifests_carry_the_metrics_of_their_own_weights_and_the_ema_is_published(
        tmp_path: Path, small_lake: Path) -> None:
    run_dir = tmp_path / "run"
    sets = ["train.max_steps=6", "checkpoint.every_steps=3", "eval.dataset=fashion-mnist", "eval.bank_size=300",
            "eval.test_size=100", "eval.every_seconds=0", "train.ema_decay=0.5",
            "publish.tolerance=1"]  # no regression gate: kNN over 100 test images moves by 0.01 steps, by chance past 0.02
    trainer = Trainer(tiny_config(run_dir, small_lake, *sets))
    trainer.run()
    manifests = [json.loads(path.read_text()) for path in sorted((run_dir / "published").glob("v*/manifest.json"))]
    assert [m["step"] for m in manifests] == [3, 6]
    for manifest in manifests:
        assert manifest["metrics"]["knn_step"] == manifest["step"]
        assert {"knn_top1", "knn_raw_pixels", "knn_untrained"} <= set(manifest["metrics"])
    ema = trainer.task.encoder()
    online = trainer.method.encoder()
    assert not torch.equal(ema.block1.conv.weight, online.block1.conv.weight)
    # Resuming restores the average, not a fresh copy of the online weights.
    resumed = Trainer(tiny_config(run_dir, small_lake, *sets))
    assert resumed.resume()
    torch.testing.assert_close(resumed.task.encoder().block1.conv.weight, ema.block1.conv.weight, rtol=0, atol=0)

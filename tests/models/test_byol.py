"""BYOL against its definition: gradient-free EMA target, the EMA update and its τ schedule over the run's horizon
(fixed, never 1, without one), the paper's summed loss, untouched target on a skipped step, resume."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from streamssl.models import build_backbone
from streamssl.models.byol import BYOL, target_decay

BATCH = 8


def _tiny_byol(bn_splits: int = 1, **options: object) -> BYOL:
    backbone, feature_dim = build_backbone("convnet", 1, bn_splits=bn_splits)
    return BYOL(backbone, feature_dim, **{"projection_dim": 16, "hidden_dim": 32, **options})


def _views(size: int = 12) -> list[torch.Tensor]:
    return [torch.rand(BATCH, 1, size, size), torch.rand(BATCH, 1, size, size)]


def _online(byol: BYOL) -> list[torch.nn.Parameter]:
    return [*byol.backbone.parameters(), *byol.projector.parameters()]


def _target(byol: BYOL) -> list[torch.nn.Parameter]:
    return [*byol.target_backbone.parameters(), *byol.target_projector.parameters()]


def _perturb_online(byol: BYOL) -> None:
    """Makes online and target differ, as they do after a few optimizer steps."""
    with torch.no_grad():
        for param in _online(byol):
            param.add_(torch.randn_like(param))


@pytest.mark.parametrize(("step", "expected"), [(0, 0.99), (25, 0.999 - 0.009 * (math.cos(math.pi / 4) + 1) / 2),
                                                (50, 0.9945), (100, 0.999), (250, 0.999)])
def test_tau_rises_from_base_to_end_on_a_cosine_over_the_horizon_and_stays_there(step: int, expected: float) -> None:
    tau = target_decay(torch.tensor(step), tau_base=0.99, tau_end=0.999, horizon_steps=100)
    assert tau.item() == pytest.approx(expected, abs=1e-7)


def test_tau_follows_the_methods_progress() -> None:
    byol = _tiny_byol(tau_base=0.9, tau_end=1.0)
    byol.horizon_steps = 30  # as the trainer sets it before every step
    for step in (0, 7, 15, 29, 30, 45):
        byol.steps_done.fill_(step)
        progress = byol.progress(step)
        assert progress is not None
        assert byol.tau().item() == pytest.approx(1.0 - 0.1 * (math.cos(math.pi * progress) + 1) / 2, abs=1e-7)
    byol.horizon_steps = 60  # a re-estimated horizon moves τ with it
    assert byol.tau().item() == pytest.approx(1.0 - 0.1 * (math.cos(math.pi * 45 / 60) + 1) / 2, abs=1e-7)


@pytest.mark.parametrize("step", [0, 1, 10_000, 10**9])
def test_tau_is_fixed_below_one_on_an_unbounded_stream(step: int) -> None:
    assert target_decay(torch.tensor(step), tau_base=0.99, tau_end=1.0, horizon_steps=0).item() == pytest.approx(0.99)
    byol = _tiny_byol(tau_end=1.0)  # even with the paper's end value: there is no end on a stream
    assert byol.horizon_steps == 0 and byol.progress(step) is None
    byol.steps_done.fill_(step)
    assert byol.tau().item() == pytest.approx(0.99) and byol.tau().item() < 1.0


def test_target_gets_no_gradient_and_online_network_does() -> None:
    torch.manual_seed(0)
    byol = _tiny_byol()
    loss, _ = byol(_views())
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in _target(byol))
    assert all(p.grad is not None for p in [*_online(byol), *byol.predictor.parameters()])


def test_ema_update_after_the_step_is_tau_old_plus_one_minus_tau_online() -> None:
    torch.manual_seed(0)
    byol = _tiny_byol(tau_base=0.9)
    byol.horizon_steps = 40
    byol.steps_done.fill_(10)
    _perturb_online(byol)
    online = [p.detach().clone() for p in _online(byol)]
    old_target = [p.detach().clone() for p in _target(byol)]
    old_running_means = [m.running_mean.clone() for m in byol.target_backbone.modules() if hasattr(m, "running_mean")]
    tau = target_decay(torch.tensor(10), 0.9, 0.999, 40)
    assert 0.9 < tau.item() < 1.0

    byol.on_step_end(10)

    new_target = _target(byol)
    assert len(new_target) == len(online) == len(old_target)
    for new, old, onl in zip(new_target, old_target, online, strict=True):
        torch.testing.assert_close(new, tau * old + (1 - tau) * onl, rtol=0, atol=0)
    assert byol.steps_done.item() == 11
    # BN running statistics are the target's own, not averaged in
    running_means = [m.running_mean for m in byol.target_backbone.modules() if hasattr(m, "running_mean")]
    for new, old in zip(running_means, old_running_means, strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=0)


@pytest.mark.parametrize(("horizon", "tau_end", "moves"), [(5, 0.999, True), (0, 0.999, True), (5, 1.0, False)])
def test_target_keeps_moving_past_the_horizon_unless_tau_ends_at_one(horizon: int, tau_end: float, moves: bool) -> None:
    torch.manual_seed(0)
    byol = _tiny_byol(tau_end=tau_end)
    byol.horizon_steps = horizon
    byol.steps_done.fill_(50)  # ten times the horizon, or far into an unbounded stream
    _perturb_online(byol)
    before = [p.detach().clone() for p in _target(byol)]
    byol.on_step_end(50)
    changed = [not torch.equal(new, old) for new, old in zip(_target(byol), before, strict=True)]
    assert all(changed) if moves else not any(changed)


def test_a_skipped_step_leaves_the_target_and_its_schedule_untouched() -> None:
    torch.manual_seed(0)
    byol = _tiny_byol()
    byol.horizon_steps = 100
    _perturb_online(byol)
    state = {name: value.clone() for name, value in byol.state_dict().items() if name.startswith("target_")}
    byol.steps_done.fill_(3)
    byol(_views())  # a step whose loss turns out non-finite: the trainer discards it, no optimizer step
    byol.discard_step()
    byol.commit_step()  # nothing left to apply
    assert byol.steps_done.item() == 3
    for name, value in state.items():  # weights and BN running statistics alike
        torch.testing.assert_close(byol.state_dict()[name], value, rtol=0, atol=0)

    views = _views()
    plain = copy.deepcopy(byol)
    with torch.no_grad():
        for x in views:  # what the target's own passes do to its BN statistics
            plain.target_projector(plain.target_backbone(x))
    byol(views)  # a taken step: its BN statistics are committed, then the EMA moves the weights
    byol.commit_step()
    for name, value in plain.state_dict().items():
        if name.startswith("target_"):
            torch.testing.assert_close(byol.state_dict()[name], value, rtol=0, atol=0)
    assert not torch.equal(byol.target_backbone.block1.norm.running_mean, state["target_backbone.block1.norm.running_mean"])
    byol.on_step_end(3)
    assert byol.steps_done.item() == 4
    assert not torch.equal(byol.target_backbone.block1.conv.weight, state["target_backbone.block1.conv.weight"])


def test_loss_is_the_summed_normalised_mse_between_predictions_and_other_view_targets() -> None:
    torch.manual_seed(0)
    byol = _tiny_byol()
    _perturb_online(byol)  # only the online network: the target keeps its initial weights
    x1, x2 = _views()

    with torch.no_grad():
        t1, t2 = (byol.target_projector(byol.target_backbone(x)) for x in (x1, x2))
        p1, p2 = (byol.predictor(byol.projector(byol.backbone(x))) for x in (x1, x2))

        def normalised_mse(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # eq. 2: ||p/|p| - t/|t|||²
            return ((p / p.norm(dim=1, keepdim=True) - t / t.norm(dim=1, keepdim=True)) ** 2).sum(dim=1).mean()

        expected = normalised_mse(p1, t2) + normalised_mse(p2, t1)  # Algorithm 1: the sum, not the mean

    loss, logs = byol([x1, x2])

    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert 0.0 <= loss.item() <= 8.0
    torch.testing.assert_close(logs["prediction_target_cosine"], 1 - expected / 4, rtol=1e-5, atol=1e-6)
    assert set(logs) == {"embedding_std", "tau", "prediction_target_cosine"}
    assert all(value.ndim == 0 and not value.requires_grad for value in logs.values())
    assert logs["tau"].item() == pytest.approx(0.99)


def test_state_dict_round_trip_resumes_exactly() -> None:
    torch.manual_seed(0)
    trained = _tiny_byol(bn_splits=2)
    trained.horizon_steps = 10
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9)
    for step in range(2):
        loss, logs = trained(_views())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trained.commit_step()
        trained.on_step_end(step)
        assert torch.isfinite(loss) and all(torch.isfinite(value) for value in logs.values())
    assert trained.steps_done.item() == 2
    keys = set(trained.state_dict())
    assert "steps_done" in keys
    assert {key.split(".")[0] for key in keys} >= {"target_backbone", "target_projector", "predictor"}

    torch.manual_seed(123)  # a fresh process would start from other random weights
    resumed = _tiny_byol(bn_splits=2)
    resumed.load_state_dict(trained.state_dict())
    resumed.horizon_steps = 10  # the trainer sets it before every step
    views = _views()
    loss, logs = trained(views)
    resumed_loss, resumed_logs = resumed(views)
    for byol in (trained, resumed):
        byol.commit_step()
        byol.on_step_end(2)

    torch.testing.assert_close(resumed_loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(resumed_logs["tau"], logs["tau"], rtol=0, atol=0)
    assert 0.99 < logs["tau"].item() < 0.999  # the schedule resumed mid-way, not from step 0
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def test_forward_under_bf16_autocast_gives_a_float32_loss_with_gradients() -> None:
    torch.manual_seed(0)
    byol = _tiny_byol()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = byol(_views(16))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(value) for value in logs.values())
    assert all(p.dtype == torch.float32 for p in _target(byol))


@pytest.mark.parametrize(("options", "message"), [({"tau_base": 1.5}, "tau_base"), ({"tau_base": 1.0}, "tau_base"),
                                                  ({"tau_end": 0.98}, "tau_end"), ({"tau_end": 1.01}, "tau_end")])
def test_rejects_bad_schedule_options(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _tiny_byol(**options)


def test_embedding_std_log_is_of_the_online_projections() -> None:
    torch.manual_seed(0)
    byol = _tiny_byol()
    x1, x2 = _views()
    with torch.no_grad():
        z = torch.cat([byol.projector(byol.backbone(x)) for x in (x1, x2)])
    _, logs = byol([x1, x2])
    torch.testing.assert_close(logs["embedding_std"], F.normalize(z, dim=1).std(dim=0).mean())

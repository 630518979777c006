"""BYOL against its definition: frozen EMA target, the EMA update and τ schedule, the loss, resume."""

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


@pytest.mark.parametrize(("step", "expected"), [(0, 0.99), (25, 1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2),
                                                (50, 0.995), (100, 1.0), (250, 1.0)])
def test_tau_rises_from_base_to_one_on_a_cosine_and_stays_there(step: int, expected: float) -> None:
    tau = target_decay(torch.tensor(step), tau_base=0.99, horizon_steps=100)
    assert tau.item() == pytest.approx(expected, abs=1e-7)


def test_target_gets_no_gradient_and_online_network_does() -> None:
    torch.manual_seed(0)
    byol = _tiny_byol()
    loss, _ = byol(_views())
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in _target(byol))
    assert all(p.grad is not None for p in [*_online(byol), *byol.predictor.parameters()])


def test_ema_update_after_the_step_is_tau_old_plus_one_minus_tau_online() -> None:
    torch.manual_seed(0)
    byol = _tiny_byol(tau_base=0.9, tau_horizon_steps=40)
    byol.steps_done.fill_(10)
    _perturb_online(byol)
    online = [p.detach().clone() for p in _online(byol)]
    old_target = [p.detach().clone() for p in _target(byol)]
    old_running_means = [m.running_mean.clone() for m in byol.target_backbone.modules() if hasattr(m, "running_mean")]
    tau = target_decay(torch.tensor(10), 0.9, 40)
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


def test_target_stops_moving_after_the_horizon() -> None:
    torch.manual_seed(0)
    byol = _tiny_byol(tau_horizon_steps=5)
    byol.steps_done.fill_(5)
    _perturb_online(byol)
    before = [p.detach().clone() for p in _target(byol)]
    byol.on_step_end(5)
    for new, old in zip(_target(byol), before, strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=0)


def test_loss_is_the_averaged_normalised_mse_between_predictions_and_other_view_targets() -> None:
    torch.manual_seed(0)
    byol = _tiny_byol()
    _perturb_online(byol)  # only the online network: the target keeps its initial weights
    x1, x2 = _views()

    with torch.no_grad():
        t1, t2 = (byol.target_projector(byol.target_backbone(x)) for x in (x1, x2))
        p1, p2 = (byol.predictor(byol.projector(byol.backbone(x))) for x in (x1, x2))

        def normalised_mse(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # eq. 2: ||p/|p| - t/|t|||²
            return ((p / p.norm(dim=1, keepdim=True) - t / t.norm(dim=1, keepdim=True)) ** 2).sum(dim=1).mean()

        expected = (normalised_mse(p1, t2) + normalised_mse(p2, t1)) / 2

    loss, logs = byol([x1, x2])

    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert 0.0 <= loss.item() <= 4.0
    torch.testing.assert_close(logs["prediction_target_cosine"], 1 - expected / 2, rtol=1e-5, atol=1e-6)
    assert set(logs) == {"embedding_std", "tau", "prediction_target_cosine"}
    assert all(value.ndim == 0 and not value.requires_grad for value in logs.values())
    assert logs["tau"].item() == pytest.approx(0.99)


def test_state_dict_round_trip_resumes_exactly() -> None:
    torch.manual_seed(0)
    trained = _tiny_byol(bn_splits=2, tau_horizon_steps=10)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9)
    for step in range(2):
        loss, logs = trained(_views())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trained.on_step_end(step)
        assert torch.isfinite(loss) and all(torch.isfinite(value) for value in logs.values())
    assert trained.steps_done.item() == 2
    keys = set(trained.state_dict())
    assert "steps_done" in keys
    assert {key.split(".")[0] for key in keys} >= {"target_backbone", "target_projector", "predictor"}

    torch.manual_seed(123)  # a fresh process would start from other random weights
    resumed = _tiny_byol(bn_splits=2, tau_horizon_steps=10)
    resumed.load_state_dict(trained.state_dict())
    views = _views()
    loss, logs = trained(views)
    resumed_loss, resumed_logs = resumed(views)
    trained.on_step_end(2)
    resumed.on_step_end(2)

    torch.testing.assert_close(resumed_loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(resumed_logs["tau"], logs["tau"], rtol=0, atol=0)
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


def test_rejects_bad_schedule_options() -> None:
    with pytest.raises(ValueError, match="tau_base"):
        _tiny_byol(tau_base=1.5)
    with pytest.raises(ValueError, match="tau_horizon_steps"):
        _tiny_byol(tau_horizon_steps=0)


def test_embedding_std_log_is_of_the_online_projections() -> None:
    torch.manual_seed(0)
    byol = _tiny_byol()
    x1, x2 = _views()
    with torch.no_grad():
        z = torch.cat([byol.projector(byol.backbone(x)) for x in (x1, x2)])
    _, logs = byol([x1, x2])
    torch.testing.assert_close(logs["embedding_std"], F.normalize(z, dim=1).std(dim=0).mean())

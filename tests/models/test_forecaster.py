"""Forecaster: heads per mode, the loss against its definition, persistence, the published trunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streamssl.models.forecaster import Forecaster
from streamssl.pipeline.sections import options_section


@pytest.mark.parametrize(("mode", "channels", "n_aux"), [
    ("single", 1, 0), ("mtl", 1, 2), ("mtv", 3, 0), ("combined", 3, 2),
])
@pytest.mark.parametrize("trunk", ["cnn", "lstm"])
def test_shapes_and_loss_definition(mode: str, channels: int, n_aux: int, trunk: str) -> None:
    torch.manual_seed(0)
    model = Forecaster(channels, 6, n_aux, mode=mode, trunk=trunk, hidden=16, aux_weight=0.5)
    inputs, targets = torch.randn(8, channels, 6), torch.randn(8, 1 + n_aux)
    out = model.outputs(inputs)
    assert out.shape == (8, 1 + n_aux)
    loss, logs = model(inputs, targets)
    expected = F.mse_loss(out[:, 0], targets[:, 0])
    if n_aux:
        # mean over the auxiliary heads of each head's MSE
        per_head = torch.stack([F.mse_loss(out[:, 1 + k], targets[:, 1 + k]) for k in range(n_aux)])
        expected = expected + 0.5 * per_head.mean()
        assert logs["aux_mse"] == pytest.approx(per_head.mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.predict(inputs).shape == (8,)
    assert model.encoder()(inputs).shape == (8, 16)


def test_persistence_predicts_the_last_value() -> None:
    model = Forecaster(1, 5, 0, mode="persistence")
    assert not list(model.parameters())
    inputs = torch.randn(4, 1, 5)
    torch.testing.assert_close(model.predict(inputs), inputs[:, 0, -1])


def test_predict_change_starts_from_persistence() -> None:
    model = Forecaster(2, 4, 1, mode="combined", hidden=8)
    torch.nn.init.zeros_(model.heads.weight)
    torch.nn.init.zeros_(model.heads.bias)
    inputs = torch.randn(3, 2, 4)
    torch.testing.assert_close(model.predict(inputs), inputs[:, 0, -1])
    plain = Forecaster(2, 4, 1, mode="combined", hidden=8, predict_change=False)
    torch.nn.init.zeros_(plain.heads.weight)
    torch.nn.init.zeros_(plain.heads.bias)
    torch.testing.assert_close(plain.predict(inputs), torch.zeros(3))


@pytest.mark.parametrize(("mode", "channels", "n_aux", "message"), [
    ("single", 2, 0, "raw series only"), ("mtl", 3, 1, "raw series only"), ("mtv", 2, 1, "no auxiliary targets"),
    ("persistence", 1, 1, "no auxiliary targets"), ("boosted", 1, 0, "unknown forecast mode"),
])
def test_inconsistent_arguments_raise(mode: str, channels: int, n_aux: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Forecaster(channels, 4, n_aux, mode=mode)


def test_wrong_input_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"expects inputs \[B, 1, 4\]"):
        Forecaster(1, 4, 0, mode="single").predict(torch.randn(2, 1, 5))


def test_options_become_a_config_section() -> None:
    section = options_section(Forecaster)()
    assert (section.mode, section.hidden, section.trunk, section.aux_weight, section.predict_change) == (
        "combined", 64, "cnn", 1.0, True)

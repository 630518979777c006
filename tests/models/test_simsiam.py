"""SimSiam against its definition: the stop-gradient, the symmetrised negative-cosine loss, its range, resume."""

import pytest
import torch

from streamssl.models import build_backbone
from streamssl.models.losses import prediction_target_cosine
from streamssl.models.simsiam import SimSiam

BATCH = 8


def _tiny_simsiam(**options: object) -> SimSiam:
    backbone, feature_dim = build_backbone("convnet", 1, bn_splits=1)
    return SimSiam(backbone, feature_dim, **{"dim": 16, "pred_hidden_dim": 8, **options})


def _views(size: int = 12) -> list[torch.Tensor]:
    return [torch.rand(BATCH, 1, size, size), torch.rand(BATCH, 1, size, size)]


def test_stop_gradient_leaves_only_the_predictor_path_into_the_projections() -> None:
    torch.manual_seed(0)
    simsiam = _tiny_simsiam()
    z1, z2 = torch.randn(BATCH, 16, requires_grad=True), torch.randn(BATCH, 16, requires_grad=True)
    loss = -prediction_target_cosine(simsiam.predictor(z1), simsiam.predictor(z2), z1, z2)
    grads = torch.autograd.grad(loss, [z1, z2])

    # The same loss with the targets replaced by constant copies: the gradient may only come through p.
    constant1, constant2 = z1.detach().clone(), z2.detach().clone()
    through_predictor = -prediction_target_cosine(simsiam.predictor(z1), simsiam.predictor(z2), constant1, constant2)
    expected = torch.autograd.grad(through_predictor, [z1, z2])
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want, rtol=0, atol=0)

    # Without the stop-gradient the target branch would add its own, non-zero, share.
    def no_stop(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(p, z, dim=1).mean()

    no_stop_loss = -(no_stop(simsiam.predictor(z1), z2) + no_stop(simsiam.predictor(z2), z1)) / 2
    assert not torch.allclose(torch.autograd.grad(no_stop_loss, [z1])[0], grads[0])


def test_loss_is_the_symmetrised_negative_cosine_computed_by_hand() -> None:
    torch.manual_seed(0)
    simsiam = _tiny_simsiam()
    x1, x2 = _views()
    with torch.no_grad():
        z1, z2 = (simsiam.projector(simsiam.backbone(x)) for x in (x1, x2))
        p1, p2 = simsiam.predictor(z1), simsiam.predictor(z2)

        def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # D(p, z), eq. 1
            return -((p / p.norm(dim=1, keepdim=True)) * (z / z.norm(dim=1, keepdim=True))).sum(dim=1).mean()

        expected = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2

    loss, logs = simsiam([x1, x2])

    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["prediction_target_cosine"], -expected, rtol=1e-5, atol=1e-6)
    assert set(logs) == {"embedding_std", "prediction_target_cosine"}
    assert all(value.ndim == 0 and not value.requires_grad for value in logs.values())


def test_loss_stays_in_minus_one_to_one_and_reaches_minus_one_when_predictions_match() -> None:
    torch.manual_seed(0)
    simsiam = _tiny_simsiam()
    optimizer = torch.optim.SGD(simsiam.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        loss, logs = simsiam(_views(16))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert -1.0 <= loss.item() <= 1.0
        assert all(torch.isfinite(value) for value in logs.values())
    # A predictor that is the identity maps each projection onto a positive multiple of itself; with
    # both views equal, every prediction points exactly at its target.
    with torch.no_grad():
        simsiam.predictor = torch.nn.Identity()
        x = torch.rand(BATCH, 1, 12, 12)
        assert simsiam([x, x])[0].item() == pytest.approx(-1.0, abs=1e-6)


def test_projector_ends_in_a_batch_norm_without_affine_parameters() -> None:
    simsiam = _tiny_simsiam()
    last = simsiam.projector[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine and last.num_features == 16
    assert simsiam.predictor[0].out_features == 8  # the bottleneck


def test_forward_under_bf16_autocast_gives_a_float32_loss_with_gradients() -> None:
    torch.manual_seed(0)
    simsiam = _tiny_simsiam()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = simsiam(_views(16))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None for p in simsiam.backbone.parameters())


def test_state_dict_round_trip_resumes_exactly() -> None:
    torch.manual_seed(0)
    trained = _tiny_simsiam()
    trained(_views())  # moves the BN running statistics
    torch.manual_seed(123)
    resumed = _tiny_simsiam()
    resumed.load_state_dict(trained.state_dict())
    views = _views()
    torch.testing.assert_close(resumed(views)[0], trained(views)[0], rtol=0, atol=0)

"""SimCLR against its definition: NT-Xent over the head's outputs, logs, autocast, resume.

The loss function itself is checked against a brute-force loop in test_losses.py.
"""

import pytest
import torch
import torch.nn.functional as F

from streamssl.models import build_backbone
from streamssl.models.losses import nt_xent
from streamssl.models.simclr import SimCLR

BATCH = 8


def _tiny_simclr(**options: object) -> SimCLR:
    backbone, feature_dim = build_backbone("convnet", 1, bn_splits=1)
    return SimCLR(backbone, feature_dim, **{"dim": 16, **options})


def _views(size: int = 12) -> list[torch.Tensor]:
    return [torch.rand(BATCH, 1, size, size), torch.rand(BATCH, 1, size, size)]


def test_loss_is_nt_xent_of_the_head_outputs() -> None:
    torch.manual_seed(0)
    simclr = _tiny_simclr(temperature=0.3)
    x1, x2 = _views()
    with torch.no_grad():
        z1, z2 = (simclr.head(simclr.backbone(x)) for x in (x1, x2))

    loss, logs = simclr([x1, x2])

    torch.testing.assert_close(loss.detach(), nt_xent(z1, z2, 0.3))
    torch.testing.assert_close(logs["positive_similarity"], F.cosine_similarity(z1, z2, dim=1).mean())
    assert set(logs) == {"embedding_std", "positive_similarity"}
    assert all(value.ndim == 0 and not value.requires_grad for value in logs.values())


def test_sgd_steps_raise_the_positive_similarity_of_fixed_views() -> None:
    torch.manual_seed(0)
    simclr = _tiny_simclr()
    optimizer = torch.optim.SGD(simclr.parameters(), lr=0.1, momentum=0.9)
    views = _views(16)
    first_loss, first_logs = simclr(views)
    for _ in range(5):
        loss, _ = simclr(views)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last_loss, last_logs = simclr(views)
    assert last_loss.item() < first_loss.item()
    assert last_logs["positive_similarity"] > first_logs["positive_similarity"]


def test_forward_under_bf16_autocast_gives_a_float32_loss_with_gradients() -> None:
    torch.manual_seed(0)
    simclr = _tiny_simclr()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = simclr(_views(16))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(value) for value in logs.values())
    assert all(p.grad is not None for p in simclr.backbone.parameters())


def test_rejects_a_non_positive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        _tiny_simclr(temperature=0.0)


def test_state_dict_round_trip_resumes_exactly() -> None:
    torch.manual_seed(0)
    trained = _tiny_simclr()
    trained(_views())  # moves the BN running statistics
    torch.manual_seed(123)
    resumed = _tiny_simclr()
    resumed.load_state_dict(trained.state_dict())
    views = _views()
    torch.testing.assert_close(resumed(views)[0], trained(views)[0], rtol=0, atol=0)

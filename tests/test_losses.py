"""The pure math of models/: InfoNCE and the embedding-std collapse signal, checked against their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from streamssl.models.losses import info_nce
from streamssl.models.method import embedding_std


def _unit_rows(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_equals_per_sample_definition(temperature: float) -> None:
    torch.manual_seed(0)
    query, positive_key, negatives = _unit_rows(5, 8), _unit_rows(5, 8), _unit_rows(7, 8)

    per_sample = []
    for q, k in zip(query.tolist(), positive_key.tolist(), strict=True):
        logits = [sum(a * b for a, b in zip(q, key, strict=True)) / temperature
                  for key in [k, *negatives.tolist()]]
        per_sample.append(-logits[0] + math.log(sum(math.exp(logit) for logit in logits)))
    expected = sum(per_sample) / len(per_sample)

    assert info_nce(query, positive_key, negatives, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_is_log_of_candidate_count_when_all_similarities_are_equal() -> None:
    # Every query orthogonal to its key and to all negatives: a uniform guess among K + 1 candidates.
    eye = torch.eye(6)
    query, positive_key, negatives = eye[:2], eye[2:4], eye[4:].repeat(5, 1)
    assert info_nce(query, positive_key, negatives, 0.2).item() == pytest.approx(math.log(11))


def test_info_nce_gradient_flows_to_the_query() -> None:
    query = _unit_rows(4, 8).float().requires_grad_()
    info_nce(query, _unit_rows(4, 8).float(), _unit_rows(16, 8).float(), 0.2).backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()


def test_embedding_std_of_random_gaussians_is_about_one_over_sqrt_dim() -> None:
    torch.manual_seed(0)
    dim = 64
    assert embedding_std(torch.randn(4096, dim)).item() == pytest.approx(1 / math.sqrt(dim), rel=0.03)


def test_embedding_std_is_zero_for_identical_rows() -> None:
    z = torch.randn(1, 32).repeat(100, 1) * 5  # scale must not matter: rows are normalised first
    assert embedding_std(z).item() == pytest.approx(0.0, abs=1e-6)

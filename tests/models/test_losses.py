"""The pure math of models/: InfoNCE, NT-Xent, the BYOL/SimSiam prediction cosine and the embedding-std collapse
signal, checked against their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from streamssl.models.losses import info_nce, nt_xent, prediction_target_cosine
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


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.mark.parametrize("temperature", [0.1, 0.2, 0.5])
def test_nt_xent_equals_a_loop_over_all_2n_anchors(temperature: float) -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 8) * 3, torch.randn(5, 8)  # any scale: NT-Xent normalises
    rows = torch.cat([z1, z2]).tolist()
    n = len(z1)

    per_anchor = []
    for anchor in range(2 * n):
        positive = (anchor + n) % (2 * n)
        logits = {other: _cosine(rows[anchor], rows[other]) / temperature for other in range(2 * n) if other != anchor}
        per_anchor.append(-logits[positive] + math.log(sum(math.exp(logit) for logit in logits.values())))
    expected = sum(per_anchor) / len(per_anchor)

    assert nt_xent(z1, z2, temperature).item() == pytest.approx(expected, abs=1e-6)


def test_nt_xent_of_aligned_orthogonal_pairs_is_its_closed_form_and_beats_random() -> None:
    # z1 = z2 = distinct one-hot rows: every positive at cosine 1, every one of the 2N - 2 negatives at 0.
    n, temperature = 4, 0.2
    aligned = torch.eye(8)[:n]
    best = -1 / temperature + math.log(math.exp(1 / temperature) + 2 * n - 2)
    assert nt_xent(aligned, aligned.clone(), temperature).item() == pytest.approx(best, rel=1e-6)

    torch.manual_seed(0)
    random_losses = [nt_xent(torch.randn(n, 8), torch.randn(n, 8), temperature).item() for _ in range(20)]
    assert min(random_losses) > best + 1.0


def test_nt_xent_is_invariant_to_permuting_the_batch() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    order = torch.randperm(6)
    torch.testing.assert_close(nt_xent(z1[order], z2[order], 0.2), nt_xent(z1, z2, 0.2))
    # Permuting one view only breaks the pairs, which must change the loss.
    assert not torch.allclose(nt_xent(z1[order], z2, 0.2), nt_xent(z1, z2, 0.2))


def test_nt_xent_under_bf16_autocast_is_float32_and_close_to_the_float32_loss() -> None:
    torch.manual_seed(0)
    z1 = torch.randn(8, 16, requires_grad=True)
    z2 = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent(z1, z2, 0.1)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), nt_xent(z1, z2, 0.1).detach(), rtol=0, atol=1e-6)
    assert z1.grad is not None and torch.isfinite(z1.grad).all()


def test_prediction_target_cosine_averages_both_directions_by_hand() -> None:
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(4, 6) for _ in range(4))
    by_hand = [(_cosine(p1[i].tolist(), z2[i].tolist()) + _cosine(p2[i].tolist(), z1[i].tolist())) / 2 for i in range(4)]
    assert prediction_target_cosine(p1, p2, z1, z2).item() == pytest.approx(sum(by_hand) / 4, abs=1e-6)


def test_prediction_target_cosine_is_one_for_aligned_and_minus_one_for_opposite_predictions() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 6), torch.randn(4, 6)
    assert prediction_target_cosine(2 * z2, 0.5 * z1, z1, z2).item() == pytest.approx(1.0, abs=1e-6)
    assert prediction_target_cosine(-z2, -z1, z1, z2).item() == pytest.approx(-1.0, abs=1e-6)


def test_prediction_target_cosine_sends_no_gradient_into_the_targets() -> None:
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(4, 6, requires_grad=True) for _ in range(4))
    grads = torch.autograd.grad(prediction_target_cosine(p1, p2, z1, z2), [p1, p2, z1, z2], allow_unused=True)
    assert grads[0] is not None and grads[1] is not None
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert grads[2] is None and grads[3] is None  # stop-gradient: the targets are constants

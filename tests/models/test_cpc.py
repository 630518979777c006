"""CPC against its definition: multi-step InfoNCE, the latent queue, the series encoder, resume, and learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from streamssl.models import Method
from streamssl.models.cpc import CPC, multi_step_info_nce
from streamssl.models.series_backbones import PooledSeriesEncoder, SeriesEncoder, build_series_encoder


def _tiny_cpc(**options: object) -> CPC:
    backbone, feature_dim = build_series_encoder("conv", channels=1, hidden=16)
    return CPC(backbone, feature_dim, **{"context_dim": 16, "prediction_steps": 3, **options})


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def _brute_force_info_nce(predictions: torch.Tensor, latents: torch.Tensor, temperature: float,
                          negatives: torch.Tensor, valid: torch.Tensor) -> tuple[list[float], list[float]]:
    """The definition, one prediction at a time: -log softmax of the positive among the same-time latents
    of every window of the batch and the valid queue rows."""
    batch, length, steps, _ = predictions.shape
    losses, accuracies = [], []
    for step in range(1, steps + 1):
        terms, hits = [], []
        for t in range(length - step):
            for b in range(batch):
                p = predictions[b, t, step - 1]
                candidates = [float(p @ latents[c, t + step]) for c in range(batch)]
                candidates += [float(p @ negatives[q]) for q in range(len(negatives)) if valid[q]]
                scaled = [s / temperature for s in candidates]
                log_denominator = math.log(sum(math.exp(s) for s in scaled))
                terms.append(log_denominator - scaled[b])
                hits.append(float(max(range(len(scaled)), key=scaled.__getitem__) == b))
        losses.append(sum(terms) / len(terms))
        accuracies.append(sum(hits) / len(hits))
    return losses, accuracies


@pytest.mark.parametrize("queue_rows", [0, 5])
def test_multi_step_info_nce_matches_the_definition(queue_rows: int) -> None:
    torch.manual_seed(0)
    predictions, latents = _unit(4, 6, 3, 8).double(), _unit(4, 6, 8).double()
    negatives = _unit(queue_rows, 8).double()
    valid = torch.tensor([True, False, True, True, False])[:queue_rows]
    losses, accuracies = multi_step_info_nce(predictions, latents, 0.5, negatives if queue_rows else None,
                                             valid if queue_rows else None)
    expected_losses, expected_accuracies = _brute_force_info_nce(predictions, latents, 0.5, negatives, valid)
    torch.testing.assert_close(losses, torch.tensor(expected_losses, dtype=losses.dtype), rtol=1e-5, atol=1e-6)
    assert accuracies.tolist() == pytest.approx(expected_accuracies)


def test_multi_step_info_nce_rewards_predictions_that_equal_their_targets() -> None:
    torch.manual_seed(0)
    latents = _unit(8, 10, 16)
    perfect = torch.stack([latents.roll(-step, dims=1) for step in (1, 2)], dim=2)  # row t holds z_{t+k}
    losses, accuracies = multi_step_info_nce(perfect, latents, 0.05)
    random_losses, _ = multi_step_info_nce(_unit(8, 10, 2, 16), latents, 0.05)
    assert accuracies.tolist() == [1.0, 1.0]
    assert (losses < 0.01).all() and (random_losses > 1.0).all()


def test_windows_too_short_for_the_prediction_steps_raise_one_line() -> None:
    cpc = _tiny_cpc(prediction_steps=4)  # 32 points -> 4 latents: nothing left to predict 4 steps ahead
    with pytest.raises(ValueError, match="4 latents for 4 prediction steps"):
        cpc([torch.randn(2, 1, 32)])


def test_queue_is_a_fifo_ring_that_wraps_around() -> None:
    torch.manual_seed(0)
    cpc = _tiny_cpc(queue_size=10)
    first, second, third = _unit(4, 16), _unit(4, 16), _unit(4, 16)
    cpc._dequeue_and_enqueue(first)
    assert cpc.queue_ptr.item() == 4 and cpc._filled_slots().tolist() == [True] * 4 + [False] * 6
    torch.testing.assert_close(cpc.queue[:4], first, rtol=0, atol=0)
    cpc._dequeue_and_enqueue(second)
    cpc._dequeue_and_enqueue(third)  # 12 latents into 10 slots: the last two wrap to the front
    torch.testing.assert_close(cpc.queue, torch.cat([third[2:], first[2:], second, third[:2]]), rtol=0, atol=0)
    assert cpc.queue_ptr.item() == 2 and cpc.latents_enqueued.item() == 12
    assert cpc._filled_slots().all()

    many = _unit(23, 16)  # more latents than slots: only the last 10 survive, in ring order
    cpc._dequeue_and_enqueue(many)
    assert cpc.queue_ptr.item() == (2 + 23) % 10
    torch.testing.assert_close(cpc.queue, many[-10:].roll(5, dims=0), rtol=0, atol=0)


def test_forward_enqueues_every_latent_and_ignores_empty_slots() -> None:
    torch.manual_seed(0)
    queued, plain = _tiny_cpc(queue_size=100), _tiny_cpc()
    plain.load_state_dict({k: v for k, v in queued.state_dict().items() if not k.startswith(("queue", "latents"))},
                          strict=False)
    windows = torch.randn(4, 1, 64)  # 8 latents each: 32 enqueued per step
    loss, logs = queued([windows])
    queued.commit_step()  # the trainer's call after a taken step: the queue write was staged until now
    plain_loss, plain_logs = plain([windows])
    # The empty queue adds no negatives: the first step equals in-batch CPC exactly.
    torch.testing.assert_close(loss, plain_loss)
    assert logs["queue_fill"].item() == 0 and "queue_fill" not in plain_logs
    with torch.no_grad():
        expected = F.normalize(queued.backbone(windows).transpose(1, 2), dim=2).flatten(0, 1)
    torch.testing.assert_close(queued.queue[:32], expected, rtol=1e-5, atol=1e-6)
    second_loss, second_logs = queued([windows])
    assert second_loss.item() > loss.item() + 0.1  # 32 more negatives: these very windows, positives included
    assert second_logs["queue_fill"].item() == pytest.approx(0.32)
    assert set(logs) == {"cpc_accuracy", "embedding_std", "queue_fill", "cpc_loss_step1", "cpc_loss_step2",
                         "cpc_loss_step3"}
    assert all(value.ndim == 0 and not value.requires_grad for value in logs.values())


def test_with_a_queue_targets_come_from_the_momentum_copy_and_only_the_online_side_learns() -> None:
    torch.manual_seed(0)
    cpc = _tiny_cpc(queue_size=64, momentum=0.9)
    assert _tiny_cpc().key_backbone is None  # in-batch CPC needs no copy
    with torch.no_grad():  # make the encoder and its copy differ, as they do after some optimizer steps
        for param in cpc.backbone.parameters():
            param.add_(torch.randn_like(param))
    online = [p.detach().clone() for p in cpc.backbone.parameters()]
    copied = [p.detach().clone() for p in cpc.key_backbone.parameters()]
    windows = torch.randn(4, 1, 64)

    loss, _ = cpc([windows])
    loss.backward()
    with torch.no_grad():  # the targets this step enqueues: from the copy as it was before this step's update
        expected = F.normalize(cpc.key_backbone(windows).transpose(1, 2), dim=2).flatten(0, 1)
    cpc.commit_step()  # after the optimizer step the copy moves towards the online encoder (MoCo's Algorithm 1)

    for new, k, q in zip(cpc.key_backbone.parameters(), copied, online, strict=True):
        torch.testing.assert_close(new, 0.9 * k + 0.1 * q, rtol=0, atol=0)
    torch.testing.assert_close(cpc.queue[:32], expected, rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad and p.grad is None for p in cpc.key_backbone.parameters())
    assert all(p.grad is not None for p in [*cpc.backbone.parameters(), *cpc.context.parameters()])
    assert {name for name in cpc.state_dict() if name.startswith("key_backbone.")}


def test_state_dict_round_trip_resumes_exactly() -> None:
    torch.manual_seed(0)
    trained = _tiny_cpc(queue_size=50)
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-2)
    for _ in range(3):
        loss, _ = trained([torch.randn(4, 1, 64)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trained.commit_step()
    assert {"queue", "queue_ptr", "latents_enqueued"} <= set(trained.state_dict())
    torch.manual_seed(123)  # a fresh process starts from other random weights
    resumed = _tiny_cpc(queue_size=50)
    resumed.load_state_dict(trained.state_dict())
    windows = torch.randn(4, 1, 64)
    torch.testing.assert_close(resumed([windows])[0], trained([windows])[0], rtol=0, atol=0)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def _sine_windows(count: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Sines of random frequency (2-10 cycles per 64 points) and phase, plus a little noise: [count, 1, length]."""
    frequency = (2 + 8 * torch.rand(count, 1, generator=gen)) / 64
    phase = 2 * math.pi * torch.rand(count, 1, generator=gen)
    time = torch.arange(length, dtype=torch.float32)
    values = torch.sin(2 * math.pi * frequency * time + phase) + 0.1 * torch.randn(count, length, generator=gen)
    return values.unsqueeze(1)


def test_a_few_steps_on_sine_windows_reduce_the_held_out_loss() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cpc = _tiny_cpc()
    held_out = _sine_windows(32, 64, gen)
    with torch.no_grad():
        before, before_logs = cpc([held_out])
    optimizer = torch.optim.Adam(cpc.parameters(), lr=3e-3)
    for _ in range(40):
        loss, _ = cpc([_sine_windows(32, 64, gen)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after, after_logs = cpc([held_out])
    assert after.item() < before.item() - 0.5
    assert after_logs["cpc_accuracy"].item() > max(0.3, before_logs["cpc_accuracy"].item() + 0.15)  # chance: 1/32


def test_forward_under_bf16_autocast_gives_a_float32_loss_and_queue() -> None:
    torch.manual_seed(0)
    cpc = _tiny_cpc(queue_size=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = cpc([torch.randn(4, 1, 64)])
    loss.backward()
    cpc.commit_step()
    assert torch.isfinite(loss) and loss.dtype == torch.float32 and cpc.queue.dtype == torch.float32
    torch.testing.assert_close(cpc.queue[:32].norm(dim=1), torch.ones(32))


def test_encoder_is_the_pooled_backbone_sharing_its_weights() -> None:
    torch.manual_seed(0)
    cpc = _tiny_cpc()
    assert isinstance(cpc, Method) and cpc.name == "cpc" and cpc.num_views == 1
    published = cpc.encoder()
    windows = torch.randn(3, 1, 100)
    torch.testing.assert_close(published(windows), cpc.backbone(windows).mean(dim=2))
    assert published(windows).shape == (3, cpc.feature_dim)
    assert all(a is b for a, b in zip(published.parameters(), cpc.backbone.parameters(), strict=True))
    assert set(published.state_dict()) == {f"encoder.{name}" for name in cpc.backbone.state_dict()}


def test_series_encoder_length_and_independence_of_batch_and_far_future() -> None:
    torch.manual_seed(0)
    encoder = SeriesEncoder(channels=2, hidden=8, layers=3, downsample=2)
    for length in (1, 7, 8, 9, 64, 97, 128):
        assert encoder(torch.randn(1, 2, length)).shape == (1, 8, encoder.latent_length(length))
    assert encoder.latent_length(128) == 16 and encoder.latent_length(97) == 13

    windows = torch.randn(5, 2, 128)
    latents = encoder(windows)
    # No batch statistics: a window's latents do not depend on the rest of its batch.
    torch.testing.assert_close(encoder(windows[2:3]), latents[2:3])
    # No statistics over time: changing points >= 100 leaves latents whose receptive field ends earlier alone.
    changed = windows.clone()
    changed[..., 100:] = 5.0
    changed_latents = encoder(changed)
    torch.testing.assert_close(changed_latents[..., :10], latents[..., :10])
    assert not torch.allclose(changed_latents[..., -1], latents[..., -1])

    with pytest.raises(ValueError, match=r"expects windows \[B, 2, T\]"):
        encoder(torch.randn(5, 1, 128))
    with pytest.raises(ValueError, match="unknown series backbone 'lstm'"):
        build_series_encoder("lstm")
    assert isinstance(PooledSeriesEncoder(encoder)(windows), torch.Tensor)

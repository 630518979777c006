"""MoCo against its definition: queue ring buffer, momentum update, frozen key encoder, loss, resume."""

import pytest
import torch
import torch.nn.functional as F

from streamssl.models import Method, build_backbone, build_method
from streamssl.models.losses import info_nce
from streamssl.models.moco import MoCo
from streamssl.models.registry import METHODS

BATCH = 4


def _tiny_moco(bn_splits: int = 1, **options: object) -> MoCo:
    backbone, feature_dim = build_backbone("convnet", 1, bn_splits=bn_splits)
    return MoCo(backbone, feature_dim, **{"dim": 8, "queue_size": 10, **options})


def _views(batch: int = BATCH) -> list[torch.Tensor]:
    return [torch.rand(batch, 1, 12, 12), torch.rand(batch, 1, 12, 12)]


def _keys(batch: int, dim: int = 8) -> torch.Tensor:
    return F.normalize(torch.randn(batch, dim), dim=1)


def test_queue_is_a_fifo_ring_that_wraps_around() -> None:
    torch.manual_seed(0)
    moco = _tiny_moco()
    initial = moco.queue.clone()
    first, second, third = _keys(BATCH), _keys(BATCH), _keys(BATCH)

    moco._dequeue_and_enqueue(first)
    assert moco.queue_ptr.item() == 4
    torch.testing.assert_close(moco.queue[:4], first, rtol=0, atol=0)
    torch.testing.assert_close(moco.queue[4:], initial[4:], rtol=0, atol=0)

    moco._dequeue_and_enqueue(second)
    moco._dequeue_and_enqueue(third)  # 12 keys into 10 slots: the last two wrap to the front
    expected = torch.cat([third[2:], first[2:], second, third[:2]])
    torch.testing.assert_close(moco.queue, expected, rtol=0, atol=0)
    assert moco.queue_ptr.item() == 2
    assert moco.keys_enqueued.item() == 12


def test_batch_larger_than_queue_equals_enqueueing_key_by_key() -> None:
    torch.manual_seed(0)
    batched, one_by_one = _tiny_moco(), _tiny_moco()
    batched._dequeue_and_enqueue(_keys(3))
    one_by_one.load_state_dict(batched.state_dict())
    keys = _keys(13)

    batched._dequeue_and_enqueue(keys)
    for key in keys:
        one_by_one._dequeue_and_enqueue(key[None])

    torch.testing.assert_close(batched.queue, one_by_one.queue, rtol=0, atol=0)
    assert batched.queue_ptr.item() == one_by_one.queue_ptr.item() == (3 + 13) % 10


def test_queue_fill_counts_enqueued_keys_up_to_one() -> None:
    torch.manual_seed(0)
    moco = _tiny_moco()
    fills = []
    for _ in range(3):
        fills.append(moco(_views())[1]["queue_fill"].item())
        moco.commit_step()
    assert fills == pytest.approx([0.4, 0.8, 1.0])
    assert moco.keys_enqueued.item() == 12


def test_a_step_that_is_not_taken_leaves_queue_and_key_encoder_untouched() -> None:
    torch.manual_seed(0)
    moco = _tiny_moco(momentum=0.5)
    with torch.no_grad():
        for param in moco.backbone.parameters():
            param.add_(1.0)  # the encoders differ, so a momentum update would show
    before = {name: value.clone() for name, value in moco.state_dict().items()}
    moco(_views())
    moco.discard_step()  # the trainer saw a non-finite loss
    moco.commit_step()  # nothing left to apply
    after = moco.state_dict()
    for name in ("queue", "queue_ptr", "keys_enqueued", "key_backbone.block1.conv.weight"):
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    moco(_views())
    moco.commit_step()  # a taken step: the key encoder moves and the keys go in
    assert moco.keys_enqueued.item() == BATCH
    assert not torch.equal(moco.state_dict()["key_backbone.block1.conv.weight"], before["key_backbone.block1.conv.weight"])


def test_momentum_update_moves_every_key_parameter_towards_the_query_encoder() -> None:
    torch.manual_seed(0)
    moco = _tiny_moco(momentum=0.9)
    with torch.no_grad():  # make the two encoders differ, as they do after a few optimizer steps
        for param in [*moco.backbone.parameters(), *moco.head.parameters()]:
            param.add_(torch.randn_like(param))
    query_params = [p.detach().clone() for p in [*moco.backbone.parameters(), *moco.head.parameters()]]
    key_params = [p.detach().clone() for p in [*moco.key_backbone.parameters(), *moco.key_head.parameters()]]

    moco._momentum_update_key_encoder()

    updated = [*moco.key_backbone.parameters(), *moco.key_head.parameters()]
    assert len(updated) == len(query_params) == len(key_params)
    for new, k, q in zip(updated, key_params, query_params, strict=True):
        torch.testing.assert_close(new, 0.9 * k + (1 - 0.9) * q, rtol=0, atol=0)


def test_key_encoder_gets_no_gradient() -> None:
    torch.manual_seed(0)
    moco = _tiny_moco()
    loss, _ = moco(_views())
    loss.backward()
    assert all(not p.requires_grad and p.grad is None
               for p in [*moco.key_backbone.parameters(), *moco.key_head.parameters()])
    assert all(p.grad is not None for p in [*moco.backbone.parameters(), *moco.head.parameters()])


def test_keys_come_back_in_input_order_after_the_shuffle() -> None:
    torch.manual_seed(0)
    moco = _tiny_moco().eval()  # eval BN: every key depends on its own image only
    images = torch.rand(8, 1, 12, 12)
    expected = F.normalize(moco.key_head(moco.key_backbone(images)), dim=1)
    torch.testing.assert_close(moco._encode_keys_with_shuffled_batch(images), expected)


@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_is_info_nce_against_the_queue_before_this_batch(symmetric: bool) -> None:
    torch.manual_seed(0)
    moco = _tiny_moco(symmetric=symmetric)
    x1, x2 = _views()
    negatives = moco.queue.clone()

    # Key and query encoders start equal, and with one BN over the batch the shuffle changes nothing,
    # so the keys are the query encoder's plain outputs.
    def query(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(moco.head(moco.backbone(x)), dim=1)

    with torch.no_grad():
        k1, k2 = query(x1), query(x2)
        one_direction = info_nce(query(x1), k2, negatives, moco.temperature)
        both_directions = (one_direction + info_nce(query(x2), k1, negatives, moco.temperature)) / 2

    loss, logs = moco([x1, x2])
    moco.commit_step()

    torch.testing.assert_close(loss.detach(), both_directions if symmetric else one_direction)
    enqueued = torch.cat([k2, k1]) if symmetric else k2
    torch.testing.assert_close(moco.queue[: len(enqueued)], enqueued, rtol=1e-5, atol=1e-6)
    assert moco.keys_enqueued.item() == len(enqueued)
    assert set(logs) == {"queue_fill", "embedding_std", "positive_similarity"}
    assert all(value.ndim == 0 and not value.requires_grad for value in logs.values())


def test_sgd_steps_with_split_bn_give_finite_losses() -> None:
    torch.manual_seed(0)
    moco = _tiny_moco(bn_splits=2)
    optimizer = torch.optim.SGD(moco.parameters(), lr=0.05, momentum=0.9)
    for step in range(4):
        loss, logs = moco(_views(8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        moco.commit_step()
        moco.on_step_end(step)
        assert torch.isfinite(loss)
        assert all(torch.isfinite(value) for value in logs.values())


def test_forward_under_bf16_autocast_keeps_the_queue_in_float32() -> None:
    torch.manual_seed(0)
    moco = _tiny_moco(symmetric=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = moco(_views())
    loss.backward()
    moco.commit_step()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert moco.queue.dtype == torch.float32
    torch.testing.assert_close(moco.queue[: 2 * BATCH].norm(dim=1), torch.ones(2 * BATCH))


def test_state_dict_holds_everything_needed_to_resume() -> None:
    torch.manual_seed(0)
    trained = _tiny_moco(bn_splits=2)
    for _ in range(3):
        trained(_views(8))
        trained.commit_step()
    assert {"queue", "queue_ptr", "keys_enqueued"} <= set(trained.state_dict())

    torch.manual_seed(123)  # a fresh process would start from other random weights and queue
    resumed = _tiny_moco(bn_splits=2)
    resumed.load_state_dict(trained.state_dict())
    views = _views(8)
    rng = torch.get_rng_state()
    loss, _ = trained(views)
    torch.set_rng_state(rng)  # the trainer checkpoints the global RNG: it drives the key shuffle
    resumed_loss, _ = resumed(views)

    torch.testing.assert_close(resumed_loss, loss, rtol=0, atol=0)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def test_registry_builds_moco_with_options() -> None:
    backbone, feature_dim = build_backbone("convnet", 1)
    method = build_method("moco", backbone, feature_dim, {"queue_size": 16, "mlp": False})
    assert isinstance(method, MoCo) and isinstance(method, Method)
    assert METHODS["moco"] is MoCo and method.num_views == 2
    assert method.encoder() is backbone
    assert method.queue.shape == (16, 128)
    assert isinstance(method.head, torch.nn.Linear)  # MoCo v1 head


def test_registry_rejects_unknown_names_and_options() -> None:
    backbone, feature_dim = build_backbone("convnet", 1)
    with pytest.raises(ValueError, match=r"valid: .*moco"):
        build_method("mocov9", backbone, feature_dim, {})
    with pytest.raises(ValueError, match="queue_length"):
        build_method("moco", backbone, feature_dim, {"queue_length": 16})


def test_method_base_class_cannot_be_used_without_forward() -> None:
    backbone, feature_dim = build_backbone("convnet", 1)
    with pytest.raises(TypeError):
        Method(backbone, feature_dim)  # type: ignore[abstract]

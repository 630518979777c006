"""NPID: direct-mapped memory bank (slots, tags, eviction), momentum update, sampled softmax, resume."""

import pytest
import torch
import torch.nn.functional as F

from streamssl.models import build_backbone
from streamssl.models.losses import info_nce
from streamssl.models.npid import NPID

BANK = 32


def _tiny_npid(**options: object) -> NPID:
    backbone, feature_dim = build_backbone("convnet", 1)
    # eval BN: an image's embedding does not depend on the rest of its batch, so tests can recompute it
    return NPID(backbone, feature_dim, **{"dim": 8, "bank_size": BANK, "negatives": 16, **options}).eval()


def _images(batch: int = 8) -> torch.Tensor:
    return torch.rand(batch, 1, 12, 12)


@torch.no_grad()
def _embed(npid: NPID, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(npid.head(npid.backbone(images)), dim=1)


def test_first_visits_are_misses_that_write_their_embeddings_into_id_mod_bank_size() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid()
    initial = npid.bank.clone()
    images, ids = _images(), torch.tensor([0, 1, 33, 70, 100, 5, 6, 1000])
    loss, logs = npid([images], ids)

    loss.backward()  # no hit: a zero loss that still reaches every parameter
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in [*npid.backbone.parameters(), *npid.head.parameters()])
    slots = [0, 1, 1, 6, 4, 5, 6, 8]  # id mod 32
    torch.testing.assert_close(npid.bank[[0, 4, 5, 8]], _embed(npid, images)[[0, 4, 5, 7]])
    # slots 1 and 6 were claimed twice in the batch: the later row wins
    torch.testing.assert_close(npid.bank[[1, 6]], _embed(npid, images)[[2, 6]])
    expected_tags = torch.full((BANK,), -1)
    expected_tags[[0, 1, 4, 5, 6, 8]] = torch.tensor([0, 33, 100, 5, 6, 1000])
    assert torch.equal(npid.bank_ids, expected_tags)
    untouched = torch.ones(BANK, dtype=torch.bool)
    untouched[slots] = False
    torch.testing.assert_close(npid.bank[untouched], initial[untouched], rtol=0, atol=0)
    assert logs["bank_hit_ratio"].item() == 0 and logs["bank_fill"].item() == pytest.approx(6 / BANK)


def test_a_revisit_is_a_hit_whose_positive_is_its_bank_entry_then_moved_by_momentum() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid(momentum=0.3)
    ids = torch.arange(8) * 5  # slots 0, 5, 10, ... 3 (35 mod 32)
    npid([_images()], ids)
    bank = npid.bank.clone()
    images = _images()
    embeddings = _embed(npid, images)
    slots = ids % BANK
    rng = torch.get_rng_state()
    negatives = bank[torch.randint(BANK, (16,))]
    torch.set_rng_state(rng)  # the method draws the same negatives from the default generator

    loss, logs = npid([images], ids)

    torch.testing.assert_close(loss.detach(), info_nce(embeddings, bank[slots], negatives, 0.07))
    torch.testing.assert_close(npid.bank[slots], F.normalize(0.3 * bank[slots] + 0.7 * embeddings, dim=1))
    assert torch.equal(npid.bank_ids[slots], ids)
    assert logs["bank_hit_ratio"].item() == 1.0
    loss.backward()
    assert all(p.grad is not None for p in npid.head.parameters())


def test_only_hits_enter_the_loss() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid()
    npid([_images()], torch.arange(8))
    bank = npid.bank.clone()
    images, ids = _images(), torch.tensor([0, 1, 2, 3, 40, 41, 42, 43])  # the last four are new ids
    embeddings = _embed(npid, images)
    rng = torch.get_rng_state()
    negatives = bank[torch.randint(BANK, (16,))]
    torch.set_rng_state(rng)

    loss, logs = npid([images], ids)

    torch.testing.assert_close(loss.detach(), info_nce(embeddings[:4], bank[:4], negatives, 0.07))
    assert logs["bank_hit_ratio"].item() == 0.5


def test_another_id_with_the_same_slot_evicts_the_instance() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid()
    first, second, third = _images(2), _images(2), _images(2)
    npid([first], torch.tensor([3, 20]))
    _, logs = npid([second], torch.tensor([35, 20]))  # 35 mod 32 = 3: a miss that takes the slot over
    assert logs["bank_hit_ratio"].item() == 0.5
    assert npid.bank_ids[3].item() == 35
    torch.testing.assert_close(npid.bank[3], _embed(npid, second)[0])
    _, logs = npid([third], torch.tensor([3, 20]))  # the evicted instance comes back: a miss again
    assert logs["bank_hit_ratio"].item() == 0.5 and npid.bank_ids[3].item() == 3
    torch.testing.assert_close(npid.bank[3], _embed(npid, third)[0])
    assert logs["bank_fill"].item() == pytest.approx(2 / BANK)


@pytest.mark.parametrize("order", [[5, 5, 37], [5, 37, 5]])
def test_rows_of_one_batch_sharing_a_slot_write_the_last_rows_value(order: list[int]) -> None:
    torch.manual_seed(0)
    npid = _tiny_npid()
    npid([_images(2)], torch.tensor([5, 20]))
    entry = npid.bank[5].clone()
    images = _images(3)
    embeddings = _embed(npid, images)

    _, logs = npid([images], torch.tensor(order))

    assert logs["bank_hit_ratio"].item() == pytest.approx(2 / 3)  # both rows of id 5 hit the entry as it was
    assert npid.bank_ids[5].item() == order[-1]
    if order[-1] == 5:  # a hit: the entry moves towards the last row, from its value before the batch
        torch.testing.assert_close(npid.bank[5], F.normalize(0.5 * entry + 0.5 * embeddings[2], dim=0))
    else:  # a miss: the new id takes the slot with its own embedding
        torch.testing.assert_close(npid.bank[5], embeddings[2])


def test_forward_needs_ids() -> None:
    npid = _tiny_npid()
    with pytest.raises(ValueError, match="ids"):
        npid([_images()])


def test_sgd_steps_under_bf16_autocast_keep_a_float32_unit_norm_bank() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid().train()
    optimizer = torch.optim.SGD(npid.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, logs = npid([_images()], torch.arange(8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        npid.on_step_end(step)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert set(logs) == {"embedding_std", "bank_hit_ratio", "bank_fill"}
        assert all(value.ndim == 0 and not value.requires_grad and torch.isfinite(value) for value in logs.values())
    assert loss.item() > 0 and npid.bank.dtype == torch.float32
    torch.testing.assert_close(npid.bank.norm(dim=1), torch.ones(BANK))


def test_state_dict_holds_everything_needed_to_resume() -> None:
    torch.manual_seed(0)
    trained = _tiny_npid().train()
    for start in (0, 4, 0):
        trained([_images()], torch.arange(start, start + 8))
    assert {"bank", "bank_ids"} <= set(trained.state_dict())

    torch.manual_seed(123)
    resumed = _tiny_npid().train()
    resumed.load_state_dict(trained.state_dict())
    images, ids = _images(), torch.arange(2, 10)
    rng = torch.get_rng_state()
    loss, _ = trained([images], ids)
    torch.set_rng_state(rng)  # the sampled negatives come from the global RNG, which the trainer checkpoints
    resumed_loss, _ = resumed([images], ids)

    assert loss.item() > 0
    torch.testing.assert_close(resumed_loss, loss, rtol=0, atol=0)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)

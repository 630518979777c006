"""NPID: set-associative memory bank (hits, misses, LRU eviction, one batch's conflicts), staged writes,
negatives from written slots only, a loss on misses and on the very first step, resume; the bank tests run the
paper's positive (`positive="bank"`), and the default, a second view's embedding, has tests of its own."""

import pytest
import torch
import torch.nn.functional as F

from streamssl.models import build_backbone
from streamssl.models.losses import info_nce
from streamssl.models.memory_bank import sample_filled_slots
from streamssl.models.npid import NPID

BANK, WAYS, NEGATIVES = 32, 2, 16  # 16 sets of 2 slots; ids i and i + 16 share a set
# Steps of one record: embedding_std of a one-row batch is NaN, with a warning; nothing here reads it.
pytestmark = pytest.mark.filterwarnings(r"ignore:std\(\). degrees of freedom:UserWarning")


def _tiny_npid(**options: object) -> NPID:
    backbone, feature_dim = build_backbone("convnet", 1)
    options = {"dim": 8, "bank_size": BANK, "ways": WAYS, "negatives": NEGATIVES, "positive": "bank", **options}
    # eval BN: an image's embedding does not depend on the rest of its batch, so tests can recompute it
    return NPID(backbone, feature_dim, **options).eval()


def _images(batch: int = 8) -> torch.Tensor:
    return torch.rand(batch, 1, 12, 12)


@torch.no_grad()
def _embed(npid: NPID, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(npid.head(npid.backbone(images)), dim=1)


def _step(npid: NPID, ids: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One taken step on fresh images: forward, then commit_step as the trainer does; also their embeddings."""
    images = _images(len(ids))
    embeddings = _embed(npid, images)
    loss, logs = npid([images], torch.tensor(ids))
    npid.commit_step()
    return loss, logs, embeddings


def _slot_of(npid: NPID, record: int) -> int:
    slots = (npid.bank_ids == record).nonzero().flatten().tolist()
    assert len(slots) == 1, f"id {record} held by slots {slots}"
    return slots[0]


def _set_tags(npid: NPID, set_index: int) -> list[int]:
    return npid.bank_ids[set_index * WAYS:(set_index + 1) * WAYS].tolist()


def _reference_negatives(npid: NPID) -> torch.Tensor:
    """The entries the method draws: uniform over the written slots, in slot order, from the default generator."""
    written = (npid.bank_ids >= 0).nonzero().flatten()
    rng = torch.get_rng_state()
    draws = (torch.rand(NEGATIVES) * len(written)).long()
    torch.set_rng_state(rng)
    return npid.bank[written[draws]]


def test_the_first_step_of_a_run_contrasts_each_record_with_the_rest_of_its_batch() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid()
    images = _images()
    embeddings = _embed(npid, images)

    loss, logs = npid([images], torch.arange(8))

    # an empty bank has nothing to draw: own embedding as positive, the batch's others as negatives
    expected = F.cross_entropy(embeddings @ embeddings.T / 0.1, torch.arange(8))
    torch.testing.assert_close(loss.detach(), expected)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in npid.head.parameters())
    assert logs["bank_hit_ratio"].item() == 0 and logs["bank_fill"].item() == 0


def test_writes_wait_for_commit_step_and_discard_step_drops_them() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid()
    before = {name: value.clone() for name, value in npid.state_dict().items()}
    npid([_images()], torch.arange(8))
    for name, value in npid.state_dict().items():  # forward alone changes no state
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)

    npid.discard_step()
    npid.commit_step()
    assert (npid.bank_ids == -1).all() and npid.bank_clock.item() == 0

    images = _images()
    npid([images], torch.arange(8))
    npid.commit_step()
    assert sorted(npid.bank_ids[npid.bank_ids >= 0].tolist()) == list(range(8))
    torch.testing.assert_close(npid.bank[[_slot_of(npid, i) for i in range(8)]], _embed(npid, images))
    assert npid.bank_clock.item() == 1


def test_a_miss_trains_against_its_own_detached_embedding_and_the_written_entries() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid()
    _step(npid, [0, 1, 2, 3])
    images, ids = _images(4), torch.tensor([4, 5, 6, 7])  # never seen: all misses
    embeddings = _embed(npid, images)
    negatives = _reference_negatives(npid)

    loss, logs = npid([images], ids)

    torch.testing.assert_close(loss.detach(), info_nce(embeddings, embeddings, negatives, 0.1))
    assert loss.item() > 0 and logs["bank_hit_ratio"].item() == 0
    loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in [*npid.backbone.parameters(), *npid.head.parameters()])


def test_a_revisit_is_a_hit_whose_positive_is_its_entry_then_moved_by_momentum() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid(momentum=0.3)
    _step(npid, [0, 1, 2, 3, 16])
    slots = [_slot_of(npid, i) for i in (0, 1)]
    entries = npid.bank[slots].clone()
    images, ids = _images(3), torch.tensor([0, 1, 40])  # two hits, one miss
    embeddings = _embed(npid, images)
    negatives = _reference_negatives(npid)

    loss, logs = npid([images], ids)
    npid.commit_step()

    positives = torch.cat([entries, embeddings[2:]])
    torch.testing.assert_close(loss.detach(), info_nce(embeddings, positives, negatives, 0.1))
    assert logs["bank_hit_ratio"].item() == pytest.approx(2 / 3)
    assert logs["bank_fill"].item() == pytest.approx(5 / BANK)  # as the batch found the bank
    torch.testing.assert_close(npid.bank[slots], F.normalize(0.3 * entries + 0.7 * embeddings[:2], dim=1))
    assert [_slot_of(npid, i) for i in (0, 1)] == slots  # a hit stays where it is
    torch.testing.assert_close(npid.bank[_slot_of(npid, 40)], embeddings[2])


@pytest.mark.parametrize("key_momentum", [0.99, 0.0])
def test_by_default_the_positive_is_a_second_views_embedding_without_gradient(key_momentum: float) -> None:
    torch.manual_seed(0)
    npid = _tiny_npid(positive="view", key_momentum=key_momentum)
    assert npid.views().full == 2 and _tiny_npid().views().full == 1
    _sgd_step(npid, [0, 1, 2, 3])  # the online encoder moves; a key encoder follows it only by momentum
    first, second, ids = _images(4), _images(4), torch.tensor([0, 1, 40, 41])  # two hits, two misses: the same rule
    negatives = _reference_negatives(npid)
    keys = _embed_keys(npid, second) if key_momentum else _embed(npid, second)
    assert not key_momentum or not torch.allclose(keys, _embed(npid, second), atol=1e-4)

    loss, logs = npid([first, second], ids)

    torch.testing.assert_close(loss.detach(), info_nce(_embed(npid, first), keys, negatives, 0.1))
    assert logs["bank_hit_ratio"].item() == 0.5
    loss.backward()
    grads = [p.grad.clone() for p in npid.head.parameters()]
    npid.zero_grad()
    info_nce(_embed_with_grad(npid, first), keys, negatives, 0.1).backward()
    for grad, expected in zip(grads, (p.grad for p in npid.head.parameters()), strict=True):
        torch.testing.assert_close(grad, expected)  # nothing flows through the second view
    npid.commit_step()
    # The bank gets the key encoder's second view (consistent across writes); without one, the online first view.
    written = keys[2] if key_momentum else _embed(npid, first)[2]
    torch.testing.assert_close(npid.bank[_slot_of(npid, 40)], written)


def test_the_key_encoder_follows_the_online_one_by_momentum_only_when_the_step_is_taken() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid(positive="view", key_momentum=0.9)
    before = [p.clone() for p in npid.key_head.parameters()]
    _sgd_step(npid, [0, 1, 2, 3], commit=False)
    npid.discard_step()
    for key, old in zip(npid.key_head.parameters(), before, strict=True):
        torch.testing.assert_close(key, old, rtol=0, atol=0)
    _sgd_step(npid, [0, 1, 2, 3])
    for key, old, online in zip(npid.key_head.parameters(), before, npid.head.parameters(), strict=True):
        assert not torch.equal(online, old)
        torch.testing.assert_close(key, 0.9 * old + 0.1 * online)
    state = set(npid.state_dict())
    assert "key_head.weight" in state and {f"key_backbone.{name}" for name, _ in npid.backbone.named_parameters()} <= state
    assert not any(p.requires_grad for p in npid.key_backbone.parameters())
    assert not hasattr(_tiny_npid(), "key_head")  # the paper's positive has no key encoder


def _sgd_step(npid: NPID, ids: list[int], commit: bool = True) -> None:
    """forward, backward, one SGD step on the online encoder, then commit_step as the trainer does."""
    optimizer = torch.optim.SGD([p for p in npid.parameters() if p.requires_grad], lr=0.5)
    loss, _ = npid([_images(len(ids)), _images(len(ids))], torch.tensor(ids))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if commit:
        npid.commit_step()


@torch.no_grad()
def _embed_keys(npid: NPID, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(npid.key_head(npid.key_backbone(images)), dim=1)


def test_by_default_the_first_step_contrasts_each_view_with_the_batchs_other_second_views() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid(positive="view")
    first, second = _images(), _images()

    loss, _ = npid([first, second], torch.arange(8))

    expected = F.cross_entropy(_embed(npid, first) @ _embed(npid, second).T / 0.1, torch.arange(8))
    torch.testing.assert_close(loss.detach(), expected)


def _embed_with_grad(npid: NPID, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(npid.head(npid.backbone(images)), dim=1)


def test_negatives_are_drawn_uniformly_from_written_slots_only() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid(negatives=4000)
    _step(npid, [3, 17, 30])
    written = {_slot_of(npid, i) for i in (3, 17, 30)}
    slots = sample_filled_slots(npid.bank_ids >= 0, npid.negatives)
    assert set(slots.tolist()) == written
    counts = torch.bincount(slots, minlength=BANK)[sorted(written)]
    assert (counts - 4000 / 3).abs().max() < 150  # ~5 standard deviations


def test_a_full_set_evicts_its_least_recently_written_slot() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid()
    _step(npid, [0])
    _step(npid, [16])  # set 0 has a second way: no eviction
    assert _set_tags(npid, 0) == [0, 16]
    _step(npid, [32])  # full: 0 was written least recently
    assert _set_tags(npid, 0) == [32, 16]
    _, logs, _ = _step(npid, [16])  # a hit rewrites its slot and makes it the most recent
    assert logs["bank_hit_ratio"].item() == 1 and npid.bank_written.tolist()[:2] == [2, 3]
    _, logs, embeddings = _step(npid, [48])
    assert _set_tags(npid, 0) == [48, 16] and logs["bank_hit_ratio"].item() == 0
    torch.testing.assert_close(npid.bank[0], embeddings[0])
    _, logs, _ = _step(npid, [0])  # the evicted record comes back as a miss and evicts 16
    assert _set_tags(npid, 0) == [48, 0] and logs["bank_hit_ratio"].item() == 0
    assert (npid.bank_ids[WAYS:] == -1).all()  # no other set was touched


def test_two_new_records_of_one_set_in_one_batch_each_get_a_slot() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid()
    _, _, embeddings = _step(npid, [16, 0, 5])
    # both are stored; the later one takes the first free slot
    assert _set_tags(npid, 0) == [0, 16] and _slot_of(npid, 5) == 5 * WAYS
    torch.testing.assert_close(npid.bank[[1, 0, 10]], embeddings)


def test_more_new_records_than_free_slots_the_last_ones_win_and_hit_slots_are_kept() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid()
    _step(npid, [0, 1])
    kept = npid.bank[0].clone()
    # set 0: 0 hits (its slot is kept), one free slot for three new records; the last of them gets it
    _, logs, embeddings = _step(npid, [16, 0, 48, 32])
    assert logs["bank_hit_ratio"].item() == pytest.approx(1 / 4)
    assert _set_tags(npid, 0) == [0, 32]
    torch.testing.assert_close(npid.bank[0], F.normalize(kept + embeddings[1], dim=0))
    torch.testing.assert_close(npid.bank[1], embeddings[3])
    # a full set whose every slot is hit: the new record is not stored
    _step(npid, [16, 0, 32])
    assert _set_tags(npid, 0) == [0, 32]


@pytest.mark.parametrize("order", [[5, 5, 21], [5, 21, 5]])
def test_the_last_row_of_a_repeated_record_decides_its_write(order: list[int]) -> None:
    torch.manual_seed(0)
    npid = _tiny_npid()
    _step(npid, [5])
    slot = _slot_of(npid, 5)
    entry = npid.bank[slot].clone()

    _, logs, embeddings = _step(npid, order)  # 21 shares 5's set

    assert logs["bank_hit_ratio"].item() == pytest.approx(2 / 3)  # both rows of id 5 hit the entry as it was
    last = max(row for row, record in enumerate(order) if record == 5)
    assert _slot_of(npid, 5) == slot
    torch.testing.assert_close(npid.bank[slot], F.normalize(entry + embeddings[last], dim=0))
    torch.testing.assert_close(npid.bank[_slot_of(npid, 21)], embeddings[order.index(21)])


@pytest.mark.parametrize(("ways", "kept_share"), [(8, (0.99, 1.0)), (1, (0.75, 0.85))])
def test_a_cycle_of_60k_hashed_ids_stays_in_a_131072_slot_bank(ways: int, kept_share: tuple[float, float]) -> None:
    torch.manual_seed(0)
    npid = NPID(torch.nn.Identity(), 4, dim=4, bank_size=131072, ways=ways)
    ids = torch.randint(0, 2**62, (60000,))  # distinct, like blake2b hashes of 60k keys
    embeddings = F.normalize(torch.randn(len(ids), 4), dim=1)
    for start in range(0, len(ids), 2048):  # a global batch of 2048: 8 workers of 256
        npid._write(embeddings[start:start + 2048], ids[start:start + 2048])
    kept = torch.isin(ids, npid.bank_ids).sum().item()
    # 8 ways: records are lost only where more than 8 of them share a set (~0.5%); direct-mapped: only the
    # last writer of each slot is kept, 131072 · (1 - exp(-60k / 131072)) / 60k ≈ 80%
    assert kept_share[0] < kept / len(ids) < kept_share[1]
    assert (npid.bank_ids >= 0).sum().item() == kept  # every stored id in one slot only


def test_forward_needs_ids_and_the_bank_whole_sets() -> None:
    npid = _tiny_npid()
    with pytest.raises(ValueError, match="ids"):
        npid([_images()])
    with pytest.raises(ValueError, match="multiple of ways"):
        _tiny_npid(bank_size=30, ways=8)


def test_sgd_steps_under_bf16_autocast_keep_a_float32_unit_norm_bank() -> None:
    torch.manual_seed(0)
    npid = _tiny_npid().train()
    optimizer = torch.optim.SGD(npid.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, logs = npid([_images()], torch.arange(8) + 4 * step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        npid.commit_step()
        npid.on_step_end(step)
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0
        assert set(logs) == {"embedding_std", "bank_hit_ratio", "bank_fill"}
        assert all(value.ndim == 0 and not value.requires_grad and torch.isfinite(value) for value in logs.values())
    assert logs["bank_hit_ratio"].item() == 0.5 and npid.bank.dtype == torch.float32
    written = npid.bank_ids >= 0
    assert written.sum().item() == 16
    torch.testing.assert_close(npid.bank[written].norm(dim=1), torch.ones(16))


def test_state_dict_holds_everything_needed_to_resume() -> None:
    torch.manual_seed(0)
    trained = _tiny_npid().train()
    for ids in ([0, 1, 2, 3], [16, 32, 4, 5], [0, 48, 6, 7]):  # fills set 0 and evicts in it
        trained([_images(4)], torch.tensor(ids))
        trained.commit_step()
    assert {"bank", "bank_ids", "bank_written", "bank_clock"} <= set(trained.state_dict())

    torch.manual_seed(123)
    resumed = _tiny_npid().train()
    resumed.load_state_dict(trained.state_dict())
    images, ids = _images(), torch.tensor([0, 1, 16, 32, 64, 80, 9, 10])
    rng = torch.get_rng_state()
    loss, _ = trained([images], ids)
    trained.commit_step()
    torch.set_rng_state(rng)  # the sampled negatives come from the global RNG, which the trainer checkpoints
    resumed_loss, _ = resumed([images], ids)
    resumed.commit_step()

    assert loss.item() > 0
    torch.testing.assert_close(resumed_loss, loss, rtol=0, atol=0)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)

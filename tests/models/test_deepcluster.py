"""Online DeepCluster: staged ring writes, the horizon schedule, the per-id label memory, the classifier reset,
the weighted cosine loss, the warm-up, resume, and that a few steps learn."""


import pytest
import torch
import torch.nn.functional as F

from streamssl.models import build_backbone
from streamssl.models.deepcluster import DeepCluster
from streamssl.models.kmeans import inverse_size_weights, kmeans, nearest_centroid, normalized_mutual_info
from streamssl.models.losses import nt_xent

BATCH = 8
LOG_KEYS = {"embedding_std", "clustered", "fixed_label_share", "nmi", "cluster_size_max_share",
            "cluster_size_min_share", "empty_reassigned", "pseudo_label_accuracy_of_head"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is many times faster on busy cores


def _tiny_deepcluster(**options: object) -> DeepCluster:
    backbone, feature_dim = build_backbone("convnet", 1)
    defaults = {"num_clusters": 4, "dim": 8, "buffer_size": 32, "kmeans_iterations": 3,
                "first_clustering_step": 4, "recluster_every": 3}
    return DeepCluster(backbone, feature_dim, **{**defaults, **options})


def _views(batch: int = BATCH) -> list[torch.Tensor]:
    return [torch.rand(batch, 1, 12, 12), torch.rand(batch, 1, 12, 12)]


def _ids(batch: int = BATCH, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + batch)


def _step(method: DeepCluster, step: int, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One taken step as the trainer runs it, without the optimizer: forward, commit, on_step_end."""
    with torch.no_grad():
        _, logs = method(_views(), _ids(start=BATCH * step) if ids is None else ids)
    method.commit_step()
    method.on_step_end(step)
    return logs


def _projections(method: DeepCluster, views: list[torch.Tensor]) -> torch.Tensor:
    """The L2-normalised view-1 projections, as the ring stores them."""
    return F.normalize(method.head(method.backbone(torch.cat(views))), dim=1)[: len(views[0])]


def _fill_ring(method: DeepCluster, count: int) -> None:
    """Random unit rows in the first `count` slots, as if `count` projections had been committed."""
    rows = min(count, len(method.feature_buffer))
    method.feature_buffer[:rows] = F.normalize(torch.randn(rows, method.feature_buffer.shape[1]), dim=1)
    method.buffer_ids[:rows] = torch.arange(rows)
    method.features_seen.fill_(count)


def _clustering_steps(method: DeepCluster, steps: range) -> list[int]:
    """The steps_done values right after which a clustering ran (the schedule alone: no forward passes)."""
    done = []
    for step in steps:
        before = method.clusterings.item()
        method.on_step_end(step)
        if method.clusterings.item() > before:
            done.append(method.steps_done.item())
    return done


def test_ring_holds_the_latest_view1_projections_and_ids_once_committed() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster(buffer_size=20).eval()  # eval BN: features independent of the batch
    batches = [_views() for _ in range(3)]
    with torch.no_grad():
        for index, views in enumerate(batches):
            method(views, _ids(start=100 * index))
            if index == 0:  # staged, not yet written
                assert method.features_seen.item() == 0 and (method.buffer_ids == -1).all()
            method.commit_step()
        expected = [_projections(method, views) for views in batches]
    # 24 projections into 20 slots: the third batch's last four wrap to the front
    torch.testing.assert_close(method.feature_buffer, torch.cat([expected[2][4:], expected[0][4:], expected[1],
                                                                 expected[2][:4]]))
    assert method.buffer_ids.tolist() == [204, 205, 206, 207, *range(4, 8), *range(100, 108), 200, 201, 202, 203]
    assert method.features_seen.item() == 24


def test_a_discarded_step_writes_nothing() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster().eval()
    with torch.no_grad():
        method(_views(), _ids(start=0))
    method.discard_step()
    method.commit_step()  # nothing left to apply
    assert method.features_seen.item() == 0 and (method.buffer_ids == -1).all() and not method.feature_buffer.any()
    views = _views()
    with torch.no_grad():
        method(views, _ids(start=50))
        method.commit_step()
        expected = _projections(method, views)
    assert method.features_seen.item() == BATCH and method.buffer_ids[:BATCH].tolist() == list(range(50, 58))
    torch.testing.assert_close(method.feature_buffer[:BATCH], expected)


def test_a_batch_larger_than_the_ring_keeps_its_last_projections() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster(buffer_size=16).eval()
    views = _views(20)
    with torch.no_grad():
        method(views)  # no ids: recorded as -1
        method.commit_step()
        expected = _projections(method, views)
    torch.testing.assert_close(method.feature_buffer, torch.cat([expected[16:], expected[4:16]]))
    assert (method.buffer_ids == -1).all() and method.features_seen.item() == 20


def test_warm_up_is_instance_discrimination_and_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster().eval()
    views = _views()
    with torch.no_grad():
        z = F.normalize(method.head(method.backbone(torch.cat(views))), dim=1)
        expected = nt_xent(z[:BATCH], z[BATCH:], 0.1)
    loss, logs = method(views, _ids())
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert all(p.grad is not None for p in method.parameters())  # DDP needs every parameter in the graph
    assert not method.classifier.weight.grad.any() and next(method.backbone.parameters()).grad.any()
    assert logs["clustered"].item() == 0 and logs["fixed_label_share"].item() == 0
    assert set(logs) == LOG_KEYS
    assert all(value.ndim == 0 and not value.requires_grad and torch.isfinite(value) for value in logs.values())


def test_schedule_follows_the_share_of_the_horizon_and_a_re_estimated_horizon() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster(first_clustering_share=0.25, recluster_share=0.25)
    _fill_ring(method, 32)
    method.horizon_steps = 24  # first after 6 steps, then every 6
    assert _clustering_steps(method, range(12)) == [6, 12]
    method.horizon_steps = 40  # the trainer's new estimate: every 10 steps from the last clustering
    assert _clustering_steps(method, range(12, 33)) == [22, 32]
    assert method.last_clustering_step.item() == 32 and method.steps_done.item() == 33
    short = _tiny_deepcluster(first_clustering_share=0.25, recluster_share=0.25)
    _fill_ring(short, 32)
    short.horizon_steps = 8
    assert _clustering_steps(short, range(12)) == [2, 4, 6]  # not at the horizon (8) nor past it: nothing to train


def test_unbounded_schedule_counts_steps_and_no_clustering_before_the_ring_holds_4k() -> None:
    torch.manual_seed(0)
    unbounded = _tiny_deepcluster()  # horizon_steps 0: after 4 steps, then every 3
    _fill_ring(unbounded, 40)
    assert _clustering_steps(unbounded, range(11)) == [4, 7, 10]
    paper = _tiny_deepcluster(first_clustering_share=0.0)
    paper.horizon_steps = 100
    _fill_ring(paper, 15)  # one short of 4·K
    assert _clustering_steps(paper, range(3)) == []
    _fill_ring(paper, 16)
    assert _clustering_steps(paper, range(3, 4)) == [4]


def test_a_clustering_is_kmeans_on_the_ring_oldest_first_and_restarts_the_classifier_at_the_centroids() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster(buffer_size=20, first_clustering_step=3)
    _step(method, 0)
    _step(method, 1)
    with torch.no_grad():
        method(_views(), _ids(start=16))
    method.commit_step()  # 24 written into 20 slots: the oldest surviving one, id 4, sits at slot 4
    ring = method.feature_buffer.clone()
    with torch.no_grad():
        method.classifier.weight.add_(1.0)  # a trained classifier, to see the restart
    assert method.take_reset_parameters() == []
    rng = torch.get_rng_state()
    method.on_step_end(2)
    assert method.clusterings.item() == 1

    torch.set_rng_state(rng)
    chronological = torch.cat([ring[4:], ring[:4]])
    expected = kmeans(chronological, 4, 3)
    torch.testing.assert_close(method.centroids, expected.centroids, rtol=0, atol=0)
    assert torch.equal(method.cluster_sizes, torch.bincount(expected.assignments, minlength=4))
    torch.testing.assert_close(method.cluster_weights, inverse_size_weights(expected.assignments, 4))
    assert method.empty_reassigned.item() == expected.reassigned
    # the label memory: ids 4..23 (0..3 were overwritten), each with its assignment
    assert method.clustered_ids.tolist() == list(range(4, 24))
    assert torch.equal(method.clustered_labels, expected.assignments)
    torch.testing.assert_close(method.classifier.weight, F.normalize(expected.centroids, dim=1))
    reset = method.take_reset_parameters()
    assert len(reset) == 1 and reset[0] is method.classifier.weight  # its old momentum must go

    # the next clustering logs its agreement with this one
    old_centroids = method.centroids.clone()
    _step(method, 3)
    _step(method, 4)
    with torch.no_grad():
        method(_views(), _ids(start=100))
    method.commit_step()
    ring = method.feature_buffer.clone()
    rng = torch.get_rng_state()
    method.on_step_end(5)
    assert method.clusterings.item() == 2
    torch.set_rng_state(rng)
    chronological = torch.cat([ring[8:], ring[:8]])  # 48 written: the next slot is 8
    expected = kmeans(chronological, 4, 3)
    nmi = normalized_mutual_info(nearest_centroid(chronological, old_centroids), expected.assignments)
    assert method.nmi.item() == pytest.approx(nmi.item())
    logs = _step(method, 6)
    assert logs["nmi"].item() == pytest.approx(nmi.item()) and logs["clustered"].item() == 1
    shares = method.cluster_sizes.float() / 20
    assert logs["cluster_size_max_share"].item() == pytest.approx(shares.max().item())
    assert logs["cluster_size_min_share"].item() == pytest.approx(shares.min().item())


def _clustered_once(**options: object) -> DeepCluster:
    """A method after its first clustering (after step 4, ids 0..31 in the ring)."""
    method = _tiny_deepcluster(**options)
    for step in range(4):
        _step(method, step)
    assert method.clusterings.item() == 1
    return method.eval()


def test_revisited_ids_keep_their_clustering_label_and_new_ids_take_the_nearest_centroid() -> None:
    torch.manual_seed(0)
    method = _clustered_once()
    method.cluster_weights.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))  # distinct, to see which are used
    ids = torch.tensor([3, 10, 17, 31, 100, 101, 102, 103])  # four records of the ring, four new ones
    views = _views()
    with torch.no_grad():
        z = F.normalize(method.head(method.backbone(torch.cat(views))), dim=1)
        nearest = nearest_centroid(z[:BATCH], method.centroids)
        remembered = method.clustered_labels[ids[:4]]  # clustered_ids is 0..31: index = id
        logits = z @ F.normalize(method.classifier.weight, dim=1).T / 0.1
    assert method.clustered_ids.tolist() == list(range(32))
    # these new views of the revisited records are not near their old clusters: the memory, not the view, decides
    assert not torch.equal(nearest[:4], remembered)

    labels, fixed = method.pseudo_labels(z[:BATCH], ids)
    assert torch.equal(labels, torch.cat([remembered, nearest[4:]]))
    assert fixed.tolist() == [True] * 4 + [False] * 4

    targets = labels.repeat(2)
    expected = (method.cluster_weights[targets] * F.cross_entropy(logits, targets, reduction="none")).mean()
    loss, logs = method(views, ids)
    torch.testing.assert_close(loss.detach(), expected)
    assert logs["fixed_label_share"].item() == 0.5
    assert logs["pseudo_label_accuracy_of_head"].item() == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    loss.backward()
    assert method.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.backbone.parameters())

    without_ids, fixed = method.pseudo_labels(z[:BATCH], None)
    assert torch.equal(without_ids, nearest) and not fixed.any()


@pytest.mark.parametrize(("written", "newest_slot"), [(8, 4), (12, 0)])
def test_an_id_twice_in_the_ring_takes_the_label_of_its_newest_feature(written: int, newest_slot: int) -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster(num_clusters=2, dim=2, buffer_size=8, first_clustering_step=0)
    # two tight blobs; id 5 is in both, at slot 0 (blob A) and slot 4 (blob B)
    blob_a, blob_b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    method.feature_buffer.copy_(torch.stack([blob_a] * 4 + [blob_b] * 4) + 0.01 * torch.randn(8, 2))
    method.buffer_ids.copy_(torch.tensor([5, 6, 7, 8, 5, 9, 10, 11]))
    method.features_seen.fill_(written)  # 12: the ring wrapped, slots 0..3 are newer than 4..7
    method.on_step_end(0)
    assert method.clusterings.item() == 1
    labels, fixed = method.pseudo_labels(torch.zeros(1, 2), torch.tensor([5]))
    expected = nearest_centroid(method.feature_buffer[newest_slot : newest_slot + 1], method.centroids)
    assert fixed.item() and torch.equal(labels, expected)
    assert not torch.equal(expected, nearest_centroid(method.feature_buffer[4 - newest_slot :][:1], method.centroids))


def test_sgd_steps_under_bf16_autocast_stay_finite() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster(buffer_size=16, first_clustering_step=2, recluster_every=2)  # after steps 2 and 4
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    for step in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, logs = method(_views(), _ids(start=BATCH * (step % 2)))  # records come back
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.commit_step()
        method.on_step_end(step)
        for param in method.take_reset_parameters():
            optimizer.state.pop(param, None)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(torch.isfinite(value) for value in logs.values())
    assert logs["fixed_label_share"].item() == 1.0
    assert method.clusterings.item() == 2 and method.feature_buffer.dtype == torch.float32


def test_a_few_sgd_steps_on_one_batch_fit_its_pseudo_labels() -> None:
    torch.manual_seed(0)
    method = _clustered_once().train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    views, ids = _views(), _ids(start=8)  # records of the ring: fixed labels, the same every step
    losses, accuracies = [], []
    for _ in range(10):
        loss, logs = method(views, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.discard_step()  # keep the ring and the schedule as they are
        losses.append(loss.item())
        accuracies.append(logs["pseudo_label_accuracy_of_head"].item())
    assert losses[-1] < 0.5 * losses[0]
    assert accuracies[-1] == 1.0 and accuracies[0] < 1.0


def test_state_dict_holds_everything_needed_to_resume() -> None:
    torch.manual_seed(0)
    trained = _tiny_deepcluster(first_clustering_share=0.25, recluster_share=0.25)
    trained.horizon_steps = 16  # clusterings after steps 4, 8, 12, 16
    for step in range(5):
        _step(trained, step, ids=_ids(start=BATCH * (step % 3)))
    assert trained.clusterings.item() == 1
    assert {"feature_buffer", "buffer_ids", "features_seen", "centroids", "cluster_sizes", "cluster_weights",
            "clustered_ids", "clustered_labels", "steps_done", "clusterings", "last_clustering_step", "nmi",
            "empty_reassigned", "head.1.running_mean", "classifier.weight"} <= set(trained.state_dict())

    torch.manual_seed(123)  # a fresh process starts from other random weights
    resumed = _tiny_deepcluster(first_clustering_share=0.25, recluster_share=0.25)
    resumed.load_state_dict(trained.state_dict())
    resumed.horizon_steps = 16  # the trainer sets it before every step
    batches = [(_views(), _ids(start=BATCH * (step % 3))) for step in range(5, 9)]  # revisited ids
    rng = torch.get_rng_state()
    losses, shares = [], []
    for method in (trained, resumed):
        torch.set_rng_state(rng)  # the trainer checkpoints the global RNG: it drives k-means
        losses.append([])
        shares.append([])
        for step, (views, ids) in enumerate(batches, start=5):
            loss, logs = method(views, ids)
            method.commit_step()
            method.on_step_end(step)
            losses[-1].append(loss.detach())
            shares[-1].append(logs["fixed_label_share"].item())
    assert trained.clusterings.item() == 2  # the recluster after step 8 happened in both
    assert max(shares[0]) == 1.0
    torch.testing.assert_close(torch.stack(losses[1]), torch.stack(losses[0]), rtol=0, atol=0)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def test_rejects_bad_options() -> None:
    backbone, feature_dim = build_backbone("convnet", 1)
    with pytest.raises(ValueError, match="buffer_size"):
        DeepCluster(backbone, feature_dim, num_clusters=10, buffer_size=39)
    with pytest.raises(ValueError, match="recluster_share"):
        DeepCluster(backbone, feature_dim, buffer_size=400, recluster_share=0.0)
    with pytest.raises(ValueError, match="first_clustering_share"):
        DeepCluster(backbone, feature_dim, buffer_size=400, first_clustering_share=1.0)

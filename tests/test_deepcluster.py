"""Online DeepCluster: feature ring, reclustering schedule, head re-initialisation, weighted loss, resume."""

import pytest
import torch
import torch.nn.functional as F

from streamssl.models import build_backbone
from streamssl.models.deepcluster import DeepCluster
from streamssl.models.kmeans import inverse_size_weights, kmeans, nearest_centroid, normalized_mutual_info

BATCH = 8


def _tiny_deepcluster(**options: object) -> DeepCluster:
    backbone, feature_dim = build_backbone("convnet", 1)
    return DeepCluster(backbone, feature_dim, **{"num_clusters": 4, "buffer_size": 32, "recluster_every": 3,
                                                 "kmeans_iterations": 3, **options})


def _views(batch: int = BATCH) -> list[torch.Tensor]:
    return [torch.rand(batch, 1, 12, 12), torch.rand(batch, 1, 12, 12)]


def _ids(batch: int = BATCH, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + batch)


def _step(method: DeepCluster, step: int) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        _, logs = method(_views(), _ids(start=BATCH * step))
    method.on_step_end(step)
    return logs


def _view1_features(method: DeepCluster, views: list[torch.Tensor]) -> torch.Tensor:
    return F.normalize(method.backbone(torch.cat(views))[: len(views[0])], dim=1)


def test_ring_holds_the_latest_view1_features_and_ids() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster(buffer_size=20).eval()  # eval BN: features independent of the batch
    batches = [_views() for _ in range(3)]
    with torch.no_grad():
        for index, views in enumerate(batches):
            method(views, _ids(start=100 * index))
        expected = [_view1_features(method, views) for views in batches]
    # 24 features into 20 slots: the third batch's last four wrap to the front
    torch.testing.assert_close(method.feature_buffer, torch.cat([expected[2][4:], expected[0][4:], expected[1],
                                                                 expected[2][:4]]))
    assert method.buffer_ids.tolist() == [204, 205, 206, 207, *range(4, 8), *range(100, 108), 200, 201, 202, 203]
    assert method.features_seen.item() == 24


def test_a_batch_larger_than_the_ring_keeps_its_last_features() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster(buffer_size=16).eval()
    views = _views(20)
    with torch.no_grad():
        method(views)  # no ids: recorded as -1
        expected = _view1_features(method, views)
    torch.testing.assert_close(method.feature_buffer, torch.cat([expected[16:], expected[4:16]]))
    assert (method.buffer_ids == -1).all() and method.features_seen.item() == 20


def test_before_the_first_clustering_the_loss_is_a_zero_that_backpropagates() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster()
    loss, logs = method(_views(), _ids())
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in method.parameters())
    assert logs["clustered"].item() == 0 and logs["pseudo_label_accuracy_of_head"].item() == 0
    assert set(logs) == {"embedding_std", "clustered", "nmi", "cluster_size_max_share", "cluster_size_min_share",
                         "empty_reassigned", "pseudo_label_accuracy_of_head"}
    assert all(value.ndim == 0 and not value.requires_grad and torch.isfinite(value) for value in logs.values())


def test_clustering_runs_once_the_ring_is_full_then_every_recluster_every_steps() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster()  # ring of 32 = 4 batches of 8, recluster_every=3
    clusterings = []
    for step in range(11):
        _step(method, step)
        clusterings.append(method.clusterings.item())
    # after steps 4 (ring full), 7 and 10
    assert clusterings == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert method.last_clustering_step.item() == 10 and method.steps_done.item() == 11


def test_a_clustering_is_kmeans_on_the_ring_and_resets_the_classifier() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster()
    for step in range(6):
        _step(method, step)
    assert method.clusterings.item() == 1
    method(_views(), _ids(start=200))
    old_centroids, ring = method.centroids.clone(), method.feature_buffer.clone()
    with torch.no_grad():  # a trained classifier, to see the re-initialisation
        method.classifier.weight.add_(1.0)
        method.classifier.bias.add_(1.0)
    rng = torch.get_rng_state()
    method.on_step_end(6)
    assert method.clusterings.item() == 2

    torch.set_rng_state(rng)
    expected = kmeans(ring, 4, 3)
    torch.testing.assert_close(method.centroids, expected.centroids, rtol=0, atol=0)
    assert torch.equal(method.cluster_sizes, torch.bincount(expected.assignments, minlength=4))
    torch.testing.assert_close(method.cluster_weights, inverse_size_weights(expected.assignments, 4))
    nmi = normalized_mutual_info(nearest_centroid(ring, old_centroids), expected.assignments)
    assert method.nmi.item() == pytest.approx(nmi.item())
    assert method.empty_reassigned.item() == expected.reassigned
    assert method.classifier.bias.abs().max() == 0
    assert 0.005 < method.classifier.weight.std() < 0.015  # N(0, 0.01), not the trained weights

    logs = _step(method, 7)
    assert logs["nmi"].item() == pytest.approx(nmi.item())
    shares = method.cluster_sizes.float() / 32
    assert logs["cluster_size_max_share"].item() == pytest.approx(shares.max().item())
    assert logs["cluster_size_min_share"].item() == pytest.approx(shares.min().item())
    assert logs["clustered"].item() == 1


def test_loss_is_cross_entropy_on_both_views_against_view1_nearest_centroid_weighted_by_cluster() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster()
    for step in range(4):
        _step(method, step)
    assert method.clusterings.item() == 1
    method.cluster_weights.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))  # distinct, to see which are used
    views = _views()
    with torch.no_grad():
        features = method.backbone(torch.cat(views))
        labels = nearest_centroid(F.normalize(features[:BATCH], dim=1), method.centroids)
        logits = method.classifier(features)
        targets = torch.cat([labels, labels])
        expected = (method.cluster_weights[targets] * F.cross_entropy(logits, targets, reduction="none")).mean()
        accuracy = (logits.argmax(dim=1) == targets).float().mean()

    loss, logs = method(views, _ids())

    torch.testing.assert_close(loss.detach(), expected)
    assert logs["pseudo_label_accuracy_of_head"].item() == pytest.approx(accuracy.item())
    loss.backward()
    assert method.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.backbone.parameters())


def test_sgd_steps_under_bf16_autocast_stay_finite() -> None:
    torch.manual_seed(0)
    method = _tiny_deepcluster(buffer_size=16, recluster_every=2)  # clusterings after steps 2 and 4
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    for step in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, logs = method(_views(), _ids(start=BATCH * step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.on_step_end(step)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(torch.isfinite(value) for value in logs.values())
    assert method.clusterings.item() == 2 and method.feature_buffer.dtype == torch.float32


def test_state_dict_holds_everything_needed_to_resume() -> None:
    torch.manual_seed(0)
    trained = _tiny_deepcluster()
    for step in range(5):
        _step(trained, step)
    assert {"feature_buffer", "buffer_ids", "features_seen", "centroids", "cluster_sizes", "cluster_weights",
            "steps_done", "clusterings", "last_clustering_step", "nmi", "empty_reassigned"} <= set(trained.state_dict())

    torch.manual_seed(123)  # a fresh process starts from other random weights
    resumed = _tiny_deepcluster()
    resumed.load_state_dict(trained.state_dict())
    batches = [(_views(), _ids(start=BATCH * step)) for step in range(5, 8)]
    rng = torch.get_rng_state()
    losses = []
    for method in (trained, resumed):
        torch.set_rng_state(rng)  # the trainer checkpoints the global RNG: it drives k-means and the head reset
        losses.append([])
        for step, (views, ids) in enumerate(batches, start=5):
            loss, _ = method(views, ids)
            method.on_step_end(step)
            losses[-1].append(loss.detach())
    assert trained.clusterings.item() == 2  # the recluster at step 7 happened in both
    torch.testing.assert_close(torch.stack(losses[1]), torch.stack(losses[0]), rtol=0, atol=0)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def test_rejects_a_ring_too_small_for_the_clusters() -> None:
    backbone, feature_dim = build_backbone("convnet", 1)
    with pytest.raises(ValueError, match="buffer_size"):
        DeepCluster(backbone, feature_dim, num_clusters=10, buffer_size=39)

"""k-means with DeepCluster's empty-cluster handling, cluster-balancing weights and NMI, as pure functions.

DeepCluster (Caron et al. 2018, "Deep Clustering for Unsupervised Learning of Visual Features") clusters
features with Euclidean k-means (faiss), re-seeds empty clusters by splitting a non-empty one, weights
each sample by the inverse size of its cluster so that a few huge clusters cannot dominate the loss
("avoiding trivial parametrization"), and tracks how much the clustering changes between runs with the
normalised mutual information. Everything here works on any device; randomness comes from torch's
default CPU generator so that CPU and CUDA runs draw the same numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class KMeansResult(NamedTuple):
    centroids: Tensor  # [k, D] float32, the mean of each cluster's points
    assignments: Tensor  # [N] int64, cluster of each point; no cluster is empty (given >= k distinct points)
    reassigned: int  # how many times an empty cluster was re-seeded by splitting another one


def nearest_centroid(features: Tensor, centroids: Tensor) -> Tensor:
    """[N] int64 index of the Euclidean-nearest row of `centroids` [k, D] for each row of `features` [N, D]."""
    # Float32 even under autocast: bf16 distances (3 significant digits) would mislabel near-ties.
    with torch.autocast(features.device.type, enabled=False):
        features, centroids = features.float(), centroids.float()
        # ||x - c||^2 = ||x||^2 - 2 x·c + ||c||^2; the first term is the same for every c.
        distances = centroids.square().sum(dim=1) - 2 * features @ centroids.T
    return distances.argmin(dim=1)


def kmeans(features: Tensor, k: int, iterations: int, init_centroids: Tensor | None = None) -> KMeansResult:
    """Euclidean (Lloyd) k-means, the variant DeepCluster runs with faiss.

    Callers pass L2-normalised features, as DeepCluster does; centroids are plain means (not projected
    back onto the sphere). Without `init_centroids` the initial centroids are k distinct random points,
    faiss's default initialisation. Each iteration assigns every point to its nearest centroid, re-seeds
    empty clusters (`split_empty_clusters`) and moves every centroid to the mean of its points.

    Args:
        features: [N, D] points, N >= k.
        k: number of clusters.
        iterations: Lloyd iterations (DeepCluster: 20), at least 1.
        init_centroids: [k, D] starting centroids, instead of a random sample of the points.
    """
    if not 1 <= k <= len(features):
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {len(features)} points")
    if iterations < 1:
        raise ValueError(f"k-means needs at least one iteration, got {iterations}")
    features = features.float()
    if init_centroids is None:
        centroids = features[torch.randperm(len(features))[:k].to(features.device)].clone()
    else:
        centroids = init_centroids.to(features.device, torch.float32).clone()
    reassigned = 0
    for _ in range(iterations):
        assignments = nearest_centroid(features, centroids)
        reassigned += split_empty_clusters(features, assignments, k)
        centroids = cluster_means(features, assignments, k)
    return KMeansResult(centroids, assignments, reassigned)


def cluster_means(features: Tensor, assignments: Tensor, k: int) -> Tensor:
    """[k, D] mean of the points of each cluster (zero for an empty one)."""
    sums = torch.zeros(k, features.shape[1], device=features.device).index_add_(0, assignments, features)
    sizes = torch.bincount(assignments, minlength=k).clamp(min=1)
    return sums / sizes[:, None]


def split_empty_clusters(features: Tensor, assignments: Tensor, k: int) -> int:
    """Re-seeds every empty cluster by splitting a non-empty one, in place on `assignments`; returns how many.

    DeepCluster (via faiss) gives an empty cluster a copy of a randomly chosen non-empty cluster's
    centroid; the copy and the original are pushed a small distance epsilon apart and share that
    cluster's points. Here the donor is drawn with probability proportional to its size among clusters
    of at least two points (a single point cannot be split), and a random direction r ~ N(0, I) is drawn.
    Moving the copy to m + eps·r and the original to m - eps·r, with m the donor's points' mean, and
    giving each point to the nearer of the two splits the points by the hyperplane through m orthogonal
    to r, whatever eps > 0 is: so the points are split by that hyperplane directly, and the next mean
    update places both centroids. Through the mean, both sides get points unless all of the donor's
    points coincide; then another donor is tried. No cluster stays empty when there are >= k distinct points.
    """
    sizes = torch.bincount(assignments, minlength=k).cpu()
    reassigned = 0
    for empty_cluster in (sizes == 0).nonzero().flatten().tolist():
        donor_weights = (sizes * (sizes >= 2)).double()
        while donor_weights.sum() > 0:
            donor = int(torch.multinomial(donor_weights, 1))
            members = (assignments == donor).nonzero().flatten()
            points = features[members]
            direction = torch.randn(features.shape[1]).to(features.device)
            moves = (points - points.mean(dim=0)) @ direction > 0
            moved = int(moves.sum())
            if 0 < moved < len(members):
                assignments[members[moves]] = empty_cluster
                sizes[empty_cluster], sizes[donor] = moved, len(members) - moved
                reassigned += 1
                break
            donor_weights[donor] = 0  # all its points coincide: it cannot give any away
    return reassigned


def inverse_size_weights(assignments: Tensor, k: int) -> Tensor:
    """[k] float32 per-cluster sample weights proportional to 1 / cluster size, zero for empty clusters.

    Normalised so that the mean weight over the N clustered samples is 1:
    weight_c = N / (K_nonempty · |c|), since then sum_i weight_{a_i} = sum_c |c| · weight_c = N. Weighting
    each sample's loss this way is what DeepCluster's sampler, uniform over clusters, amounts to.
    """
    sizes = torch.bincount(assignments, minlength=k).float()
    nonempty = sizes > 0
    weights = torch.zeros(k, device=assignments.device)
    weights[nonempty] = len(assignments) / (nonempty.sum() * sizes[nonempty])
    return weights


def normalized_mutual_info(labels_a: Tensor, labels_b: Tensor) -> Tensor:
    """NMI(A, B) = I(A; B) / ((H(A) + H(B)) / 2) of two labelings of the same N samples, as a float64 scalar.

    The arithmetic-mean normalisation is scikit-learn's default; as there, two single-cluster labelings
    score 1. Label values are arbitrary: renaming the clusters of either labeling leaves NMI unchanged.
    """
    _, a = torch.unique(labels_a, return_inverse=True)
    _, b = torch.unique(labels_b, return_inverse=True)
    rows, cols = int(a.max()) + 1, int(b.max()) + 1
    if rows == cols == 1:
        return torch.ones((), dtype=torch.float64, device=labels_a.device)
    joint = torch.bincount(a * cols + b, minlength=rows * cols).reshape(rows, cols).double() / len(a)
    p_a, p_b = joint.sum(dim=1), joint.sum(dim=0)
    nonzero = joint > 0
    mutual_info = (joint[nonzero] * (joint[nonzero] / (p_a[:, None] * p_b[None, :])[nonzero]).log()).sum()
    entropy_a = -(p_a * p_a.log()).sum()  # every row and column of the table has a sample: no log(0)
    entropy_b = -(p_b * p_b.log()).sum()
    return (mutual_info / ((entropy_a + entropy_b) / 2)).clamp(min=0.0)
